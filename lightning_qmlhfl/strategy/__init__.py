"""The Lightning layer: :class:`QMLHFLStrategy` trains an unmodified LightningModule as QMLHFL (see :mod:`.single`);
:class:`QMLHFLDDPStrategy` spreads the same simulation over processes (see :mod:`.ddp`). Importing this package
registers their names (``"qmlhfl"``, ``"qmlhfl_ddp"``, ``"qmlhfl_ddp_spawn"``, ``"qmlhfl_ddp_notebook"``) with
``lightning.pytorch``'s strategy registry; :mod:`lightning_qmlhfl.pytorch_lightning` does the same for the standalone
``pytorch_lightning`` package."""

from .ddp import QMLHFLDDPStrategy
from .flavor import lightning_api
from .single import QMLHFLStrategy

__all__ = ["QMLHFLStrategy", "QMLHFLDDPStrategy"]

for _cls in (QMLHFLStrategy, QMLHFLDDPStrategy):
    _cls.register_strategies(lightning_api("lightning.pytorch").StrategyRegistry)
