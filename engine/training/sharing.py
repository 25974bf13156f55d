"""Files to share and files from others: a stage's best weights as ``.safetensors``
(:func:`save_stage_weights`, ``pyramidkd save-weights``) and a checkpoint the user
vouches for rewritten as plain data (:func:`convert_checkpoint`,
``pyramidkd convert-checkpoint FILE --trust``)."""

from __future__ import annotations

import collections
import importlib
import os
import re
import tomllib
from typing import Any

import attrs
import torch

from ..errors import CheckpointError, RunDirectoryError, UnsafeCheckpointError
from ..rundir import RECIPE_FILE, RunDirectory
from .checkpoints import SAFETENSORS_SUFFIX, check_checkpoint, load_checkpoint, save_checkpoint
from .rng import plain_rng_states
from .safe_load import never_trusted, read_data_only, refusal, unsafe_globals
from .weights import weights_description, write_weights

WEIGHTS_FOLDER = "weights"
PRIVATE_DATASET_KEYS = ("root", "path", "data_dir", "cache_dir")  # local paths stay local


@attrs.define
class SavedWeights:
    path: str
    description_path: str
    description: dict


@attrs.define
class Conversion:
    source: str
    output: str
    allowed: list[str]  # the globals allowed for the one trusted read (empty: it read as data already)


# --- save-weights ------------------------------------------------------------------


def save_stage_weights(run_dir: str, stage_id: str, output: str | None = None) -> SavedWeights:
    """Write the best weights of stage ``stage_id`` of the run in ``run_dir`` as
    ``.safetensors`` (default ``RUN_DIR/weights/<stage>.safetensors``) with its model
    description and preprocessing as JSON (in the file's metadata and beside it)."""
    directory = RunDirectory(os.path.abspath(run_dir))
    best = directory.checkpoint(stage_id, "best")
    if not os.path.exists(best):
        folder = directory.file("checkpoints")
        stages = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        raise RunDirectoryError(f"no best checkpoint for stage {stage_id!r} (looked at {best})", file=run_dir,
                                fix=f"name one of the run's stages: {', '.join(stages)}" if stages else "give the folder of a run")
    checkpoint = load_checkpoint(best)
    path = _weights_path(directory, stage_id, output)
    description = weights_description(checkpoint, run_preprocessing(directory, checkpoint))
    beside = write_weights(path, checkpoint["state_dict"], description)
    return SavedWeights(path, beside, description)


def _weights_path(directory: RunDirectory, stage_id: str, output: str | None) -> str:
    if output is None:
        return directory.file(WEIGHTS_FOLDER, f"{stage_id}{SAFETENSORS_SUFFIX}")
    if os.path.isdir(output):
        return os.path.join(output, f"{stage_id}{SAFETENSORS_SUFFIX}")
    if not output.endswith(SAFETENSORS_SUFFIX):
        raise CheckpointError(f"--output must end with {SAFETENSORS_SUFFIX} (or be a folder)", file=output,
                              fix=f"e.g. --output {os.path.splitext(output)[0]}{SAFETENSORS_SUFFIX}")
    return output


def run_preprocessing(directory: RunDirectory, checkpoint: dict) -> dict[str, Any]:
    """What a user of the weights must feed them, as far as the run tells: the data set
    and its settings (from the run's recipe), the input shape, mean/std (the recipe's,
    else the data set's published ones) and the class names the run trained on."""
    model = checkpoint["model"]
    info: dict[str, Any] = {"input_shape": list(model["input_shape"]), "num_classes": model["num_classes"]}
    dataset = _recipe_dataset(directory.file(RECIPE_FILE))
    if dataset:
        name = dataset.get("name")
        params = {k: v for k, v in dataset.items() if k != "name" and k not in PRIVATE_DATASET_KEYS}
        info.update({"dataset": name, "dataset_params": params})
        stats = (params.get("mean"), params.get("std")) if params.get("mean") is not None else _published_stats(name)
        if stats is not None:
            info.update({"mean": [float(v) for v in stats[0]], "std": [float(v) for v in stats[1]]})
    if checkpoint.get("class_names"):
        info["class_names"] = list(checkpoint["class_names"])
    # what the run recorded (engine/deploy/preprocessing.py) beats what the recipe implies
    info.update({k: v for k, v in (checkpoint.get("preprocessing") or {}).items() if v is not None})
    return info


