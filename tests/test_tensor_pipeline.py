"""The tensor pipeline (engine/data/: splits.py, augmentation.py, plan.py, batches.py,
pipeline.py): the augmentation's distribution, batches, DDP shares, exact
resume, the ``pipeline`` switch and its one-line note, and accuracy parity with the
``DataLoader`` path on a small real set."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision.transforms.functional as TF
from scipy import stats
from torchvision import transforms as T

from pyramidkd.engine import Augmentation, TensorSplit
from pyramidkd.engine.data.augmentation import augment, draw_augmentation
from pyramidkd.engine.data.batches import GlobalBatchSampler, PlanSampler, TensorBatches
from pyramidkd.engine.data.plan import BatchPlan
from pyramidkd.engine.data.splits import normalize
from pyramidkd.engine.distributed import World

# A test-only plugin: scikit-learn's digits as uint8 RGB images, offered both ways —
# `load` gives PIL images through torchvision's RandomCrop/RandomHorizontalFlip/
# ToTensor/Normalize (as the cifar10 and imagefolder plugins do), `load_tensors` the
# same pixels as TensorSplits. `digits-plain` is a third-party dataset without
# load_tensors. A batch_end hook raises SIGTERM at PYRAMIDKD_TEST_SIGTERM_AT
# ("stage:epoch:step") and sleeps PYRAMIDKD_TEST_STEP_SLEEP seconds per step.
HELPERS = '''
import os, signal, time
import attrs, torch, torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from pyramidkd.engine import Augmentation, DataSplits, Dataset, TensorSplit, hookimpl

MEAN, STD = (0.25, 0.25, 0.25), (0.35, 0.35, 0.35)

@attrs.define
class DigitsParams:
    image_size: int = 16
    crop_padding: int = 2
    flip: bool = True
    estimate: int = -1  # tensor_bytes: -1 = unknown (measured after decoding)

def pixels(size):
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float()[:, None] * (255 / 16)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1).contiguous()
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    parts = order[:1197], order[1197:1497], order[1497:]
    return [(images[p], labels[p]) for p in parts]

class PilSplit(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
        self.labels, self.transform = labels, transform
    def __len__(self):
        return len(self.labels)
    def __getitem__(self, index):
        return self.transform(self.images[index]), int(self.labels[index])

def per_sample_splits(p):
    augment = ([T.RandomCrop(p.image_size, padding=p.crop_padding)] if p.crop_padding else []) + ([T.RandomHorizontalFlip()] if p.flip else [])
    plain = [T.ToTensor(), T.Normalize(MEAN, STD)]
    (train, val, test) = pixels(p.image_size)
    return DataSplits(PilSplit(*train, T.Compose(augment + plain)), PilSplit(*val, T.Compose(plain)),
                      PilSplit(*test, T.Compose(plain)), 10, (3, p.image_size, p.image_size))

class TensorDigits(Dataset):
    """Digits as uint8 images, on either data path."""
    name = "digits-u8"
    Params = DigitsParams
    def load(self, context):
        return per_sample_splits(self.params)
    def load_tensors(self, context):
        p = self.params
        splits = [TensorSplit(images, labels, MEAN, STD) for images, labels in pixels(p.image_size)]
        return DataSplits(*splits, 10, (3, p.image_size, p.image_size), augmentation=Augmentation(p.crop_padding, p.flip))
    def tensor_bytes(self, context):
        return None if self.params.estimate < 0 else self.params.estimate

class PlainDigits(Dataset):
    """The same, from a plugin that only knows `load`."""
    name = "digits-plain"
    Params = DigitsParams
    def load(self, context):
        return per_sample_splits(self.params)

class BrokenTensors(TensorDigits):
    name = "digits-broken"
    def load_tensors(self, context):
        return self.load(context)

@hookimpl
def pyramidkd_register_datasets():
    return [TensorDigits, PlainDigits, BrokenTensors]

@hookimpl
def pyramidkd_batch_end(run, stage, epoch, step, num_steps, loss):
    time.sleep(float(os.environ.get("PYRAMIDKD_TEST_STEP_SLEEP", "0")))
    if os.environ.get("PYRAMIDKD_TEST_SIGTERM_AT") == f"{stage.id}:{epoch}:{step}":
        signal.raise_signal(signal.SIGTERM)
'''

RECIPE = """
[experiment]
name = "tensors"
seed = 4
device = "cpu"
plugins = ["tensor_helpers"]

