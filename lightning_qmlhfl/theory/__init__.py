"""The paper's theory as tools: the learning-rate condition (:mod:`.convergence`, Theorem 1 / Eq. 15), the
latency model of one global round (:mod:`.latency`), the deadline-aware tau planner (:mod:`.planner`), the energy
model (:mod:`.energy`) and the constants measured on a run (:mod:`.measured`).

The convergence API is re-exported here (``from lightning_qmlhfl.theory import check_learning_rate``).
"""

from .convergence import *  # noqa: F401,F403
from .convergence import __all__ as _convergence_all

__all__ = list(_convergence_all)
