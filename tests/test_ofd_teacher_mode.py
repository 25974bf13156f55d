"""``ofd`` runs the teacher's BatchNorm on batch statistics while training, as its
reference (the authors' ``distiller.py`` / mdistiller's OFD keep the teacher in train
mode): ``Loss.teacher_batch_statistics``, honoured by ``StageState.teachers_in_training_mode``."""

from __future__ import annotations

import types

import torch
from torch import nn

from pyramidkd import testing
from pyramidkd.engine.recipe import dump_toml
from pyramidkd.engine.training import state as state_module
from pyramidkd.engine.training.state import StageState


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    model[1].running_mean.fill_(3.0)
    model[1].running_var.fill_(9.0)
    return model.eval()


def _state(model: nn.Module, loss_name: str):
    loss = testing.build_component("loss", loss_name, {})
    return types.SimpleNamespace(teacher_taps=[types.SimpleNamespace(model=model)], loss_fn=loss)


def test_teacher_bn_uses_batch_statistics_and_keeps_its_running_statistics():
    model = _teacher()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(8, 3, 6, 6)
    with StageState.teachers_in_training_mode(_state(model, "ofd")):
        assert model[1].training and not model[3].training  # BN on batch statistics, dropout off
        with torch.inference_mode():
            out = model(images)
    normalised = out.clone()
    pre = model[0](images)
    batch = (pre - pre.mean((0, 2, 3), keepdim=True)) / (pre.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    expected = torch.relu(batch * model[1].weight.view(1, -1, 1, 1) + model[1].bias.view(1, -1, 1, 1))
    assert torch.allclose(normalised, expected, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # num_batches_tracked too
    assert not model.training and not model[1].training and model[1].track_running_stats


def test_without_it_the_teacher_stays_in_eval_mode():
    model = _teacher()
    with StageState.teachers_in_training_mode(_state(model, "at")):
        assert not model[1].training
        eval_out = model(torch.randn(2, 3, 6, 6))
    assert torch.isfinite(eval_out).all()


def test_the_loop_trains_ofd_with_batch_statistics_and_validates_in_eval_mode(tmp_path, monkeypatch):
    seen = []
    original = StageState.teachers_in_training_mode

    def recording(self):
        norms = [m for tap in self.teacher_taps for m in tap.model.modules() if isinstance(m, nn.BatchNorm2d)]
        context = original(self)
        context.__enter__()
        seen.append((self.loss_fn.name, all(m.training for m in norms), [m.running_mean.clone() for m in norms]))
        return _Exit(context, norms, seen)

    monkeypatch.setattr(state_module.StageState, "teachers_in_training_mode", recording)
    stages = [{"id": "teacher", "scheme": "scratch", "model": {"name": "resnet8"}}]
    stages += [{"id": name, "scheme": {"name": "kd", "teacher": "teacher"}, "model": {"name": "resnet8"}, "loss": {"name": name}}
               for name in ("ofd", "at")]
    recipe = dump_toml({
        "experiment": {"name": "ofd-mode", "seed": 0, "device": "cpu"},
        "dataset": {"name": "digits", "image_size": 8, "limit": 120},
        "train": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.02}, "scheduler": {"name": "none"}},
        "stages": stages,
    })
    testing.run_tiny(recipe, workdir=tmp_path)
    by_loss = {name: (train_mode, after) for name, train_mode, after in seen if name in ("ofd", "at")}
    assert by_loss["ofd"][0] is True and by_loss["at"][0] is False
    assert by_loss["ofd"][1] == "unchanged, eval"


class _Exit:
    """Leaves the wrapped context and records whether the running statistics moved and eval mode came back."""

    def __init__(self, context, norms, seen):
        self.context, self.norms, self.seen = context, norms, seen

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        self.context.__exit__(*exc)
        name, train_mode, before = self.seen[-1]
        unchanged = all(torch.equal(m.running_mean, b) for m, b in zip(self.norms, before))
        back = not any(m.training for m in self.norms)
        self.seen[-1] = (name, train_mode, "unchanged, eval" if unchanged and back else "changed")
        return False