[dataset]
name = "digits-u8"

[train]
epochs = 2
batch_size = 64
optimizer = {{ name = "sgd", lr = 0.05 }}
pipeline = "{pipeline}"

[[stages]]
id = "teacher"
scheme = "scratch"
model = {{ name = "vgg", layers = [8, "M", 16, "M"] }}

[[stages]]
id = "student"
scheme = {{ name = "kd", teacher = "teacher" }}
model = {{ name = "vgg", layers = [4, "M"], dropout = 0.3 }}
loss = {{ name = "kd", temperature = 2.0, alpha = 0.7 }}
"""
TIMING_KEYS = {"epoch_time_s", "train_time_s", "time_s"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tensors")
    (path / "tensor_helpers.py").write_text(HELPERS)
    yield path
    sys.modules.pop("tensor_helpers", None)


def write(folder, name, pipeline="auto", extra=""):
    path = folder / name
    path.write_text(RECIPE.format(pipeline=pipeline) + extra)
    return path


def metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def weights(run_dir, stage):
    return torch.load(run_dir / "checkpoints" / stage / "best.pt", weights_only=False)["state_dict"]


def assert_same_run(a, b):
    assert metrics(a) == metrics(b)
    for stage in ("teacher", "student"):
        left, right = weights(a, stage), weights(b, stage)
        assert all(torch.equal(left[k], right[k]) for k in left), stage


def data_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("pyramidkd: data: ")]
    assert len(lines) == 1, err
    return lines[0]


# --- the augmentation ----------------------------------------------------------

SIDE, PAD = 6, 2


def position_image() -> torch.Tensor:
    """A 1×SIDE×SIDE uint8 image whose pixel (y, x) holds 1 + y·SIDE + x (0 = padding)."""
    return (1 + torch.arange(SIDE * SIDE, dtype=torch.uint8)).view(1, SIDE, SIDE)


def decode(crop: torch.Tensor) -> tuple[int, int, int]:
    """(offset y, offset x, flipped) of a crop of the padded position image."""
    ys, xs = torch.nonzero(crop[0], as_tuple=True)
    r, c = int(ys[0]), int(xs[0])
    y, x = divmod(int(crop[0, r, c]) - 1, SIDE)
    row = crop[0, r][crop[0, r] > 0]
    flipped = int(len(row) > 1 and bool(row[0] > row[1]))
    source_column = SIDE - 1 - c if flipped else c
    return y + PAD - r, x + PAD - source_column, flipped


def cell(offset_y: int, offset_x: int, flipped: int) -> int:
    span = 2 * PAD + 1
    return (offset_y * span + offset_x) * 2 + flipped


def test_augmentation_is_uniform_over_offsets_and_flips():
    """200k draws: crop offsets uniform over the (2p+1)² cells, flips at rate 1/2."""
    draws, padding = 200_000, 4
    offsets, flips = draw_augmentation(draws, Augmentation(padding, True), torch.Generator().manual_seed(0))
    span = 2 * padding + 1
    assert int(offsets.min()) == 0 and int(offsets.max()) == 2 * padding
    counts = torch.bincount(offsets[:, 0] * span + offsets[:, 1], minlength=span * span)
    assert len(counts) == span * span
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert stats.binomtest(int(flips.sum()), draws, 0.5).pvalue > 1e-3
    none = draw_augmentation(10, Augmentation(0, False), torch.Generator())
    assert not none[0].any() and not none[1].any()


def test_augmentation_has_torchvisions_distribution():
    """The joint distribution of (offset y, offset x, flip) of torchvision's per-sample
    RandomCrop(padding) + RandomHorizontalFlip equals ours (chi-square on both samples)."""
    draws = 12_000
    image = position_image()
    torch.manual_seed(0)
    per_sample = T.Compose([T.RandomCrop(SIDE, padding=PAD), T.RandomHorizontalFlip()])
    theirs = torch.bincount(torch.tensor([cell(*decode(per_sample(image))) for _ in range(draws)]), minlength=50)
    offsets, flips = draw_augmentation(draws, Augmentation(PAD, True), torch.Generator().manual_seed(1))
    batch = augment(image.expand(draws, 1, SIDE, SIDE), offsets, flips, PAD)
    ours = torch.bincount(torch.tensor([cell(*decode(crop)) for crop in batch]), minlength=50)
    assert len(theirs) == len(ours) == (2 * PAD + 1) ** 2 * 2 and (theirs > 0).all() and (ours > 0).all()
    assert stats.chi2_contingency(torch.stack([theirs, ours]).numpy()).pvalue > 1e-3
    # the decoder reads back what was drawn
    assert [decode(crop) for crop in batch[:50]] == [(int(o[0]), int(o[1]), int(f)) for o, f in zip(offsets[:50], flips[:50])]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_equals_torchvisions_pad_crop_flip(dtype):
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (16, 3, 9, 7), generator=generator).to(dtype)
    offsets, flips = draw_augmentation(16, Augmentation(3, True), generator)
    got = augment(images, offsets, flips, 3)
    for image, (y, x), flip, crop in zip(images, offsets.tolist(), flips.tolist(), got):
        expected = TF.crop(TF.pad(image, [3]), y, x, 9, 7)
        assert torch.equal(crop, TF.hflip(expected) if flip else expected)


def test_normalize_matches_to_tensor_and_normalize():
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    expected = torch.stack([T.Normalize(mean, std)(T.ToTensor()(TF.to_pil_image(image))) for image in images])
    assert torch.allclose(normalize(images, mean, std), expected, atol=1e-5)
    assert torch.allclose(normalize(images, None, None), images.float() / 255)
    floats = torch.randn(2, 3, 4, 4)
    assert normalize(floats, mean, std) is floats


# --- batches -------------------------------------------------------------------


def tensor_split(count=50, side=6) -> TensorSplit:
    images = torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return TensorSplit(images, torch.arange(count) % 7, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def train_batches(split, world=World(), seed=0, batch_size=16):
    return TensorBatches(split, batch_size, world, torch.device("cpu"), generator=torch.Generator().manual_seed(seed),
                         augmentation=Augmentation(2, True))


def test_training_batches_cover_the_split_once_per_epoch_in_the_sampler_s_batch_sizes():
    split = tensor_split()
    batches = train_batches(split)
    sampler = GlobalBatchSampler(len(split), 16, torch.Generator(), World())
    epoch = list(batches.epoch())
    assert len(batches) == len(sampler) == len(epoch) == 4
    assert [len(targets) for _, targets in epoch] == [len(b) for b in sampler] == [16, 16, 16, 2]
    assert sorted(torch.cat([t for _, t in epoch]).tolist()) == sorted(split.labels.tolist())
    images, _ = epoch[0]
    assert images.dtype == torch.float32 and images.shape == (16, 3, 6, 6)
    assert list(batches.epoch())[0][1].tolist() != epoch[0][1].tolist()  # a new order each epoch


def test_skipping_replays_the_rest_of_the_epoch():
    split = tensor_split()
    full, resumed = train_batches(split, seed=5), train_batches(split, seed=5)
    expected = list(full.epoch())[2:]
    got = list(resumed.epoch(skip=2))
    assert len(got) == len(expected) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))
    assert full.generator.get_state().equal(resumed.generator.get_state())  # the next epoch starts alike


def test_ranks_take_their_shares_of_the_same_global_batches():
    split = tensor_split(count=37)
    single = list(train_batches(split, batch_size=8).epoch())
    ranks = [list(train_batches(split, World(rank, 2), batch_size=8).epoch()) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, (images, targets) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), images)
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), targets)
    evaluation = [TensorBatches(split, 10, World(rank, 2), torch.device("cpu")) for rank in range(2)]
    assert torch.equal(torch.cat([t for batches in evaluation for _, t in batches]), split.labels)


def test_evaluation_batches_are_the_normalised_split_in_order():
    split = tensor_split(count=23)
    batches = TensorBatches(split, 10, World(), torch.device("cpu"))
    assert len(batches) == 3
    images = torch.cat([i for i, _ in batches])
    assert torch.equal(images, torch.stack([split[i][0] for i in range(len(split))]))



def indexed_split(count: int) -> TensorSplit:
    """Labels 0..count-1: a batch's labels are its sample indices."""
    return TensorSplit(torch.zeros(count, 1, 2, 2, dtype=torch.uint8), torch.arange(count))


