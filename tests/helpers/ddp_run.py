"""Subprocess for the multi-process tests: one run of a small QMLHFL setup, single-process or over 2 ranks.

    python ddp_run.py OUT single [ckpt.ckpt]       # QMLHFLStrategy (device_rng="stream"), writes OUT/final.pt
    python ddp_run.py OUT ddp full|sharded [ckpt] # QMLHFLDDPStrategy on 2 CPU processes (gloo)
    python ddp_run.py OUT ddp full nan             # a NaN loss on one rank's device at step 5
    python ddp_run.py OUT ddp full kill            # rank 1 is SIGKILLed in round 3 (after two checkpoints)
Checkpoints go to OUT/ckpt/ every round; the optional checkpoint argument resumes from it.
"""

import os
import signal
import sys
import warnings
from datetime import timedelta

warnings.filterwarnings("ignore")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers.fl_modules import MnistCNN, loaders  # noqa: E402

from lightning_qmlhfl import QSGD, Hierarchy, QMLHFLDDPStrategy, QMLHFLStrategy, TopK  # noqa: E402
from lightning_qmlhfl.data import Dirichlet  # noqa: E402


class Faulty(MnistCNN):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        rank = self.trainer.global_rank
        if MODE == "nan" and self.trainer.global_step == 5 and rank == 1:
            loss = loss * float("nan")
        if MODE == "kill" and self.trainer.current_epoch == 2 and batch_idx == 1 and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss


MODE = ""


def main():
    global MODE
    out, kind = sys.argv[1], sys.argv[2]
    ckpt_mode = sys.argv[3] if kind == "ddp" else "full"
    rest = sys.argv[4:] if kind == "ddp" else sys.argv[3:]
    MODE = rest[0] if rest and rest[0] in ("nan", "kill") else ""
    resume = rest[0] if rest and rest[0].endswith(".ckpt") else None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sim = dict(hierarchy=Hierarchy.balanced([2, 2, 3]), taus=[2, 2, 1],
               compressors=[TopK(ratio=0.2, error_feedback="ef"), QSGD(8, bucket_size=None), QSGD(16, bucket_size=None)],
               partition=Dirichlet(alpha=0.5, min_samples=5), seed=7, executor="loop")
    if kind == "single":
        strategy = QMLHFLStrategy(device_rng="stream", **sim)
        devices = 1
    else:
        strategy = QMLHFLDDPStrategy(checkpoint=ckpt_mode, timeout=timedelta(seconds=30), **sim)
        devices = 2
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_last=True, save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_epochs=4, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt],
                        num_sanity_val_steps=0)
    model = Faulty(lr=0.05, dropout=0.3)
    train_dl, val_dl = loaders(n_train=600, n_val=200, batch_size=8)
    trainer.fit(model, train_dl, val_dl, ckpt_path=resume)
    sd = strategy.engine.global_state_dict()
    if trainer.global_rank == 0:
        torch.save({"engine": sd, "history": strategy.history,
                    "val_acc": float(trainer.callback_metrics["val_acc"]),
                    "train_loss": float(trainer.callback_metrics["train_loss"])}, os.path.join(out, "final.pt"))


if __name__ == "__main__":
    main()
