"""The fake quantiser of scheme ``qat-kd``: training-time simulation of what
``pyramidkd export --format onnx --quantize int8`` does (ONNX Runtime
``quantize_static``, QDQ, docs/deploy.md "Int8").

What is simulated, and why it matches the int8 file:

* **weights** of every ``nn.Conv2d`` and ``nn.Linear``: int8, symmetric, one scale per
  output channel (``scale = max|w_c| / 127``, range [-127, 127], zero point 0:
  ONNX Runtime's ``QInt8`` symmetric weights). ``quant_pre_process`` folds a following
  BatchNorm into the convolution, so ONNX Runtime quantises the *folded* weight
  ``w_c · γ_c / σ_c``; per-channel symmetric rounding is invariant under a positive
  (or negative) factor per output channel, so quantising ``w`` and folding afterwards
  gives the same integers as folding first: the simulation is exact for the weights,
  whatever the BatchNorm statistics. (The int32 bias is not simulated.)
* **activations**: uint8, affine, one range per tensor (ONNX Runtime's formula:
  the range widened to contain 0, ``scale = (max - min) / 255``, ``zero_point =
  round(-min / scale)``) at the input of every quantised layer (the model's input and
  every tensor a convolution or a linear layer reads: in a VGG, the ReLU and pooling
  outputs ONNX Runtime's QDQ graph quantises) and at the model's output (the last
  Gemm's output, which QDQ quantises too). Residual additions and concatenations are
  quantised by ONNX Runtime but not here (their results are quantised where the next
  layer reads them); a module called twice shares one range.
* ranges: the min/max of the training batches (``minmax``, as the MinMax calibration
  of the export) or their moving average (``ema``), observed during the first
  ``observer_epochs`` epochs, then frozen. They live in :class:`FakeQuantizer`'s
  buffers, which the stage's loss owns, so they are saved in ``last.pt``'s loss state
  and restored on ``--resume``; the model's own ``state_dict`` is untouched.

Gradients pass straight through (``torch.fake_quantize_per_channel_affine`` /
``torch.fake_quantize_per_tensor_affine``: identity inside the range, zero where
clipped). Those core ops are used rather than ``torch.ao.quantization``, whose
``prepare_qat`` flow is deprecated in torch 2.14 (its own warning names 2.10 for the
removal) and which would change the model's modules and ``state_dict``.
"""

from __future__ import annotations

from typing import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from pyramidkd.engine import UserError

WEIGHT_RANGE = (-127, 127)  # ONNX Runtime's symmetric int8 weights
ACTIVATION_RANGE = (0, 255)  # uint8 activations
SMALLEST_SCALE = torch.finfo(torch.float32).tiny  # below it ONNX Runtime uses scale 1, zero point 0
OBSERVERS = ("minmax", "ema")
QUANTISED_FORWARDS = {nn.Conv2d.forward: "conv", nn.Linear.forward: "linear"}


@attrs.frozen
class FakeQuantSettings:
    observer: str = "minmax"
    observer_epochs: int = 1
    freeze_bn_epochs: int = 1
    ema_constant: float = 0.01


# --- the arithmetic ---------------------------------------------------------------


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """One symmetric int8 scale per output channel (dimension 0)."""
    absmax = weight.detach().float().flatten(1).abs().amax(dim=1)
    scales = absmax / WEIGHT_RANGE[1]
    return torch.where(scales < SMALLEST_SCALE, torch.ones_like(scales), scales)


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to per-channel symmetric int8 and back (straight-through gradient)."""
    scales = weight_scales(weight)
    zero_points = torch.zeros_like(scales, dtype=torch.int32)
    quantized = torch.fake_quantize_per_channel_affine(weight.float(), scales, zero_points, 0, *WEIGHT_RANGE)
    return quantized.to(weight.dtype)


def activation_qparams(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 scale and zero point of the range [low, high], as ONNX Runtime computes them."""
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    scale = (high - low) / ACTIVATION_RANGE[1]
    tiny = scale < SMALLEST_SCALE
    scale = torch.where(tiny, torch.ones_like(scale), scale)
    zero_point = torch.where(tiny, torch.zeros_like(low), torch.round(-low / scale)).clamp(*ACTIVATION_RANGE)
    return scale.reshape(1), zero_point.to(torch.int32).reshape(1)