@pytest.mark.parametrize("count, world_size, kept_steps", [(37, 3, 5), (33, 3, 4), (33, 1, 5)])
def test_both_pipelines_and_the_loss_weight_ask_one_batch_plan(count, world_size, kept_steps):
    """8 per global batch: 37 leaves a tail of 5 (kept), 33 a tail of 1, dropped under 3
    ranks (one rank would get nothing) and kept in one process. The DataLoader sampler
    and the tensor batches cut the same shares, and the loss weights undo the shares."""
    split = indexed_split(count)
    plan = BatchPlan(count, 8, World(0, world_size), shuffle=True)
    assert plan.steps_per_epoch == 5  # as len() of a DataLoader: the tail counts, kept or not
    per_rank = []
    for rank in range(world_size):
        world = World(rank, world_size)
        sampler = list(GlobalBatchSampler(count, 8, torch.Generator().manual_seed(3), world))
        tensors = [targets.tolist() for _, targets in train_batches(split, world, seed=3, batch_size=8).epoch()]
        assert sampler == tensors and len(tensors) == kept_steps
        per_rank.append(tensors)
    order = plan.epoch_order(torch.Generator().manual_seed(3)).tolist()
    for step in range(1, kept_steps + 1):
        shares = [ranks[step - 1] for ranks in per_rank]
        assert sum(shares, []) == order[(step - 1) * 8 : step * 8]  # the single-process global batch
        assert sum(len(share) for share in shares) == plan.global_batch_size(step)
        sums = [float(sum(share)) for share in shares]  # a stand-in per-sample loss: the index
        averaged = sum(BatchPlan(count, 8, World(r, world_size), shuffle=True).loss_weight(step, len(shares[r])) * sums[r] / len(shares[r])
                       for r in range(world_size)) / world_size  # what DDP's gradient average does
        assert averaged == pytest.approx(sum(sums) / plan.global_batch_size(step))


