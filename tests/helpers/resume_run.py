"""Subprocess for the kill-and-resume test.

    python resume_run.py OUT_DIR full            # uninterrupted run, writes final.pt
    python resume_run.py OUT_DIR kill KILL_STEP  # SIGKILLs itself at global step KILL_STEP (mid-round)
    python resume_run.py OUT_DIR resume          # resumes from OUT_DIR/ckpt/last.ckpt, writes final.pt
"""

import os
import signal
import sys
import warnings

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers.fl_modules import MnistCNN, loaders  # noqa: E402

from lightning_qmlhfl import QSGD, Hierarchy  # noqa: E402
from lightning_qmlhfl.data import Dirichlet  # noqa: E402
from lightning_qmlhfl.strategy import QMLHFLStrategy  # noqa: E402


class KillAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    out, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = MnistCNN(lr=0.05, dropout=0.3)  # dropout: the per-device masks must resume identically too
    strategy = QMLHFLStrategy(hierarchy=Hierarchy.balanced([2, 2]), taus=[2, 2], quantizers=[QSGD(4, bucket_size=None), QSGD(8, bucket_size=None)],
                              partition=Dirichlet(alpha=0.5, min_samples=5), seed=11, executor="vmap")
    ckpt = ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), save_last=True, save_top_k=-1, every_n_epochs=1)
    callbacks = [ckpt] + ([KillAt(int(sys.argv[3]))] if mode == "kill" else [])
    trainer = L.Trainer(strategy=strategy, max_epochs=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0)
    train_dl, val_dl = loaders(n_train=800, n_val=200, batch_size=8)
    ckpt_path = os.path.join(out, "ckpt", "last.ckpt") if mode == "resume" else None
    trainer.fit(model, train_dl, val_dl, ckpt_path=ckpt_path)
    torch.save({"cloud": strategy.engine.cloud_params().clone(), "devices": strategy.engine.state.params[0].clone(),
                "history": strategy.history}, os.path.join(out, "final.pt"))


if __name__ == "__main__":
    main()
