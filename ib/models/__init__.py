"""Models: encoders, stochastic bottlenecks, MINE critics and the IB classifier."""
from ib.models.bottlenecks import BOTTLENECKS, Bottleneck, Code
from ib.models.classifier import IBClassifier, build_classifier
from ib.models.critics import CRITICS, Critic
from ib.models.encoders import ENCODERS

__all__ = [
    "BOTTLENECKS",
    "CRITICS",
    "ENCODERS",
    "Bottleneck",
    "Code",
    "Critic",
    "IBClassifier",
    "build_classifier",
]