def test_evaluation_shards_are_the_same_on_both_pipelines():
    split = indexed_split(23)
    for rank in range(3):
        world = World(rank, 3)
        sampler = list(PlanSampler(BatchPlan(23, 4, world)))
        tensors = [targets.tolist() for _, targets in TensorBatches(split, 4, world, torch.device("cpu"))]
        assert sampler == tensors and len(sampler) == BatchPlan(23, 4, world).steps_per_epoch
    shards = [sum((targets.tolist() for _, targets in TensorBatches(split, 4, World(rank, 3), "cpu")), []) for rank in range(3)]
    assert sum(shards, []) == list(range(23)) and [len(shard) for shard in shards] == [8, 8, 7]

@pytest.mark.parametrize("free_gpu, on_gpu", [(10**9, True), (6000, False)])
def test_tensors_go_to_the_gpu_when_they_fit_half_its_free_memory(free_gpu, on_gpu, monkeypatch):
    """The placement rule without a GPU: free memory and the copy are stand-ins."""
    from pyramidkd.engine import DataSplits
    from pyramidkd.engine.data.pipeline import place

    moved = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gpu, 2 * free_gpu))
    monkeypatch.setattr(TensorSplit, "to", lambda self, device: moved.append(device) or self)
    split = tensor_split(count=10)  # 1,080 + 80 bytes
    data = DataSplits(split, split, split, 7, (3, 6, 6))
    _, where = place(data, torch.device("cuda"))
    if on_gpu:
        assert len(moved) == 3 and where == "on cuda (3.5 kB ≤ 50 % of 1.0 GB free GPU memory)"
    else:
        assert not moved and where == "held on cpu (3.5 kB > 50 % of 6.0 kB free GPU memory), each batch copied to cuda"
    assert place(data, torch.device("cpu"))[1] == "on cpu"


# --- runs ----------------------------------------------------------------------


def test_auto_takes_the_tensor_path_and_says_why(folder, cli):
    recipe = write(folder, "auto.toml")
    result = cli("run", recipe, "--quiet", "--output", folder / "auto", "--set", "train.epochs=1")
    assert result.code == 0, result.err
    line = data_line(result.err)
    assert line.startswith("pyramidkd: data: tensor pipeline (digits-u8 offers decoded tensors, ")
    assert "free RAM; on cpu)" in line and " ≤ 25 % of " in line


