"""Reading a checkpoint as data, never code.

Every file is read with ``torch.load(..., weights_only=True)``, whose unpickler builds
tensors, containers and numbers and refuses any other Python global before anything
runs. What pyramidkd writes is plain data (the RNG states too, see :mod:`.rng`). The
one allowance is NumPy's uint32 array, the shape in which pyramidkd 0.1.0 stored
``np.random.get_state()``, so 0.1.0 checkpoints read as they are
(:func:`legacy_globals`). A file that asks for more is refused with the globals it
names (:func:`refusal`), found without running it (:func:`unsafe_globals`);
``pyramidkd convert-checkpoint --trust`` (:mod:`.sharing`) rewrites one the user
vouches for, never one that asks for :func:`never_trusted` globals.
"""

from __future__ import annotations

import pickle
import pickletools
import re
from typing import Any

import torch

from ..errors import CheckpointError, UnsafeCheckpointError

WEIGHTS_ONLY_FAILURE = "Weights only load failed"
# Never allowed, not even with --trust: no checkpoint needs them, and they are how
# a pickle payload runs a command (a module prefix, or one builtin).
NEVER_TRUSTED_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pickle",
                         "_pickle", "marshal", "code", "codeop", "pty", "ctypes", "multiprocessing", "webbrowser", "http",
                         "urllib", "pydoc", "timeit", "platform")
NEVER_TRUSTED_BUILTINS = {"eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open", "input",
                          "breakpoint", "globals", "locals", "vars", "exit", "quit", "help"}


def read_data_only(path: str, extra_globals: list | None = None) -> Any:
    """``torch.load`` weights-only (plus the 0.1.0 NumPy allowance and ``extra_globals``)."""
    try:
        with torch.serialization.safe_globals(legacy_globals() + list(extra_globals or [])):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if WEIGHTS_ONLY_FAILURE in message and (_asks_for_objects(message) or unsafe_globals(path)):
            refused = refusal(path, error)
            refused.torch_message = message  # what convert-checkpoint --trust reads the next global from
            raise refused from None
        raise _corrupt(path, error) from error  # not a pickle torch can read: garbage or truncated
    except Exception as error:  # torch raises many types for truncated/corrupt files
        raise _corrupt(path, error) from error


def _asks_for_objects(message: str) -> bool:
    """torch refused a global or a class to build (not an unreadable byte)."""
    return "GLOBAL" in message or "Can only build" in message or "allowed global" in message


def legacy_globals() -> list:
    """What a 0.1.0 ``last.pt`` needs beyond plain data: NumPy's uint32 array (its
    ``np.random.get_state()``), under both module paths NumPy has used."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed: list = [(_reconstruct, "numpy.core.multiarray._reconstruct"), (_reconstruct, "numpy._core.multiarray._reconstruct"),
                     np.ndarray, np.dtype]
    if hasattr(np, "dtypes"):  # numpy >= 1.25 builds the dtype from its class
        allowed.append(np.dtypes.UInt32DType)
    return allowed


def unsafe_globals(path: str, error: BaseException | None = None) -> list[str]:
    """The Python globals (``module.name``) a checkpoint asks for beyond what a
    weights-only load allows, found without running anything: a static read of the
    file's pickle opcodes (as ``torch.serialization.get_unsafe_globals_in_checkpoint``
    does for ``torch.save`` zip files), else torch's refusal message."""
    try:
        with torch.serialization.safe_globals(legacy_globals()):
            found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip file: an old-style torch file or a bare pickle
        found = sorted(_pickle_globals(path) - _allowed_global_names())
    if not found and error is not None:
        found = re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]
    return found


def _pickle_globals(path: str, limit: int = 8) -> set[str]:
    """Every GLOBAL / STACK_GLOBAL named by the (up to ``limit`` concatenated)
    pickles of a file, read with :mod:`pickletools` (which never runs them)."""
    names: set[str] = set()
    try:
        with open(path, "rb") as handle:
            for _ in range(limit):
                strings: list[str] = []
                for opcode, arg, _position in pickletools.genops(handle):
                    if opcode.name == "GLOBAL":
                        names.add(_python3_name(*str(arg).split(" ", 1)))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.add(_python3_name(strings[-2], strings[-1]))
                    elif isinstance(arg, str):
                        strings.append(arg)
                if not handle.peek(1):  # the end of the file
                    break
    except Exception:  # the rest of the file is tensor bytes, or not a pickle at all
        pass
    return names


def _python3_name(module: str, name: str) -> str:
    """``__builtin__ exec`` (protocol 2) as the unpickler resolves it: ``builtins.exec``."""
    import _compat_pickle

    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _allowed_global_names() -> set[str]:
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals()) | set(_weights_only_unpickler._get_user_allowed_globals())
    except Exception:  # private API moved: report every global named
        return set()


def refusal(path: str, error: BaseException | None = None) -> UnsafeCheckpointError:
    names = unsafe_globals(path, error)
    if names:
        what = f"it asks for the Python global{'s' if len(names) > 1 else ''} {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
    else:
        detail = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if error is not None else ""
        what = f"it needs Python objects beyond tensors and plain data ({detail})"
    if any(never_trusted(name) for name in names):
        fix = "delete it: a file that asks for this is a program, not a checkpoint; ask for a .safetensors file instead"
    else:
        fix = (f"if you trust where it comes from, rewrite it as plain data: pyramidkd convert-checkpoint {path} --trust "
               "(or ask its author for a .safetensors file from `pyramidkd save-weights`)")
    return UnsafeCheckpointError(
        f"refused: {what}; a checkpoint is read as data only, and this one would run code or build objects while loading",
        file=path, fix=fix)


def never_trusted(name: str) -> bool:
    """A global only a program asks for (``builtins.exec``, ``os.system``, ...)."""
    module, _, attribute = name.rpartition(".")
    if module in ("builtins", "__builtin__"):
        return attribute in NEVER_TRUSTED_BUILTINS
    return any(module == m or module.startswith(m + ".") for m in NEVER_TRUSTED_MODULES)


def _corrupt(path: str, error: BaseException) -> CheckpointError:
    text = str(error)
    if WEIGHTS_ONLY_FAILURE in text:  # torch's advice (load it unrestricted) is not ours: its reason only
        text = text.split("WeightsUnpickler error:")[-1].strip() if "WeightsUnpickler error:" in text else "not a pickle torch reads"
    first = text.splitlines()[0] if text else ""
    return CheckpointError(
        f"cannot read the checkpoint ({type(error).__name__}: {first}); the file is corrupt or truncated",
        file=path,
        fix="delete it and re-run the stage that writes it (pyramidkd run ... --force)",
    )
