"""The two Lightning packages the strategies work with: ``lightning`` (``lightning.pytorch``) and the standalone
``pytorch_lightning`` that many tutorials still import. They carry the same code under two names, with separate
classes: a strategy for one package's Trainer must derive from that package's Strategy classes, and the registry
behind ``Trainer(strategy="qmlhfl")`` is the package's own. :class:`LightningAPI` holds the names the strategies
use from one package; :mod:`.single` and :mod:`.ddp` build their classes from it."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["LightningAPI", "PACKAGES", "installed", "lightning_api"]

PACKAGES = ("lightning.pytorch", "pytorch_lightning")


@dataclass(frozen=True)
class LightningAPI:
    """The names the QMLHFL strategies use from one Lightning package (``package``)."""

    package: str
    SingleDeviceStrategy: type
    DDPStrategy: type
    StrategyRegistry: Any
    RunningStage: Any
    Precision: type
    MixedPrecision: type
    HalfPrecision: type
    DoublePrecision: type
    is_overridden: Callable[..., bool]

    @classmethod
    def load(cls, package: str) -> "LightningAPI":
        if package not in PACKAGES:
            raise ValueError(f"package must be one of {PACKAGES}, got {package!r}")
        strategies = importlib.import_module(f"{package}.strategies")
        precision = importlib.import_module(f"{package}.plugins.precision")
        return cls(
            package=package,
            SingleDeviceStrategy=strategies.SingleDeviceStrategy,
            DDPStrategy=strategies.DDPStrategy,
            StrategyRegistry=strategies.StrategyRegistry,
            RunningStage=importlib.import_module(f"{package}.trainer.states").RunningStage,
            Precision=precision.Precision,
            MixedPrecision=precision.MixedPrecision,
            HalfPrecision=precision.HalfPrecision,
            DoublePrecision=precision.DoublePrecision,
            is_overridden=importlib.import_module(f"{package}.utilities.model_helpers").is_overridden,
        )

    def supported_precision(self, plugin: object) -> bool:
        """Whether the strategies honour this precision plugin (fp32, fp64, half or mixed precision)."""
        return type(plugin) is self.Precision or isinstance(
            plugin, (self.MixedPrecision, self.HalfPrecision, self.DoublePrecision))

    def scaler(self, plugin: object) -> Any:
        """The mixed-precision GradScaler of a precision plugin, or None."""
        return plugin.scaler if isinstance(plugin, self.MixedPrecision) else None


def installed(package: str) -> bool:
    """Whether ``package`` (a top-level name, e.g. "pytorch_lightning") can be imported here."""
    return importlib.util.find_spec(package) is not None


@functools.lru_cache(maxsize=None)
def lightning_api(package: str = "lightning.pytorch") -> LightningAPI:
    """The :class:`LightningAPI` of ``package`` (imported once)."""
    return LightningAPI.load(package)
