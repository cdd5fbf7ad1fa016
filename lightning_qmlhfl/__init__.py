"""lightning-qmlhfl: multi-layer hierarchical federated learning with quantization, as a Lightning strategy.

``import lightning_qmlhfl`` imports Lightning and registers the strategy names ``"qmlhfl"``, ``"qmlhfl_ddp"``,
``"qmlhfl_ddp_spawn"`` and ``"qmlhfl_ddp_notebook"`` with its strategy registry, so ``Trainer(strategy="qmlhfl")``
works after it; when the standalone ``pytorch_lightning`` package is installed, with that package's registry too
(:mod:`lightning_qmlhfl.pytorch_lightning`).
"""

from __future__ import annotations

from .compressors import (QSGD, Compressor, Identity, NaturalCompression, NoQuantization, Quantizer, RandomK,
                          ScaledSign, TopK, make_compressor, make_quantizer, upload_bits)
from .data.partition import IID, Dirichlet, Shards
from .federation.availability import Availability, AvailabilityTrace
from .hierarchy import Hierarchy
from .federation.mobility import EdgeFailures, Markov, Mobility, RandomReassociation, Schedule, Static
from .federation.participation import Bernoulli, Fraction, Full, Participation, UniformK
from .optimizers.local_solvers import ADMM, FedProx, LocalSGD, LocalSolver, Scaffold
from .optimizers.server import Average, FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
from .theory.latency import LatencyModel
from .config import LayerConfig, SimulationConfig
from .simulation.engine import QMLHFLEngine
from .strategy import QMLHFLDDPStrategy, QMLHFLStrategy
from .strategy.flavor import installed as _installed
from .strategy.integrity import CorruptCheckpointError

__version__ = "0.1.0"

__all__ = ["Hierarchy", "Compressor", "QSGD", "TopK", "RandomK", "ScaledSign", "NaturalCompression", "Identity",
           "NoQuantization", "Quantizer", "make_compressor", "make_quantizer", "upload_bits", "IID", "Dirichlet",
           "Shards", "ServerOptimizer", "Average", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "Participation",
           "Full", "Fraction", "UniformK", "Bernoulli", "Availability", "AvailabilityTrace", "LatencyModel",
           "Mobility", "Static", "RandomReassociation", "Markov", "Schedule", "EdgeFailures", "SimulationConfig",
           "LayerConfig", "LocalSolver", "LocalSGD", "FedProx", "Scaffold", "ADMM", "QMLHFLEngine", "QMLHFLStrategy", "QMLHFLDDPStrategy", "CorruptCheckpointError"]

if _installed("pytorch_lightning"):
    from . import pytorch_lightning as _pytorch_lightning  # noqa: F401  (registers "qmlhfl" there too)
