"""The deploy errors: a model that cannot be exported, and the optional packages
(the ``deploy`` extra) that are not installed, with the command that installs them."""

from __future__ import annotations

import importlib.util

from ..errors import UserError
from ..errors import install_hint as install_extra

DEPLOY_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class ExportError(UserError):
    """A model that cannot be exported or verified in the format asked for."""


def install_hint() -> str:
    """The command that installs the ``deploy`` extra (the engine's one rule for extras)."""
    return install_extra("deploy")


def require(*packages: str, purpose: str) -> None:
    """Raise a :class:`UserError` naming what is missing and the install command."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"{purpose} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed "
                        "(the optional 'deploy' extra)", fix=install_hint())

