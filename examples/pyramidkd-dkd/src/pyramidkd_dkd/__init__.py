"""Normalized Knowledge Distillation (Yang et al., ICCV 2023) for pyramidkd.

Installs a loss ``nkd`` (:class:`~pyramidkd_dkd.loss.NKDLoss`) and a scheme
``nkd`` (:class:`~pyramidkd_dkd.scheme.NKDScheme`); pyramidkd finds them through
the ``pyramidkd`` entry point, which names :mod:`pyramidkd_dkd.plugin`.

(The distribution and this package keep their first name, ``pyramidkd-dkd``: they
used to add Decoupled KD, which pyramidkd now builds in as the ``dkd`` loss.)
"""

from .loss import NKDLoss, NKDParams, nkd_loss
from .scheme import NKDScheme

__version__ = "0.2.0"
__all__ = ["NKDLoss", "NKDParams", "NKDScheme", "nkd_loss"]