def test_auto_falls_back_to_the_dataloader_when_the_tensors_do_not_fit(folder, cli):
    recipe = write(folder, "big.toml")
    result = cli("run", recipe, "--quiet", "--output", folder / "big", "--set", "train.epochs=1",
                 "--set", "dataset.estimate=1000000000000000")
    assert result.code == 0, result.err
    assert data_line(result.err).startswith(
        "pyramidkd: data: DataLoader pipeline (digits-u8's tensors, 1000.0 TB, would take more than 25 % of ")


def test_a_dataset_without_tensors_keeps_working_on_the_dataloader_path(folder, cli):
    recipe = write(folder, "plain.toml")
    result = cli("run", recipe, "--quiet", "--output", folder / "plain", "--set", "train.epochs=1", "--set", 'dataset.name="digits-plain"')
    assert result.code == 0, result.err
    assert data_line(result.err) == "pyramidkd: data: DataLoader pipeline (digits-plain does not offer tensors)"
    assert json.loads((folder / "plain" / "summary.json").read_text())["stages"][-1]["test_acc"] > 0.2


def test_pipeline_tensor_on_a_dataset_without_tensors_is_a_clear_error(folder, cli):
    recipe = write(folder, "refused.toml", pipeline="tensor")
    for command in ("validate", "run"):
        result = cli(command, recipe, "--set", 'dataset.name="digits-plain"')
        assert result.code == 1
        assert result.err.startswith("error: ") and "Traceback" not in result.err
        assert "train.pipeline" in result.err and "dataset 'digits-plain' does not offer tensors" in result.err
        assert 'pipeline = "auto" or "dataloader"' in result.err


def test_stages_must_agree_on_the_pipeline(folder, cli):
    recipe = write(folder, "mixed.toml")
    result = cli("validate", recipe, "--set", 'stages.student.train.pipeline="dataloader"')
    assert result.code == 1
    assert "stage 'student' uses pipeline = \"dataloader\" but stage 'teacher' uses \"auto\"" in result.err
    assert "stages.student.train.pipeline" in result.err


def test_load_tensors_must_return_tensor_splits(folder, cli):
    recipe = write(folder, "broken.toml", pipeline="tensor")
    result = cli("run", recipe, "--quiet", "--output", folder / "broken", "--set", 'dataset.name="digits-broken"')
    assert result.code == 1 and "Traceback" not in result.err
    assert "load_tensors returned a PilSplit as its train split, not a TensorSplit" in result.err


def test_same_seed_same_run_and_the_pipeline_is_in_the_fingerprint(folder, cli):
    recipe = write(folder, "twice.toml", pipeline="tensor")
    for name in ("once", "again"):
        assert cli("run", recipe, "--quiet", "--output", folder / name).code == 0
    assert_same_run(folder / "once", folder / "again")
    same = cli("run", recipe, "--quiet", "--output", folder / "once")
    assert same.code == 0 and "recomput" not in same.err, same.err
    # another path draws other random numbers: the stages are recomputed
    switched = cli("run", recipe, "--quiet", "--output", folder / "again", "--resume", "--force", "--set", 'train.pipeline="dataloader"')
    assert switched.code == 0, switched.err
    assert "recomputing 2 stage(s)" in switched.err
    assert metrics(folder / "once") != metrics(folder / "again")


def test_resuming_on_the_other_path_warns(folder, cli, monkeypatch):
    """auto decides per run: a stage interrupted on the tensor path that continues on
    the DataLoader path (here: its tensors no longer "fit") says it is not exact."""
    recipe = write(folder, "switch.toml")
    out = folder / "switch"
    monkeypatch.setenv("PYRAMIDKD_TEST_SIGTERM_AT", "teacher:1:3")
    assert cli("run", recipe, "--quiet", "--output", out).code == 128 + signal.SIGTERM
    monkeypatch.delenv("PYRAMIDKD_TEST_SIGTERM_AT")
    import tensor_helpers

    monkeypatch.setattr(tensor_helpers.TensorDigits, "tensor_bytes", lambda self, context: 10**15)
    resumed = cli("run", recipe, "--quiet", "--output", out, "--resume")
    assert resumed.code == 0, resumed.err
    assert "data: DataLoader pipeline (digits-u8's tensors, 1000.0 TB" in resumed.err
    assert ("stage 'teacher' was interrupted on the tensor data path and continues on the dataloader path "
            '(pipeline = "auto" chose differently this time') in resumed.err


