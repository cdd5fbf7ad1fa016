"""A Lightning callback that SIGKILLs its own process at a given global step (for kill-and-resume tests):
``trainer.callbacks=[{_target_:helpers.kill.KillAt,step:7}]`` on a recipe's command line."""

import os
import signal

import lightning as L


class KillAt(L.Callback):
    """SIGKILL the process right after local step ``step`` (1-based: ``trainer.global_step == step``)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
