"""``ft`` — Paraphrasing Complex Network: Network Compression via Factor Transfer (Kim,
Park & Kwak, NeurIPS 2018), and ``ft-paraphraser``, its first stage.

References: the CRD code base, RepDistiller: ``models/util.py`` (``Paraphraser``: conv3×3
encoder C_t → C_t → rate·C_t → rate·C_t and a transposed-conv decoder back, LeakyReLU 0.1,
no BN; ``Translator``: conv3×3 encoder C_s → C_s → rate·C_t → rate·C_t with BN),
``helper/pretrain.py`` (``init``: the paraphraser alone trained on the teacher's last
stage with ``criterion_init = nn.MSELoss()``, ``train_student.py``), ``distiller_zoo/FT.py``
(``FactorTransfer``, p1 = 2, p2 = 1), ``helper/loops.py`` (``factor_s =
translator(feat_s[-2])``, ``factor_t = paraphraser(feat_t[-2], is_factor=True)``) and
``scripts/run_cifar_distill.sh`` (``--distill factor -a 0 -b 200``: CE 1 + 200 · FT).

* ``ft-paraphraser``: the paraphraser (an autoencoder on the teacher's ``feat.K``, factor
  size rate·C_t) learns to reconstruct it: MSE(decoder(encoder(t)), t). It reads no
  student feature; the ``ft`` scheme trains it in a stage where the student is frozen.
* ``ft``: ``ce_weight·CE + feat_weight·FT(translator(s), paraphraser.encoder(t))`` on
  ``feat.K``, the paraphraser frozen, loaded from that first stage (:meth:`FTLoss.inherit_state`).
  ``factor = "crd"`` (default) is RepDistiller's FT: each factor reduced to
  mean_c(f²) per position, flattened and L2-normalised per sample, then mean |φ_s − φ_t|
  (the larger map average-pooled to the smaller's size first). ``factor = "paper"`` is the
  authors' code (Jangho-Kim/Factor-Transfer-pytorch ``train_student.py``:
  ``BETA * L1Loss(FT(factor_s), FT(factor_t))``, ``utils.FT = F.normalize(x.view(N, -1))``):
  the whole factor flattened and normalised, the paper's ‖F_T/‖F_T‖₂ − F_S/‖F_S‖₂‖₁ taken
  as a mean over its elements; the authors' weight was β = 500 with that factor, the CRD
  code base's 200 (the default) goes with its own.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from pyramidkd.engine import Loss, UserError, between, hookimpl
from pyramidkd.plugins.losses.learned import LearnedTermLoss, require_map
from pyramidkd.plugins.losses.tapped import at_least_float32, ce_weight_field, feat_weight_field, last_stage, one_teacher

MAP_FIX = "ft reads the last stage output feat.K as a feature map: use convolutional models that declare it (the model zoo, vgg)"
SCHEME_FIX = 'train it with scheme = { name = "ft", teacher = "<stage id>" }, which trains the paraphraser first'


def rate_field():
    return attrs.field(default=0.5, validator=between(0.0, 1.0), metadata={"help": "paraphrase rate k: the factor has k·C_t channels"})


def factor_channels(teacher_channels: int, rate: float) -> int:
    channels = int(teacher_channels * rate)  # RepDistiller: int(t_shape[1] * k)
    if channels < 1:
        raise UserError(f"ft: rate {rate} of the teacher's {teacher_channels} channels leaves no factor channel",
                        fix="raise rate so that rate × the teacher's channels is at least 1")
    return channels


def _encoder(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in ((in_channels, in_channels), (in_channels, out_channels), (out_channels, out_channels)):
        layers += [nn.Conv2d(a, b, 3, 1, 1), nn.BatchNorm2d(b) if batch_norm else nn.Sequential(), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """RepDistiller's ``Paraphraser`` (``use_bn=False``): encoder to the factor, decoder back."""

    def __init__(self, channels: int, rate: float):
        super().__init__()
        factor = factor_channels(channels, rate)
        self.encoder = _encoder(channels, factor, batch_norm=False)
        layers: list[nn.Module] = []
        for a, b in ((factor, factor), (factor, channels), (channels, channels)):
            layers += [nn.ConvTranspose2d(a, b, 3, 1, 1), nn.Sequential(), nn.LeakyReLU(0.1)]
        self.decoder = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(features))


def translator(student_channels: int, teacher_channels: int, rate: float) -> nn.Sequential:
    """RepDistiller's ``Translator`` (``use_bn=True``): the student's map to the factor size."""
    return _encoder(student_channels, factor_channels(teacher_channels, rate), batch_norm=True)


def _last_map(output, loss: str, role: str) -> torch.Tensor:
    return require_map(last_stage(output, loss, role), loss, role, "feat.K", MAP_FIX)


@attrs.define
class ParaphraserParams:
    rate: float = rate_field()


