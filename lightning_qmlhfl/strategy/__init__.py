"""The Lightning layer: :class:`QMLHFLStrategy` trains an unmodified LightningModule as QMLHFL (see :mod:`.single`)."""

from .single import QMLHFLStrategy

__all__ = ["QMLHFLStrategy"]
