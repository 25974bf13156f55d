"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022) for pyramidkd.

Installs a loss ``dkd`` (:class:`~pyramidkd_dkd.loss.DKDLoss`) and a scheme
``dkd`` (:class:`~pyramidkd_dkd.scheme.DKDScheme`); pyramidkd finds them through
the ``pyramidkd`` entry point, which names :mod:`pyramidkd_dkd.plugin`.
"""

from .loss import DKDLoss, DKDParams, dkd_loss, dkd_terms
from .scheme import DKDScheme

__version__ = "0.1.0"
__all__ = ["DKDLoss", "DKDParams", "DKDScheme", "dkd_loss", "dkd_terms"]