class FTParaphraserLoss(Loss):
    """FT's first stage: the paraphraser reconstructs the teacher's feat.K (MSE); no student term."""

    name = "ft-paraphraser"
    Params = ParaphraserParams
    needs_teacher = True

    def __init__(self, params=None):
        super().__init__(params)
        self.paraphraser: Paraphraser | None = None

    def student_taps(self):
        return ()

    def teacher_taps(self):
        return ("feat.*",)

    def setup(self, student, teachers):
        self.ensure_built(_last_map(one_teacher(teachers, self.name), self.name, "teacher"))

    def ensure_built(self, teacher_map: torch.Tensor) -> None:
        if self.paraphraser is None:
            self.paraphraser = Paraphraser(teacher_map.shape[1], self.params.rate).to(teacher_map.device)

    def forward(self, student, teachers, targets):
        target = _last_map(one_teacher(teachers, self.name), self.name, "teacher")
        self.ensure_built(target)
        dtype = next(self.paraphraser.parameters()).dtype
        with torch.autocast(target.device.type, enabled=False):
            target = target.detach().to(dtype)
            return F.mse_loss(self.paraphraser(target), target)


@attrs.define
class FTParams:
    ce_weight: float = ce_weight_field()
    feat_weight: float = feat_weight_field(200.0)
    rate: float = rate_field()
    factor: Literal["crd", "paper"] = attrs.field(default="crd", metadata={
        "help": 'the factor compared: "crd" (RepDistiller: channel mean of squares) or "paper" (the authors\' code: all of it)'})


class FTLoss(LearnedTermLoss):
    """Factor transfer (Kim et al. 2018): CE + feat_weight · mean|φ(translator(s)) − φ(paraphraser.encoder(t))| on feat.K."""

    name = "ft"
    Params = FTParams
    taps = ("feat.*",)
    shape_fix = SCHEME_FIX

    def __init__(self, params=None):
        super().__init__(params)
        self.paraphraser: Paraphraser | None = None
        self.translator: nn.Sequential | None = None
        self.awaiting_paraphraser = False  # set by setup() in a run, cleared by inherit_state()

    def setup(self, student, teachers):
        super().setup(student, teachers)
        self.awaiting_paraphraser = True

    def inherit_state(self, state):
        """Load the paraphraser the ``ft-paraphraser`` stage trained, and freeze it."""
        saved = {key[len("paraphraser."):]: value for key, value in (state or {}).items() if key.startswith("paraphraser.")}
        if not saved:
            raise UserError("loss 'ft' continues a trained paraphraser, but the stage's init_from saved none", fix=SCHEME_FIX)
        try:
            self.paraphraser.load_state_dict(saved)
        except RuntimeError as error:
            raise UserError(f"loss 'ft': the saved paraphraser does not fit this teacher and rate: {str(error).splitlines()[0]}",
                            fix="train the paraphraser stage with the same teacher and rate") from None
        self.paraphraser.requires_grad_(False)
        self.awaiting_paraphraser = False

    def start_epoch(self, epoch):
        if self.awaiting_paraphraser:
            raise UserError("loss 'ft' needs a paraphraser pre-trained on the teacher, and this stage has none", fix=SCHEME_FIX)
        super().start_epoch(epoch)

    def module_shapes(self, student, teacher):
        return {"student feat.K": (_last_map(student, self.name, "student").shape[1],),
                "teacher feat.K": (_last_map(teacher, self.name, "teacher").shape[1],)}

    def build(self, shapes):
        student, teacher = shapes["student feat.K"][0], shapes["teacher feat.K"][0]
        self.paraphraser = Paraphraser(teacher, self.params.rate)
        self.translator = translator(student, teacher, self.params.rate)

    def learned_term(self, student, teacher, dtype):
        factor_s = self.translator(last_stage(student, self.name, "student").to(dtype))
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(last_stage(teacher, self.name, "teacher").detach().to(dtype))
        return factor_loss(factor_s, factor_t, self.params.factor)


def factor_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, form: str) -> torch.Tensor:
    """mean |φ(F_s) − φ(F_t)|, the larger map average-pooled to the smaller's size (RepDistiller's ``factor_loss``)."""
    size = (min(factor_s.shape[-2], factor_t.shape[-2]), min(factor_s.shape[-1], factor_t.shape[-1]))
    if tuple(factor_s.shape[-2:]) != size:
        factor_s = F.adaptive_avg_pool2d(factor_s, size)
    if tuple(factor_t.shape[-2:]) != size:
        factor_t = F.adaptive_avg_pool2d(factor_t, size)
    if form == "crd":
        factor_s, factor_t = factor_s.pow(2).mean(1), factor_t.pow(2).mean(1)
    flat_s = F.normalize(at_least_float32(factor_s).flatten(1))
    flat_t = F.normalize(at_least_float32(factor_t).flatten(1))
    return (flat_s - flat_t).abs().mean()


@hookimpl
def pyramidkd_register_losses():
    return [FTLoss, FTParaphraserLoss]