@pytest.mark.parametrize("pipeline", ["tensor", "dataloader"])
def test_sigterm_mid_epoch_then_resume_is_exact(pipeline, folder, cli, monkeypatch):
    """Both paths, with crops and flips: the resumed run replays the epoch's order and
    augmentation (the DataLoader path's per-sample transforms draw from the global RNG)."""
    recipe = write(folder, f"stop-{pipeline}.toml", pipeline=pipeline)
    reference = folder / f"reference-{pipeline}"
    assert cli("run", recipe, "--quiet", "--output", reference).code == 0
    out = folder / f"stopped-{pipeline}"
    monkeypatch.setenv("PYRAMIDKD_TEST_SIGTERM_AT", "teacher:2:7")
    stopped = cli("run", recipe, "--quiet", "--output", out)
    assert stopped.code == 128 + signal.SIGTERM, stopped.err
    monkeypatch.delenv("PYRAMIDKD_TEST_SIGTERM_AT")
    state = torch.load(out / "checkpoints" / "teacher" / "last.pt", weights_only=False)
    assert state["progress"]["step"] == 8 and state["epoch"] == 1  # the signal is seen at the next step
    resumed = cli("run", recipe, "--quiet", "--output", out, "--resume")
    assert resumed.code == 0, resumed.err
    assert "resuming stage 'teacher' from epoch 2, step 9" in resumed.err
    assert_same_run(reference, out)


def test_sigkill_mid_epoch_then_resume_is_exact_on_the_tensor_path(folder, cli):
    recipe = write(folder, "kill.toml", pipeline="tensor", extra="")
    reference = folder / "reference-kill"
    assert cli("run", recipe, "--quiet", "--output", reference).code == 0
    out = folder / "killed"
    process = subprocess.Popen([sys.executable, "-m", "pyramidkd", "run", str(recipe), "--quiet", "--output", str(out)],
                               env={**__import__("os").environ, "PYRAMIDKD_TEST_STEP_SLEEP": "0.02"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = out / "checkpoints" / "student" / "last.pt"
    deadline = time.time() + 120
    while not last.exists():  # the student's first epoch is done: kill inside its second
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.1)
    process.kill()
    process.wait()
    assert not (out / "summary.json").exists(), "the run finished before the kill; make it slower"
    resumed = cli("run", recipe, "--quiet", "--output", out, "--resume")
    assert resumed.code == 0, resumed.err
    assert_same_run(reference, out)


def test_both_paths_reach_the_same_accuracy(folder, cli):
    """A VGG trained from scratch on 1,197 real digits (16×16, crops and flips, 6
    epochs), five seeds a path. The two paths draw different random numbers, so
    their runs differ as two seeds do: here one run's test accuracy spreads by about
    2.5 points (seed to seed, either path; 300 test images, one is 0.33 points), so
    the difference of two five-seed means has a spread of about 1.6 points, and 5
    points is 3 of those. A systematic difference (crops off by one, flips never
    applied, another normalisation) shows as more than that."""
    recipe = folder / "parity.toml"
    recipe.write_text(RECIPE.format(pipeline="auto").split('[[stages]]\nid = "student"')[0])
    means = {}
    for pipeline in ("tensor", "dataloader"):
        accuracies = []
        for seed in range(5):
            out = folder / f"parity-{pipeline}-{seed}"
            result = cli("run", recipe, "--quiet", "--output", out, "--set", f'train.pipeline="{pipeline}"',
                         "--set", f"experiment.seed={seed}", "--set", "train.epochs=6")
            assert result.code == 0, result.err
            accuracies.append(json.loads((out / "summary.json").read_text())["stages"][0]["test_acc"])
        means[pipeline] = sum(accuracies) / len(accuracies)
    assert means["tensor"] > 0.8, means
    assert abs(means["tensor"] - means["dataloader"]) < 0.05, means
