"""lightning-qmlhfl: multi-layer hierarchical federated learning with quantization, as a Lightning strategy."""

from .hierarchy import Hierarchy
from .quantizers import QSGD, NoQuantization, Quantizer, make_quantizer

__all__ = ["Hierarchy", "QSGD", "NoQuantization", "Quantizer", "make_quantizer"]
__version__ = "0.1.0"