def fake_quantize_activation(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to uint8 on the range [low, high] and back (straight-through gradient)."""
    scale, zero_point = activation_qparams(low, high)
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, *ACTIVATION_RANGE).to(x.dtype)


# --- the state: activation ranges and the phase -------------------------------------


class FakeQuantizer(nn.Module):
    """The activation ranges of one model (buffers ``low``, ``high``, ``observed``:
    one entry per point in ``points``) and the phase of the epoch (observing the
    ranges, BatchNorm statistics frozen), set by :meth:`start_epoch`."""

    def __init__(self, points: list[str], settings: FakeQuantSettings):
        super().__init__()
        self.points, self.settings = list(points), settings
        self.register_buffer("low", torch.zeros(len(points)))
        self.register_buffer("high", torch.zeros(len(points)))
        self.register_buffer("observed", torch.zeros(len(points), dtype=torch.bool))
        self.ready = [False] * len(points)  # ``observed`` on the host: no device read per forward
        self.handles: list = []  # the model's hooks (attach_fake_quant)
        self.observing, self.bn_frozen = True, settings.freeze_bn_epochs == 0
        self.register_load_state_dict_post_hook(lambda module, keys: module.sync_ready())

    def sync_ready(self) -> None:
        self.ready = [bool(flag) for flag in self.observed.tolist()]

    def start_epoch(self, epoch: int) -> None:
        """Epochs count from 1: ranges move during the first ``observer_epochs``, BatchNorm
        statistics during the first ``freeze_bn_epochs``."""
        self.observing = epoch <= self.settings.observer_epochs
        self.bn_frozen = epoch > self.settings.freeze_bn_epochs

    def activation(self, index: int, x: torch.Tensor, training: bool) -> torch.Tensor:
        if x.is_meta or not x.is_floating_point():
            return x
        if training and self.observing:
            self.observe(index, x)
        if not self.ready[index]:
            return x  # nothing observed yet (an evaluation before the first training batch)
        return fake_quantize_activation(x, self.low[index], self.high[index])

    @torch.no_grad()
    def observe(self, index: int, x: torch.Tensor) -> None:
        low, high = torch.aminmax(x.detach().float())
        if not self.ready[index]:
            self.low[index], self.high[index] = low, high
            self.observed[index] = True
            self.ready[index] = True
        elif self.settings.observer == "minmax":
            self.low[index] = torch.minimum(self.low[index], low)
            self.high[index] = torch.maximum(self.high[index], high)
        else:
            constant = self.settings.ema_constant
            self.low[index] += constant * (low - self.low[index])
            self.high[index] += constant * (high - self.high[index])

    def ranges(self) -> dict[str, tuple[float, float] | None]:
        """Each point's observed range (``None`` where nothing was observed)."""
        return {point: (float(self.low[i]), float(self.high[i])) if self.ready[i] else None for i, point in enumerate(self.points)}


# --- attaching to a model --------------------------------------------------------------


def quantised_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers int8 export quantises and the simulation covers: ``nn.Conv2d`` and
    ``nn.Linear`` with their own forward (a subclass with another forward is left as it is)."""
    return [(path, module) for path, module in model.named_modules() if type(module).forward in QUANTISED_FORWARDS]


def attach_fake_quant(model: nn.Module, settings: FakeQuantSettings, model_name: str = "the model") -> FakeQuantizer:
    """Make ``model`` compute with fake-quantised weights and activations; returns the
    :class:`FakeQuantizer` holding the ranges. Nothing is added to the model's
    ``state_dict``: each quantised layer's ``forward`` is replaced on the instance, and
    two hooks on the model quantise its output and freeze BatchNorm."""
    layers = quantised_layers(model)
    if not layers:
        raise UserError(f"{model_name} has no nn.Conv2d or nn.Linear layer: int8 export would quantise nothing, so "
                        "scheme 'qat-kd' has nothing to train", fix="use qat-kd on a model built from Conv2d/Linear layers")
    quantizer = FakeQuantizer([f"{path or 'model'}:input" for path, _ in layers] + ["output"], settings)
    for index, (_, layer) in enumerate(layers):
        layer.forward = _quantised_forward(layer, quantizer, index)
    output_index = len(layers)

    def quantise_output(module, inputs, output):
        return quantizer.activation(output_index, output, module.training) if isinstance(output, torch.Tensor) else output

    def freeze_batchnorm(module, inputs):
        if quantizer.bn_frozen and module.training:  # found per call: a SyncBatchNorm conversion replaces the modules
            for norm in module.modules():
                if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                    norm.training = False  # running statistics, as the folded int8 model uses; .train() undoes it
        return None

    quantizer.handles = [model.register_forward_hook(quantise_output), model.register_forward_pre_hook(freeze_batchnorm)]
    return quantizer


def _quantised_forward(layer: nn.Module, quantizer: FakeQuantizer, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    kind = QUANTISED_FORWARDS[type(layer).forward]

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = quantizer.activation(index, x, layer.training)
        weight = layer.weight if layer.weight.is_meta else fake_quantize_weight(layer.weight)
        if kind == "conv":
            return layer._conv_forward(x, weight, layer.bias)
        return F.linear(x, weight, layer.bias)

    return forward


def detach_fake_quant(model: nn.Module, quantizer: FakeQuantizer) -> None:
    """Undo :func:`attach_fake_quant`: the model computes in float again."""
    for _, layer in quantised_layers(model):
        layer.__dict__.pop("forward", None)
    for handle in quantizer.handles:
        handle.remove()
