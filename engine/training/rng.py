"""Seeding, and every RNG state a resumed stage needs to continue exactly."""

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


def rng_states(generator: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loader": generator.get_state(),
    }


def restore_rng_states(states: dict, generator: torch.Generator | None) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None:
        generator.set_state(states["loader"])