def _recipe_dataset(path: str) -> dict:
    try:
        with open(path, "rb") as handle:
            dataset = tomllib.load(handle).get("dataset")
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return {"name": dataset} if isinstance(dataset, str) else dict(dataset or {})


def _published_stats(name: str | None):
    """A data set class's ``stats`` (mean, std), from the installed plugins (the run's
    recipe plugin modules are not imported: reading a run folder runs no code from it)."""
    from ..host import make_plugin_host

    try:
        stats = getattr(make_plugin_host().registry("dataset").get(name), "stats", None)
    except Exception:  # an unknown or plugin-provided data set: no stats known
        return None
    ok = isinstance(stats, (tuple, list)) and len(stats) == 2 and all(isinstance(s, (tuple, list)) for s in stats)
    return stats if ok else None


# --- convert-checkpoint ------------------------------------------------------------


def convert_checkpoint(path: str, *, trust: bool, output: str | None = None) -> Conversion:
    """Rewrite ``path`` (to ``output``, default in place) as plain data that reads
    weights-only. A file that needs Python globals is read only with ``trust``, with
    exactly those globals allowed (never the ones a payload uses)."""
    if not os.path.exists(path):
        raise CheckpointError("checkpoint file not found", file=path, fix="check the path")
    names = unsafe_globals(path)
    never = [name for name in names if never_trusted(name)]
    if never:
        raise UnsafeCheckpointError(
            f"refused, even with --trust: it asks for {', '.join(never)}, which runs code; no checkpoint needs it",
            file=path, fix="delete the file: it is not a checkpoint but a program; ask its author for a .safetensors file")
    if names and not trust:
        raise refusal(path)
    allowed = [_resolve_global(name, path) for name in names]
    checkpoint = _plain(_read_trusted(path, allowed, names, trust), "", path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("rng"), dict):
        checkpoint["rng"] = plain_rng_states(checkpoint["rng"])
    check_checkpoint(checkpoint, path)
    target = output or path
    save_checkpoint(target, {k: v for k, v in checkpoint.items() if k != "format"})
    left = torch.serialization.get_unsafe_globals_in_checkpoint(target)
    if left:  # cannot happen for plain data; a guard, not a path
        raise CheckpointError(f"the rewritten file still needs {', '.join(left)}", file=target, fix="report this as a bug")
    return Conversion(path, target, names)


def _read_trusted(path: str, allowed: list, names: list[str], trust: bool) -> Any:
    """Read with ``allowed``; with ``trust``, a class the pickle builds without naming
    it as a GLOBAL (a NumPy dtype class) is allowed too, one at a time."""
    for _ in range(16):
        try:
            return read_data_only(path, allowed)
        except UnsafeCheckpointError as error:
            found = re.findall(r"got <class '([\w.]+)'>|GLOBAL ([\w.]+)", getattr(error, "torch_message", ""))
            name = next((a or b for a, b in found), None)
            if not trust or name is None or name in names or never_trusted(name):
                raise
            names.append(name)
            allowed.append(_resolve_global(name, path))
    raise refusal(path)


def _resolve_global(name: str, path: str):
    """The object ``module.qualname`` names, imported (the user vouched for the file)."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                value = getattr(value, attribute)
        except AttributeError:
            break
        return (value, name)
    raise CheckpointError(f"the file asks for {name}, which cannot be imported here", file=path,
                          fix="install the package that wrote the file, then run convert-checkpoint again")


def _plain(value: Any, key: str, path: str) -> Any:
    """``value`` as tensors, containers, numbers and strings (NumPy arrays become
    tensors, NumPy scalars numbers); anything else names its key and is refused."""
    import numpy as np

    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, dict):  # OrderedDict, defaultdict, Counter: plain dicts
        return {k: _plain(v, f"{key}.{k}" if key else str(k), path) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        items = [_plain(v, f"{key}[{i}]", path) for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) and not hasattr(value, "_fields") else items
    if isinstance(value, np.ndarray) and value.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(value))
    raise CheckpointError(f"key {key or '(the file)'} holds a {type(value).__module__}.{type(value).__qualname__} object, "
                          "which is not plain data; convert-checkpoint rewrites tensors, containers, numbers and NumPy values",
                          file=path, fix="re-save that entry as tensors or numbers with the tool that wrote the file")
