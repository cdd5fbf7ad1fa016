"""The strategies for the standalone ``pytorch_lightning`` package (``import pytorch_lightning as pl``), which many
tutorials and older projects use: the same simulation as :mod:`lightning_qmlhfl.strategy`, as subclasses of
``pytorch_lightning``'s own strategy classes, for its Trainer, its LightningModules and its callbacks::

    import pytorch_lightning as pl
    from lightning_qmlhfl.pytorch_lightning import QMLHFLStrategy

    pl.Trainer(strategy=QMLHFLStrategy(hierarchy=..., taus=...))   # or pl.Trainer(strategy="qmlhfl")

Importing :mod:`lightning_qmlhfl` imports this module when ``pytorch_lightning`` is installed, so that the names
``"qmlhfl"``, ``"qmlhfl_ddp"``, ... are registered with ``pytorch_lightning``'s strategy registry too.
"""

from __future__ import annotations

from .strategy.ddp import ddp_strategy
from .strategy.flavor import lightning_api
from .strategy.single import single_strategy

__all__ = ["QMLHFLStrategy", "QMLHFLDDPStrategy"]

_API = lightning_api("pytorch_lightning")
QMLHFLStrategy = single_strategy(_API, __name__)
QMLHFLDDPStrategy = ddp_strategy(_API, __name__)
for _cls in (QMLHFLStrategy, QMLHFLDDPStrategy):
    _cls.register_strategies(_API.StrategyRegistry)
