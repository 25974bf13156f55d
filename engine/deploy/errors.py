"""The deploy errors: a model that cannot be exported, and the optional packages
(the ``deploy`` extra) that are not installed, with the command that installs them."""

from __future__ import annotations

import importlib.util
import os

from ..errors import UserError

DEPLOY_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class ExportError(UserError):
    """A model that cannot be exported or verified in the format asked for."""


def install_hint() -> str:
    """``pip install -e '.[deploy]'`` from a checkout (the venv's pip), else the published extra."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.exists(os.path.join(checkout, "pyproject.toml")) and os.path.isdir(os.path.join(checkout, "engine")):
        return f"from the checkout {checkout}: .venv/bin/pip install -e '.[deploy]'"
    return "pip install 'pyramidkd[deploy]'"


def require(*packages: str, purpose: str) -> None:
    """Raise a :class:`UserError` naming what is missing and the install command."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"{purpose} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed "
                        "(the optional 'deploy' extra)", fix=install_hint())

