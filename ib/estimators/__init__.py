"""Mutual-information estimators: critic-based lower bounds on I(X;Z)."""
from ib.estimators.base import ESTIMATORS, MIEstimator, dv_bound, log_mean_exp
from ib.estimators.estimate import estimate_mi
from ib.estimators.mine import MINE, MINEf

__all__ = ["ESTIMATORS", "MIEstimator", "MINE", "MINEf", "dv_bound", "log_mean_exp", "estimate_mi"]
