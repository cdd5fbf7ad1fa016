"""The Lightning layer: :class:`QMLHFLStrategy` trains an unmodified LightningModule as QMLHFL (see :mod:`.single`);
:class:`QMLHFLDDPStrategy` spreads the same simulation over processes (see :mod:`.ddp`)."""

from .ddp import QMLHFLDDPStrategy
from .single import QMLHFLStrategy

__all__ = ["QMLHFLStrategy", "QMLHFLDDPStrategy"]
