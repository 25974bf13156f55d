"""The RNG states a ``last`` checkpoint holds (engine/training/rng.py): plain data
that reads weights-only, restoring every generator exactly; the CUDA state is each
process's own device's generator (issue 19, item 7), so a torchrun checkpoint
resumes on fewer GPUs — tested without a GPU by mocking ``torch.cuda``."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from pyramidkd.engine.training import rng


def draws(generator: torch.Generator) -> tuple:
    return (random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), torch.rand(2).tolist(),
            torch.randint(0, 1000, (3,), generator=generator).tolist())


def weights_only_round_trip(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # no allowance at all


def test_the_states_are_plain_data_and_restore_every_generator():
    generator = torch.Generator().manual_seed(7)
    rng.seed_everything(11)
    random.gauss(0, 1)  # python's cached gaussian is part of the state
    np.random.randn()
    saved = weights_only_round_trip(rng.rng_states(generator))
    expected = draws(generator)
    rng.seed_everything(99)
    generator.manual_seed(99)
    rng.restore_rng_states(saved, generator)
    assert draws(generator) == expected


def legacy_states(generator: torch.Generator) -> dict:
    """What pyramidkd 0.1.0's rng_states returned (CUDA absent)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None,
            "loader": generator.get_state()}


def test_0_1_0_states_restore_as_they_are_and_convert_to_plain_data():
    generator = torch.Generator().manual_seed(3)
    rng.seed_everything(5)
    legacy = legacy_states(generator)
    expected = draws(generator)
    rng.restore_rng_states(legacy, generator)
    assert draws(generator) == expected
    plain = weights_only_round_trip(rng.plain_rng_states(legacy))
    rng.restore_rng_states(plain, generator)
    assert draws(generator) == expected


class FakeCuda:
    """torch.cuda as a process of a ``devices``-GPU machine sees it, on ``current``."""

    def __init__(self, monkeypatch, devices: int, current: int):
        self.devices, self.current, self.set_calls = devices, current, []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.devices)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        for name in ("get_rng_state_all", "set_rng_state_all"):  # every device's state is not this rank's to save or set
            monkeypatch.setattr(torch.cuda, name, lambda *a, name=name: pytest.fail(f"torch.cuda.{name} called"))

    def get_rng_state(self, device="cuda"):
        index = self.current if device == "cuda" else int(device)
        return torch.full((16,), index, dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        index = self.current if device == "cuda" else int(device)
        if index >= self.devices:
            raise IndexError(f"device {index} of {self.devices}")
        self.set_calls.append((index, state.clone()))


def test_each_rank_saves_and_restores_its_own_cuda_generator(monkeypatch):
    cuda = FakeCuda(monkeypatch, devices=4, current=0)  # rank 0 of a 4-GPU torchrun writes the checkpoint
    saved = weights_only_round_trip(rng.rng_states(torch.Generator()))
    assert saved["cuda"]["device"] == 0 and torch.equal(saved["cuda"]["state"], torch.zeros(16, dtype=torch.uint8))
    cuda.devices, cuda.current = 2, 1  # resumed with 2 GPUs: rank 1 sets its own device, nothing else
    rng.restore_rng_states(saved, torch.Generator())
    assert [index for index, _ in cuda.set_calls] == [1]
    assert torch.equal(cuda.set_calls[0][1], saved["cuda"]["state"])


def test_a_0_1_0_cuda_state_list_resumes_on_fewer_gpus(monkeypatch):
    """0.1.0 saved rank 0's get_rng_state_all() (4 GPUs); restoring all of them on
    2 GPUs raised IndexError. Now rank 0's own generator (device 0) goes into
    each rank's current device."""
    generator = torch.Generator()
    legacy = {**legacy_states(generator), "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]}
    cuda = FakeCuda(monkeypatch, devices=2, current=1)
    rng.restore_rng_states(legacy, generator)
    assert [index for index, _ in cuda.set_calls] == [1] and torch.equal(cuda.set_calls[0][1], legacy["cuda"][0])
    assert rng.plain_rng_states(legacy)["cuda"]["device"] == 0


def test_no_cuda_no_cuda_state(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rng.rng_states(torch.Generator())["cuda"] is None
    rng.restore_rng_states({**rng.rng_states(torch.Generator()), "cuda": {"device": 0, "state": torch.zeros(16)}}, None)


def test_every_ranks_cuda_state_is_saved_and_each_rank_resumes_its_own(monkeypatch):
    """Under torchrun, ranks' CUDA generators differ where their batch sizes did: the
    saving rank stores every rank's (gathered by the stage loop), each rank restores
    its own; a rank the saving run did not have takes the saver's."""
    cuda = FakeCuda(monkeypatch, devices=4, current=0)
    ranks = [torch.full((16,), 10 + r, dtype=torch.uint8) for r in range(3)]
    saved = weights_only_round_trip(rng.rng_states(torch.Generator(), cuda_ranks=ranks))
    for rank, expected in ((1, ranks[1]), (2, ranks[2]), (3, saved["cuda"]["state"])):
        cuda.set_calls.clear()
        cuda.current = rank
        rng.restore_rng_states(saved, torch.Generator(), rank)
        assert [index for index, _ in cuda.set_calls] == [rank] and torch.equal(cuda.set_calls[0][1], expected)


def _gather_worker(rank: int, size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from pyramidkd.engine.distributed import World, all_gather_tensors

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        parts = all_gather_tensors(World(rank, size, rank), torch.full((16,), rank, dtype=torch.uint8))
        torch.save([p.tolist() for p in parts], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_gather_tensors_gives_every_rank_every_state_in_rank_order(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path / "parts")), nprocs=2)
    for rank in range(2):
        assert torch.load(tmp_path / f"parts.{rank}") == [[0] * 16, [1] * 16]
