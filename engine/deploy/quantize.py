"""``pyramidkd export --format onnx --quantize int8``: post-training static quantisation
with ONNX Runtime (docs/deploy.md, "Int8").

The stage's model is exported to fp32 ONNX (:func:`.formats.export_onnx`), shape-
inferred and optimised (``quant_pre_process``), then quantised by
``onnxruntime.quantization.quantize_static``: QDQ format, int8 weights per output
channel, uint8 activations (measured best on x86 CPUs; ``activations="int8"`` is
the other choice), their ranges calibrated (MinMax) on ``calibration`` training
images drawn with the run's seed. The training images are taken exactly as training
saw them, less the augmentation. The int8 file is judged by its accuracy (no logits
bound): its report holds its test accuracy next to the fp32 model's, both file
sizes and both latencies (one image, one thread).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import UserError
from .errors import DEPLOY_PACKAGES, require
from .export import Exported, ExportSource, export_source, write_verified
from .formats import Artefact, ExportFormat, export_onnx, onnx_runner
from .runs import test_batches
from .verify import verify

DEFAULT_CALIBRATION = 256
CALIBRATION_BATCH = 32
ACTIVATION_TYPES = ("uint8", "int8")
LATENCY_BUDGET_S = 1.0  # per latency figure in the report (one image, one thread)


def _no_direct_export(model, example, metadata) -> Artefact:
    raise UserError("int8 needs calibration images", fix="use pyramidkd export RUN_DIR --format onnx --quantize int8")


INT8_ONNX = ExportFormat("onnx-int8", ".int8.onnx", _no_direct_export, onnx_runner, DEPLOY_PACKAGES,
                         "ONNX with int8 weights and activations (QDQ), run with onnxruntime")


def quantize_stage(run_dir: str, stage_id: str | None = None, output: str | None = None, *,
                   calibration: int | None = None, activations: str = "uint8", preprocess: bool = True,
                   batch_size: int = 64, latency_budget_s: float = LATENCY_BUDGET_S) -> Exported:
    """Quantise stage ``stage_id`` of the run in ``run_dir`` to int8 ONNX and write it
    (default ``RUN_DIR/export/<stage>.int8.onnx``) with its report beside it.
    ``calibration``: how many training images (default :data:`DEFAULT_CALIBRATION`,
    or all of them where the run has fewer)."""
    require(*DEPLOY_PACKAGES, purpose="--quantize int8")
    if activations not in ACTIVATION_TYPES:
        raise UserError(f"unknown activation type {activations!r}", fix=f"use one of: {', '.join(ACTIVATION_TYPES)}")
    source = export_source(run_dir, stage_id)
    calibration_images = draw_calibration(source, calibration)
    fp32 = export_onnx(source.model, source.example(), source.metadata())
    payload, settings = quantize_onnx(fp32.payload, calibration_images, activations=activations, preprocess=preprocess)
    settings["calibration"].update({"split": "train", "seed": source.seed, "augmentation": "none"})
    metadata = {**source.metadata(), "quantization": json.dumps(settings, sort_keys=True)}
    artefact = Artefact(with_metadata(payload, metadata), f"{fp32.exporter} + onnxruntime.quantization.quantize_static",
                        dict(fp32.versions), list(fp32.notes))

    def comparison(checked) -> dict:
        return int8_report(source, settings, fp32, artefact, checked, batch_size, latency_budget_s)

    return write_verified(source, INT8_ONNX, artefact, output, batch_size=batch_size, tolerance=None, extra=comparison)


def draw_calibration(source: ExportSource, count: int | None) -> torch.Tensor:
    """``count`` training images, drawn with the run's seed, preprocessed as training
    preprocesses them without augmentation: ``[count, C, H, W]`` float32."""
    split = unaugmented(source.train_split, source.test_split)
    available = len(split)
    count = min(DEFAULT_CALIBRATION, available) if count is None else count
    if count < 1 or count > available:
        raise UserError(f"--calibration {count}: the calibration images are drawn from the run's {available} training images",
                        fix=f"pass --calibration between 1 and {available} (default {min(DEFAULT_CALIBRATION, available)})")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(int(source.seed)))[:count]
    images = getattr(split, "images", None)
    if images is not None and hasattr(split, "labels"):  # a tensor split: indexing gives un-augmented samples
        from ..data.splits import normalize

        chosen = images[order].cpu()
        return (normalize(chosen, split.mean, split.std) if chosen.dtype == torch.uint8 else chosen).float()
    return torch.stack([torch.as_tensor(split[int(index)][0]) for index in order]).float()


def unaugmented(train: Any, test: Any) -> Any:
    """The training split without its augmentation: a view whose per-sample transform is
    the evaluation one (the test view's) where both have one; a tensor split as it is
    (augmentation happens per batch, outside it)."""
    if getattr(train, "images", None) is not None or not hasattr(train, "transform") or not hasattr(test, "transform"):
        return train
    plain = copy.copy(train)
    plain.transform = test.transform
    return plain


class _Calibration:
    """ONNX Runtime's ``CalibrationDataReader``: the images, a batch at a time."""

    def __init__(self, name: str, images: torch.Tensor):
        self.batches: Iterator = iter([{name: chunk.numpy()} for chunk in images.split(CALIBRATION_BATCH)])

    def get_next(self):
        return next(self.batches, None)


def quantize_onnx(payload: bytes, images: torch.Tensor, *, activations: str = "uint8", preprocess: bool = True) -> tuple[bytes, dict]:
    """fp32 ONNX bytes -> int8 QDQ ONNX bytes, calibrated on ``images``; and the settings used."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="pyramidkd-int8-") as folder:
        fp32_path, prepared, int8_path = (os.path.join(folder, name) for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        with open(fp32_path, "wb") as handle:
            handle.write(payload)
        source_path = fp32_path
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(fp32_path, prepared, skip_symbolic_shape=False)
            source_path = prepared
        quantize_static(source_path, int8_path, _Calibration("input", images), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        with open(int8_path, "rb") as handle:
            quantized = handle.read()
    settings = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True, "weights": "int8",
                "activations": activations, "preprocessed": preprocess,
                "calibration": {"images": len(images), "method": "MinMax"}}
    return quantized, settings


def with_metadata(payload: bytes, metadata: dict[str, str]) -> bytes:
    """The model with ``metadata`` as its ``metadata_props`` (the quantiser may drop them)."""
    import onnx

    proto = onnx.load_from_string(payload)
    kept = [entry for entry in proto.metadata_props if entry.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def int8_report(source: ExportSource, settings: dict, fp32: Artefact, int8: Artefact, checked, batch_size: int,
                budget_s: float) -> dict:
    """The int8 file next to the fp32 one: accuracy, size, latency (one image, one thread)."""
    from .timing import measure_runner, ort_session_runner

    fp32_checked = verify(source.model, onnx_runner(fp32.payload), test_batches(source.test_split, batch_size),
                          what="the fp32 ONNX model")
    example = source.example(1)
    latency = {}
    for name, payload in (("fp32", fp32.payload), ("int8", int8.payload)):
        timing = measure_runner(ort_session_runner(payload, threads=1), example.numpy(), budget_s=budget_s)
        latency[name] = timing["median_ms"]
    return {
        "quantization": settings,
        "fp32": {"test_accuracy": fp32_checked.accuracy, "file_bytes": len(fp32.payload), "latency_ms": latency["fp32"]},
        "int8_vs_fp32": {
            "accuracy_drop_points": 100 * (fp32_checked.accuracy - checked.accuracy),
            "agreement_with_checkpoint": checked.agreement,
            "size_ratio": len(int8.payload) / len(fp32.payload),
            "latency_ms": {"fp32": latency["fp32"], "int8": latency["int8"], "batch": 1, "threads": 1},
            "speedup": latency["fp32"] / max(latency["int8"], 1e-9),
        },
    }


def int8_summary(report: dict) -> list[str]:
    """The lines ``pyramidkd export --quantize int8`` prints about the int8 file."""
    versus, fp32, settings = report["int8_vs_fp32"], report["fp32"], report["quantization"]
    latency = versus["latency_ms"]
    return [f"  int8 vs fp32: test accuracy {100 * report['test_accuracy']['exported']:.2f} % vs "
            f"{100 * fp32['test_accuracy']:.2f} % (drop {versus['accuracy_drop_points']:.2f} points); file "
            f"{report['file_bytes'] / 1e6:.3f} MB vs {fp32['file_bytes'] / 1e6:.3f} MB; latency (1 image, 1 thread) "
            f"{latency['int8']:.3f} ms vs {latency['fp32']:.3f} ms",
            f"  calibrated on {settings['calibration']['images']} training images (seed {settings['calibration']['seed']}), "
            f"{settings['format']}, per-channel int8 weights, {settings['activations']} activations"]
