"""Byzantine robustness for the hierarchy's aggregations (docs/robustness.md): robust aggregators over segments of
stacked rows (:mod:`.aggregators`; the median and trimmed-mean kernels are in :mod:`lightning_qmlhfl.kernels.robust`)
and the attacks they are tested against (:mod:`.attacks`)."""

from .aggregators import (ROBUST_AGGREGATORS, ROBUST_FAMILY, CenteredClipping, CoordinateMedian, GeometricMedian,
                          Krum, Mean, RobustAggregator, RobustResult, TrimmedMean, layer_robust_aggregators,
                          make_robust_aggregator)
from .attacks import (ALIE, ATTACK_FAMILY, ATTACKS, Attack, GaussianAttack, LabelFlip, NoAttack, SignFlip,
                      alie_z_max, flip_labels, layer_attacks, make_attack)

__all__ = ["RobustResult", "RobustAggregator", "Mean", "CoordinateMedian", "TrimmedMean", "Krum", "GeometricMedian",
           "CenteredClipping", "ROBUST_AGGREGATORS", "ROBUST_FAMILY", "make_robust_aggregator",
           "layer_robust_aggregators", "Attack", "NoAttack", "SignFlip", "GaussianAttack", "ALIE", "LabelFlip",
           "ATTACKS", "ATTACK_FAMILY", "make_attack", "layer_attacks", "flip_labels", "alie_z_max"]
