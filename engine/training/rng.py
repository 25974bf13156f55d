"""Seeding, and every RNG state a resumed stage needs to continue exactly.

The states are plain data (tensors, ints, floats, strings), so a ``last``
checkpoint reads back weights-only (see :mod:`.checkpoints`): Python's and
NumPy's Mersenne-Twister words as int64 tensors, torch's states as the byte
tensors torch gives. The CUDA state is the process's own device's generator
(each rank restores it into its own device), so a torchrun checkpoint resumes
on fewer or more GPUs. :func:`restore_rng_states` also reads the shapes
pyramidkd 0.1.0 wrote (``random.getstate()`` and ``np.random.get_state()`` as
they are, ``torch.cuda.get_rng_state_all()``).
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_seed(seed: int, stage_id: str) -> int:
    # Depends on the stage id, not its position, so re-running or skipping
    # earlier stages leaves a stage's randomness unchanged.
    return zlib.crc32(f"{seed}:{stage_id}".encode()) & 0x7FFFFFFF


def rng_states(generator: torch.Generator, cuda_ranks: list[torch.Tensor] | None = None) -> dict:
    """``cuda_ranks``: every rank's CUDA generator state, in rank order (under torchrun,
    gathered by the caller), so that each rank of a resumed run gets its own back."""
    cuda = cuda_state()
    if cuda is not None and cuda_ranks is not None:
        cuda["ranks"] = cuda_ranks
    return {
        "python": python_state(),
        "numpy": numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "loader": generator.get_state(),
    }


def restore_rng_states(states: dict, generator: torch.Generator | None, rank: int = 0) -> None:
    restore_python_state(states["python"])
    restore_numpy_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    restore_cuda_state(states.get("cuda"), rank)
    if generator is not None:
        generator.set_state(states["loader"])


def python_state() -> dict:
    version, words, gauss_next = random.getstate()
    return {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next}


def restore_python_state(saved) -> None:
    if isinstance(saved, tuple):  # 0.1.0: random.getstate() as it is
        random.setstate(saved)
        return
    random.setstate((saved["version"], tuple(saved["state"].tolist()), saved["gauss_next"]))


def numpy_state() -> dict:
    key, words, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"key": str(key), "state": torch.from_numpy(words.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def restore_numpy_state(saved) -> None:
    if isinstance(saved, tuple):  # 0.1.0: np.random.get_state() as it is (a uint32 ndarray inside)
        np.random.set_state(saved)
        return
    words = saved["state"].numpy().astype(np.uint32)
    np.random.set_state((saved["key"], words, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]))


def cuda_state() -> dict | None:
    """This process's own CUDA generator (the current device's), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    return {"device": device, "state": torch.cuda.get_rng_state(device)}


def restore_cuda_state(saved, rank: int = 0) -> None:
    """Set this process's current device's generator: rank r takes the state rank r
    saved; a rank the saving run did not have (more GPUs now), or a file without the
    ranks' states, takes the saving process's own (every rank draws from the same
    stage seed, so they differ only where per-rank batch sizes did)."""
    if saved is None or not torch.cuda.is_available():
        return
    if isinstance(saved, (list, tuple)):  # 0.1.0: rank 0's get_rng_state_all(); device 0 was rank 0's own
        if not saved:
            return
        state = saved[0]
    else:
        ranks = saved.get("ranks") or []
        state = ranks[rank] if rank < len(ranks) else saved["state"]
    torch.cuda.set_rng_state(state, torch.cuda.current_device())


def plain_rng_states(states: dict) -> dict:
    """0.1.0's RNG shapes (tuples with a NumPy array, a list of CUDA states) as the
    plain data :func:`rng_states` writes today; other entries as they are."""
    plain = dict(states)
    if isinstance(states.get("python"), tuple):
        version, words, gauss_next = states["python"]
        plain["python"] = {"version": int(version), "state": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next}
    if isinstance(states.get("numpy"), tuple):
        key, words, pos, has_gauss, cached_gaussian = states["numpy"]
        plain["numpy"] = {"key": str(key), "state": torch.from_numpy(np.asarray(words).astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    if isinstance(states.get("cuda"), (list, tuple)):
        plain["cuda"] = {"device": 0, "state": states["cuda"][0]} if states["cuda"] else None
    return plain
