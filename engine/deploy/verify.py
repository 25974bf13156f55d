"""Verification of an exported file: run it on the stage's test images and compare
its logits with the PyTorch model's, batch by batch, and both accuracies.

The logits check: ``max |exported - pytorch|`` over every test image, relative to
the largest ``|pytorch logit|``, must stay within ``tolerance`` (1e-4 for fp32). A
format that changes the numbers on purpose (int8) passes ``tolerance=None``: only
the accuracies are reported. One image alone is run too, so the file's batch axis
is shown to be dynamic (the test batches have another size).
"""

from __future__ import annotations

from typing import Iterable

import attrs
import torch
from torch import nn

from .errors import ExportError
from .formats import Runner

FP32_TOLERANCE = 1e-4


@attrs.define
class Verification:
    images: int
    batch_sizes: list[int]
    max_abs_diff: float
    max_abs_logit: float
    relative_diff: float
    tolerance: float | None
    accuracy: float  # the exported file's test accuracy (a fraction)
    reference_accuracy: float  # the PyTorch model's, on the same images
    agreement: float  # the share of images on which both predict the same class

    @property
    def passed(self) -> bool:
        return self.tolerance is None or self.relative_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {**attrs.asdict(self), "passed": self.passed}


@torch.no_grad()
def verify(model: nn.Module, run: Runner, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
           tolerance: float | None = FP32_TOLERANCE, what: str = "the exported model") -> Verification:
    """Compare ``run`` (the exported file) with ``model`` on ``batches``; an error when
    the logits differ beyond ``tolerance`` or there are no test images."""
    model.eval()
    seen = correct = reference_correct = agreed = 0
    max_diff = max_logit = 0.0
    sizes: list[int] = []
    for images, labels in batches:
        if not sizes:
            single = run(images[:1])  # one image alone: the batch axis is dynamic
            max_diff = float((single.float() - model(images[:1]).float()).abs().max())
            sizes.append(1)
        reference, exported = model(images).float(), run(images).float()
        max_diff = max(max_diff, float((exported - reference).abs().max()))
        max_logit = max(max_logit, float(reference.abs().max()))
        predicted, expected = exported.argmax(1), reference.argmax(1)
        correct += int((predicted == labels).sum())
        reference_correct += int((expected == labels).sum())
        agreed += int((predicted == expected).sum())
        seen += len(labels)
        if len(labels) not in sizes:
            sizes.append(len(labels))
    if not seen:
        raise ExportError("the stage's test split holds no images: nothing to verify the export on",
                          fix="check the run's [dataset] (test_limit, test_size)")
    relative = max_diff / max(max_logit, 1e-12)
    result = Verification(seen, sizes, max_diff, max_logit, relative, tolerance, correct / seen, reference_correct / seen, agreed / seen)
    if not result.passed:
        raise ExportError(f"{what} does not reproduce the checkpoint: its logits differ by up to {max_diff:.3g} "
                          f"({relative:.2e} of the largest logit, more than the {tolerance:g} allowed) on {seen} test images",
                          fix="export to another --format, and report the model and format as a bug")
    return result
