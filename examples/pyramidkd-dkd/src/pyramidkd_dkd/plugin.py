"""The plugin module pyramidkd loads through the ``pyramidkd`` entry point
(``dkd = "pyramidkd_dkd.plugin"`` in pyproject.toml): one hook per component kind."""

from __future__ import annotations

from pyramidkd.engine import hookimpl

from .loss import DKDLoss
from .scheme import DKDScheme


@hookimpl
def pyramidkd_register_losses():
    return [DKDLoss]


@hookimpl
def pyramidkd_register_schemes():
    return [DKDScheme]
