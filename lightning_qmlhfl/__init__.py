"""lightning-qmlhfl: multi-layer hierarchical federated learning with quantization, as a Lightning strategy.

``import lightning_qmlhfl`` does not import Lightning: the Lightning-level names (:class:`QMLHFLStrategy`,
:class:`QMLHFLDDPStrategy`) are lazy attributes, imported on first use. The strategy names ``"qmlhfl"``,
``"qmlhfl_ddp"``, ``"qmlhfl_ddp_spawn"`` and ``"qmlhfl_ddp_notebook"`` are registered with Lightning's
``StrategyRegistry`` as soon as both this package and ``lightning.pytorch`` are imported, in either order, so
``Trainer(strategy="qmlhfl")`` works after ``import lightning_qmlhfl``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from .compressors import (QSGD, Compressor, Identity, NaturalCompression, NoQuantization, Quantizer, RandomK,
                          ScaledSign, TopK, make_compressor, make_quantizer, upload_bits)
from .data.partition import IID, Dirichlet, Shards
from .federation.availability import Availability, AvailabilityTrace
from .hierarchy import Hierarchy
from .federation.mobility import EdgeFailures, Markov, Mobility, RandomReassociation, Schedule, Static
from .federation.participation import Bernoulli, Fraction, Full, Participation, UniformK
from .optimizers.server import Average, FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
from .theory.latency import LatencyModel

__version__ = "0.1.0"

_LAZY = {"QMLHFLStrategy": ".strategy", "QMLHFLDDPStrategy": ".strategy"}

__all__ = ["Hierarchy", "Compressor", "QSGD", "TopK", "RandomK", "ScaledSign", "NaturalCompression", "Identity",
           "NoQuantization", "Quantizer", "make_compressor", "make_quantizer", "upload_bits", "IID", "Dirichlet",
           "Shards", "ServerOptimizer", "Average", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "Participation",
           "Full", "Fraction", "UniformK", "Bernoulli", "Availability", "AvailabilityTrace", "LatencyModel",
           "Mobility", "Static", "RandomReassociation", "Markov", "Schedule", "EdgeFailures", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _register_strategies() -> None:
    importlib.import_module(".strategy", __name__)  # registers "qmlhfl" on import


class _AfterLightning(importlib.abc.MetaPathFinder):
    """Registers the strategies right after ``lightning.pytorch`` has finished importing (if it is imported after
    this package): wraps that one module's loader, then removes itself."""

    target = "lightning.pytorch"

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register_strategies()

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "lightning.pytorch" in sys.modules:
    _register_strategies()
elif not any(isinstance(f, _AfterLightning) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterLightning())
