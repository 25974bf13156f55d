"""The plugin module pyramidkd loads through the ``pyramidkd`` entry point
(``nkd = "pyramidkd_dkd.plugin"`` in pyproject.toml): one hook per component kind."""

from __future__ import annotations

from pyramidkd.engine import hookimpl

from .loss import NKDLoss
from .scheme import NKDScheme


@hookimpl
def pyramidkd_register_losses():
    return [NKDLoss]


@hookimpl
def pyramidkd_register_schemes():
    return [NKDScheme]
