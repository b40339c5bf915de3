"""ib: train classifiers under an Information Bottleneck, with I(X;Z) estimated by MINE."""

__version__ = "0.1.0"
