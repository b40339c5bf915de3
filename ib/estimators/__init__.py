"""Mutual-information estimators: critic-based lower bounds on I(X;Z), and the upper bounds of Gaussian encoders
(VIB's KL against N(0, I), the nonlinear IB's pairwise KL).

Registered in ESTIMATORS (the recipe's `mi.estimator`): mine, mine_f, infonce, smile, jsd, vib_kl, pairwise_kl.
"""
from ib.estimators.base import (ESTIMATORS, CeilingWarning, CriticEstimator, MIEstimate, MIEstimator, dv_bound,
                                exp_capped, jackknife_se, log_mean_exp)
from ib.estimators.estimate import estimate_mi, estimate_mi_population
from ib.estimators.infonce import InfoNCE, infonce_bound
from ib.estimators.jsd import JSD, js_objective
from ib.estimators.mine import MINE, MINEf
from ib.estimators.population import CriticPopulation
from ib.estimators.pairwise import PairwiseKL, pairwise_bound
from ib.estimators.smile import SMILE, clipped_dv
from ib.estimators.vib import VariationalKL, gaussian_kl

__all__ = ["ESTIMATORS", "MIEstimator", "MIEstimate", "CeilingWarning", "jackknife_se", "CriticEstimator", "MINE",
           "MINEf", "InfoNCE", "SMILE", "JSD", "VariationalKL", "dv_bound", "exp_capped", "log_mean_exp",
           "infonce_bound", "js_objective", "clipped_dv", "gaussian_kl", "estimate_mi", "estimate_mi_population",
           "CriticPopulation", "PairwiseKL", "pairwise_bound"]
