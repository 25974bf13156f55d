"""``crd`` (Contrastive Representation Distillation, Tian et al. ICLR 2020) and the
engine's per-sample dataset indices it needs.

Checked against RepDistiller ``crd/criterion.py`` (``ContrastLoss``: P(pos) = x / (x +
K·P_n + ε), P_n = 1 / n_data) and ``crd/memory.py`` (``ContrastMemory``: Z from the first
batch, bank rows updated with momentum and re-normalised), each formula recomputed here
independently; then the index delivery of both data paths, exact resume and real runs."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from pyramidkd import testing
from pyramidkd.engine import ModelOutput, TensorSplit, TrainSection, UserError
from pyramidkd.engine.data.batches import make_loader
from pyramidkd.engine.distributed import World
from pyramidkd.engine.recipe import dump_toml
from pyramidkd.engine.training.checkpoints import load_checkpoint
from pyramidkd.plugins.losses.crd import ContrastMemory, nce_loss


def crd(**params):
    return testing.build_component("loss", "crd", params)


def outputs(batch=6, dim_s=5, dim_t=7, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = ModelOutput(torch.randn(batch, classes, generator=g).requires_grad_(True),
                          {"pooled": torch.randn(batch, dim_s, generator=g).requires_grad_(True)})
    teacher = ModelOutput(torch.randn(batch, classes, generator=g), {"pooled": torch.randn(batch, dim_t, generator=g)})
    return student, teacher, torch.randint(0, classes, (batch,), generator=g)


def test_nce_loss_matches_the_formula_by_hand():
    x = torch.tensor([[0.5, 0.1, 0.2], [2.0, 0.05, 1.0]], dtype=torch.float64)
    n_data, k = 10, 2
    noise = k / n_data
    expected = 0.0
    for row in x.tolist():
        expected -= math.log(row[0] / (row[0] + noise + 1e-7))
        expected -= sum(math.log(noise / (v + noise + 1e-7)) for v in row[1:])
    assert nce_loss(x, n_data).item() == pytest.approx(expected / 2, rel=1e-12)


def test_scores_use_the_banks_and_a_first_batch_normaliser():
    torch.manual_seed(0)
    memory = ContrastMemory(4, 2, None).double()
    memory.bank_s.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]))
    memory.bank_t.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6], [0.0, -1.0]]))
    e_s = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    e_t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    contrast = torch.tensor([[2, 0, 3]])
    out_s, out_t = memory.scores(e_s, e_t, contrast, 0.5)
    raw_s = [math.exp((0.8 * 0.6 + 0.6 * 0.8) / 0.5), math.exp(0.8 / 0.5), math.exp(-0.8 / 0.5)]  # bank_t rows · e_s
    raw_t = [math.exp(0.6 / 0.5), math.exp(1.0 / 0.5), math.exp(-1.0 / 0.5)]  # bank_s rows · e_t
    z_s, z_t = sum(raw_s) / 3 * 4, sum(raw_t) / 3 * 4
    assert out_s[0].tolist() == pytest.approx([v / z_s for v in raw_s])
    assert out_t[0].tolist() == pytest.approx([v / z_t for v in raw_t])
    memory.scores(2 * e_s, e_t, contrast, 0.5)  # Z is fixed after the first batch
    assert memory.normalizers.tolist() == pytest.approx([z_s, z_t])


def test_bank_update_is_momentum_then_renormalised():
    memory = ContrastMemory(3, 2, None)
    memory.bank_s.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]]))
    memory.bank_t.copy_(torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 1.0]]))
    memory.update(torch.tensor([2, 0]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]]), 0.5)
    row2 = torch.tensor([1.5, 2.5]) / math.hypot(1.5, 2.5)
    row0 = torch.tensor([0.5, 0.5]) / math.hypot(0.5, 0.5)
    assert torch.allclose(memory.bank_s, torch.stack([row0, torch.tensor([0.0, 1.0]), row2]))
    assert torch.allclose(memory.bank_t[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert torch.allclose(memory.bank_t[2], torch.tensor([0.5, 0.5]) / math.sqrt(0.5))
    assert torch.equal(memory.bank_t[1], torch.tensor([1.0, 0.0]))


def test_negatives_are_reproducible_outside_the_class_and_resume_exactly():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    torch.manual_seed(3)
    memory = ContrastMemory(10, 4, labels)
    indices = torch.tensor([0, 4, 9])
    first = memory.draw_contrast(indices, 50)
    assert torch.equal(first[:, 0], indices)
    for row, index in zip(first, indices):
        assert (labels[row[1:]] != labels[index]).all()
    assert len(set(first[2, 1:].tolist())) == 6  # every sample of the other classes drawn
    saved = memory.state_dict()
    second = memory.draw_contrast(indices, 50)
    torch.manual_seed(3)
    again = ContrastMemory(10, 4, labels)
    assert torch.equal(again.draw_contrast(indices, 50), first)
    again.load_state_dict(saved)
    assert torch.equal(again.draw_contrast(indices, 50), second)
    unlabelled = ContrastMemory(10, 4, None).draw_contrast(indices, 200)
    assert all(index not in row[1:].tolist() for row, index in zip(unlabelled, indices.tolist()))


def test_direct_calls_relax_and_exact_without_indices(caplog):
    student, teacher, targets = outputs()
    relax = crd(mode="relax", feat_dim=4)
    value = relax(student, [teacher], targets)
    value.backward()
    assert torch.isfinite(value) and student.features["pooled"].grad.abs().sum() > 0
    with caplog.at_level("WARNING", logger="pyramidkd"):
        exact = crd(feat_dim=4)
        assert torch.isfinite(exact(student, [teacher], targets))
    assert "without dataset indices" in caplog.text
    exact.setup_data(6, None)  # as a run: a bank, so training without indices is an error
    with pytest.raises(UserError, match="needs each training batch's dataset indices"):
        exact(student, [teacher], targets)
    exact.start_batch(torch.arange(6))
    assert torch.isfinite(exact(student, [teacher], targets)) and exact.batch_indices is None


def test_relax_in_batch_term_by_hand():
    student, teacher, targets = outputs(batch=4)
    loss = crd(mode="relax", feat_dim=3, ce_weight=0.0, feat_weight=1.0)
    loss(student, [teacher], targets)  # builds the embeddings
    e_s, e_t = loss.embed_s(student.features["pooled"]), loss.embed_t(teacher.features["pooled"])
    total = 0.0
    for a, b in ((e_s, e_t), (e_t, e_s)):
        for i in range(4):
            logits = [float((a[i] @ b[j]).detach()) / 0.07 for j in range(4)]
            norm = math.log(sum(math.exp(v) for v in logits))
            positives = [j for j in range(4) if targets[j] == targets[i]]
            total -= sum(logits[j] - norm for j in positives) / len(positives) / 4
    assert loss(student, [teacher], targets).item() == pytest.approx(total, rel=1e-5)


def test_kd_weight_adds_the_kl_term():
    student, teacher, targets = outputs()
    plain, with_kd = crd(mode="relax", feat_dim=4), crd(mode="relax", feat_dim=4, kd_weight=1.0)
    torch.manual_seed(0)
    a = plain(student, [teacher], targets)
    with_kd.load_state_dict(plain.state_dict(), strict=False)
    with_kd.ensure_built(student, teacher)
    with_kd.load_state_dict(plain.state_dict())
    kl = torch.nn.functional.kl_div(torch.log_softmax(student.logits / 4, 1), torch.softmax(teacher.logits / 4, 1),
                                    reduction="batchmean") * 16
    assert with_kd(student, [teacher], targets).item() == pytest.approx((a + kl).item(), rel=1e-6)


# --- the engine's indices -----------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2])
def test_both_pipelines_deliver_the_indices_of_their_samples(world_size):
    """Each path's indices are its plan's positions of the epoch's order (the same
    permutation draw; the DataLoader draws its workers' base seed first), this rank's
    share, after the skipped batch — and they name the samples the batch holds."""
    images = torch.arange(23, dtype=torch.float32).view(23, 1, 1, 1).expand(23, 1, 2, 2).contiguous()
    labels = torch.arange(23) * 7 % 5
    split, plain = TensorSplit(images, labels), torch.utils.data.TensorDataset(images, labels)
    for rank in range(world_size):
        world = World(rank=rank, size=world_size)
        for dataset, pipeline in ((split, "tensor"), (plain, "dataloader")):
            loader = make_loader(dataset, TrainSection(batch_size=8, pipeline=pipeline), world, torch.device("cpu"), train=True,
                                 generator=torch.Generator().manual_seed(4), indices=True)
            batches = list(loader.epoch(skip=1))
            for images_, targets, indices in batches:
                assert torch.equal(targets, labels[indices]) and torch.equal(images_[:, 0, 0, 0], indices.float())
            generator = torch.Generator().manual_seed(4)
            if pipeline == "dataloader":
                torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed
            order = torch.randperm(23, generator=generator)
            expected = torch.cat([order[first:last] for first, last in loader.plan.rank_slices(1)])
            assert torch.equal(torch.cat([b[2] for b in batches]), expected), pipeline
    unasked = make_loader(split, TrainSection(batch_size=8), World(), torch.device("cpu"), train=True,
                          generator=torch.Generator().manual_seed(4))
    assert all(len(batch) == 2 for batch in unasked.epoch())


# --- runs ---------------------------------------------------------------------------

HELPER = '''
import os
from pyramidkd.engine import hookimpl

@hookimpl
def pyramidkd_batch_end(run, stage, epoch, step, num_steps, loss):
    if stage.id == "crd" and f"{epoch}:{step}" == os.environ.get("CRD_TEST_FAIL_AT"):
        raise ValueError("stopped on purpose")
'''


def _recipe(pipeline: str, stages: dict) -> str:
    entries = [{"id": "teacher", "scheme": "scratch", "model": {"name": "resnet8"}}]
    for stage_id, params in stages.items():
        entries.append({"id": stage_id, "scheme": {"name": "kd", "teacher": "teacher"}, "model": {"name": "resnet8"},
                        "loss": {"name": "crd", **params}})
    return dump_toml({
        "loggers": ["files"],
        "experiment": {"name": "crd", "seed": 0, "device": "cpu", "plugins": ["crd_helpers"]},
        "dataset": {"name": "digits", "image_size": 8, "limit": 200},
        "train": {"epochs": 2, "batch_size": 32, "pipeline": pipeline, "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
                  "scheduler": {"name": "none"}},
        "stages": entries,
    })


@pytest.fixture
def helper_module(tmp_path, monkeypatch):
    (tmp_path / "crd_helpers.py").write_text(HELPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("crd_helpers", None)


def test_crd_variants_train_on_digits_with_the_bank_in_last(tmp_path, helper_module):
    stages = {"crd": {"nce_k": 64}, "crd-relax": {"mode": "relax"}, "crd-kd": {"nce_k": 64, "kd_weight": 1.0}}
    summary = testing.run_tiny(_recipe("auto", stages), workdir=tmp_path)
    results = {stage["stage"]: stage for stage in summary["stages"]}
    for stage_id in stages:
        assert math.isfinite(results[stage_id]["test_loss"]) and results[stage_id]["loss"] == "crd"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in records if r["kind"] == "epoch")
    state = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "crd" / "last.pt"))["loss_state"]
    n_train = state["memory.bank_s"].shape[0]
    assert state["memory.bank_s"].shape == state["memory.bank_t"].shape == (n_train, 128) and 100 < n_train < 200
    assert torch.allclose(state["memory.bank_s"].norm(dim=1).max(), torch.tensor(1.0))  # rows seen were renormalised
    assert (state["memory.normalizers"] > 0).all() and "embed_s.linear.weight" in state
    assert "memory.bank_s" not in load_checkpoint(str(tmp_path / "run" / "checkpoints" / "crd-relax" / "last.pt"))["loss_state"]


@pytest.mark.parametrize("pipeline", ["tensor", "dataloader"])
def test_crd_interrupted_mid_epoch_resumes_exactly(pipeline, tmp_path, helper_module, monkeypatch):
    from pyramidkd.engine.cli import main

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(_recipe(pipeline, {"crd": {"nce_k": 32}}))
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(["run", str(recipe), "--quiet", "--output", str(reference)]) == 0
    monkeypatch.setenv("CRD_TEST_FAIL_AT", "2:2")
    assert main(["run", str(recipe), "--quiet", "--output", str(resumed)]) != 0
    assert load_checkpoint(str(resumed / "checkpoints" / "crd" / "last.pt"))["progress"]["step"] == 2
    monkeypatch.delenv("CRD_TEST_FAIL_AT")
    assert main(["run", str(recipe), "--quiet", "--output", str(resumed), "--resume"]) == 0
    for which in ("best", "last"):
        a = load_checkpoint(str(reference / "checkpoints" / "crd" / f"{which}.pt"))
        b = load_checkpoint(str(resumed / "checkpoints" / "crd" / f"{which}.pt"))
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
        if which == "last":
            assert all(torch.equal(v, b["loss_state"][k]) for k, v in a["loss_state"].items() if isinstance(v, torch.Tensor))


def test_ddp_leaves_the_bank_to_the_loss(tmp_path):
    """Under torchrun the student+loss wrapper does not re-broadcast CRD's banks from rank
    0 on every forward (51 MB a step on CIFAR-100); the loss gathers its rows itself."""
    import types

    import torch.distributed as dist

    from pyramidkd.engine.training.state import _student_forward
    from pyramidkd.testing import build_component

    loss = build_component("loss", "crd")
    loss.setup_data(10, torch.arange(10) % 2)
    student = torch.nn.Linear(4, 2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        run = types.SimpleNamespace(world=types.SimpleNamespace(distributed=True), device=torch.device("cpu"))
        wrapped = _student_forward(run, student, loss, compile_=False)
        ignored = set(wrapped.parameters_to_ignore)
        assert {"loss_fn.memory.bank_s", "loss_fn.memory.bank_t"} <= ignored
        assert not any(name.startswith("student.") for name in ignored)
    finally:
        dist.destroy_process_group()
