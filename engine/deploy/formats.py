"""One exporter per format: the model in, the file's bytes out, plus a runner that
executes those bytes the way a deployer would (onnxruntime, ``torch.export.load``,
``torch.jit.load``). Nothing is written here: :mod:`.export` verifies the bytes
first and writes them atomically afterwards.

Each file carries the preprocessing description and where the model comes from as
JSON: ONNX in ``metadata_props`` (keys ``preprocessing`` and ``pyramidkd``), pt2 and
TorchScript as extra files (``preprocessing.json``, ``pyramidkd.json``) inside the
archive.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from typing import Callable

import attrs
import torch
from torch import nn

from .errors import DEPLOY_PACKAGES, ExportError, require

Runner = Callable[[torch.Tensor], torch.Tensor]  # a float batch [N, C, H, W] -> logits [N, classes]
OP_PATTERNS = [  # how the exporters name an operator they cannot convert, most specific first
    re.compile(r"OpOverload\(op='([\w.]+)'"),  # dynamo ONNX: No ONNX function found for <OpOverload(op='aten.x', ...)>
    re.compile(r"target=torch\.ops\.([\w.]+)"),  # dynamo ONNX: Error when translating node ... target=torch.ops.x.y
    re.compile(r"operator '?(\w+::\w+)"),  # TorchScript-based ONNX: Exporting the operator 'aten::x' to ONNX opset
    re.compile(r"namespace (\w+::\w+)"),  # TorchScript-based ONNX: unrecognized namespace x::y
]
TRACE_TOLERANCE = 1e-6  # traced vs eager: the same kernels, so the same logits up to rounding


@attrs.define
class Artefact:
    """An exported model: its bytes, how it was made, and notes worth a line each."""

    payload: bytes
    exporter: str
    versions: dict = attrs.field(factory=dict)
    notes: list[str] = attrs.field(factory=list)


@attrs.define(frozen=True)
class ExportFormat:
    """A format ``pyramidkd export --format NAME`` offers."""

    name: str
    suffix: str  # the file's ending, e.g. ".onnx"
    export: Callable[[nn.Module, torch.Tensor, dict[str, str]], Artefact]  # (eval model, example batch, JSON metadata)
    runner: Callable[[bytes], Runner]
    packages: tuple[str, ...] = ()  # optional packages it needs (the deploy extra)
    description: str = ""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def unsupported_op(error: BaseException) -> str | None:
    """The operator an exporter error names (``aten::fft_rfft2``, ``mylib.op.default``), if any."""
    text = str(error)
    for pattern in OP_PATTERNS:
        found = pattern.search(text)
        if found:
            return found.group(1)
    return None


def cannot_export(format_name: str, error: BaseException, others: str) -> ExportError:
    op = unsupported_op(error)
    what = f"the model uses {op}, which the {format_name} exporter cannot handle" if op else \
        f"the {format_name} exporter failed ({first_line(error)})"
    return ExportError(what, fix=f"export to another format ({others}), or replace that operation in the model")


@contextlib.contextmanager
def quiet_deprecations():
    """TorchScript (and the TorchScript-based ONNX exporter) warn that they are deprecated
    at every call; a user who asked for them knows: no such line on the console."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _dynamic_batch() -> tuple:
    return ({0: torch.export.Dim("batch")},)


# --- ONNX -------------------------------------------------------------------------


def export_onnx(model: nn.Module, example: torch.Tensor, metadata: dict[str, str]) -> Artefact:
    """``torch.onnx.export(dynamo=True)``; the TorchScript-based exporter where that fails
    (said in a note). Dynamic batch axis, metadata added, ``onnx.checker`` run."""
    import onnx

    notes: list[str] = []
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=_dynamic_batch(), input_names=["input"],
                                    output_names=["logits"], verbose=False)
        proto, exporter = program.model_proto, "torch.onnx.export(dynamo=True)"
    except Exception as dynamo_error:
        proto, exporter = _legacy_onnx(model, example, dynamo_error), "torch.onnx.export(dynamo=False)"
        notes.append(f"onnx: the dynamo exporter failed ({first_line(dynamo_error)}); used the TorchScript-based exporter")
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as error:
        raise ExportError(f"the exported ONNX model fails onnx.checker ({first_line(error)})",
                          fix="export to another format (--format pt2 or torchscript)") from error
    opset = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)
    return Artefact(proto.SerializeToString(), exporter, {"onnx": onnx.__version__, "opset": opset, "ir_version": proto.ir_version},
                    notes)


def _legacy_onnx(model: nn.Module, example: torch.Tensor, dynamo_error: BaseException):
    import onnx

    buffer = io.BytesIO()
    try:
        with quiet_deprecations():
            torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as error:
        raise cannot_export("ONNX", dynamo_error if unsupported_op(dynamo_error) else error, "--format pt2 or torchscript") from error
    return onnx.load_from_string(buffer.getvalue())


def onnx_runner(payload: bytes) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-node warnings on the console
    session = onnxruntime.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: images.detach().cpu().float().numpy()})[0])

    return run


# --- torch.export (pt2) -----------------------------------------------------------


def export_pt2(model: nn.Module, example: torch.Tensor, metadata: dict[str, str]) -> Artefact:
    """A ``torch.export`` ExportedProgram with a dynamic batch axis, saved with
    ``torch.export.save``; the metadata as extra files."""
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
    except Exception as error:
        raise cannot_export("torch.export (pt2)", error, "--format onnx or torchscript") from error
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={f"{key}.json": value for key, value in metadata.items()})
    return Artefact(buffer.getvalue(), "torch.export.export", {})


def pt2_runner(payload: bytes) -> Runner:
    module = torch.export.load(io.BytesIO(payload)).module()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(images)

    return run


def read_pt2_metadata(payload: bytes, keys: tuple[str, ...] = ("preprocessing", "pyramidkd")) -> dict[str, str]:
    files = {f"{key}.json": "" for key in keys}
    torch.export.load(io.BytesIO(payload), extra_files=files)
    return {name[: -len(".json")]: text for name, text in files.items()}


# --- TorchScript ------------------------------------------------------------------


def export_torchscript(model: nn.Module, example: torch.Tensor, metadata: dict[str, str]) -> Artefact:
    """``torch.jit.script``; where scripting fails, ``torch.jit.trace`` checked against
    the eager model on other inputs (said in a note)."""
    notes: list[str] = []
    try:
        with quiet_deprecations():
            compiled, exporter = torch.jit.script(model), "torch.jit.script"
    except Exception as script_error:
        compiled, exporter = _checked_trace(model, example, script_error), "torch.jit.trace"
        notes.append(f"torchscript: torch.jit.script failed ({first_line(script_error)}); traced instead, "
                     "traced and eager logits checked equal")
    buffer = io.BytesIO()
    with quiet_deprecations():
        torch.jit.save(compiled, buffer, _extra_files={f"{key}.json": value for key, value in metadata.items()})
    return Artefact(buffer.getvalue(), exporter, {}, notes)


def _checked_trace(model: nn.Module, example: torch.Tensor, script_error: BaseException):
    try:
        with torch.no_grad(), quiet_deprecations():
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as error:
        raise cannot_export("TorchScript", error, "--format onnx or pt2") from error
    # other inputs than the one traced, another batch size: a branch frozen by tracing shows here
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((example.shape[0] + 3, *example.shape[1:]), generator=generator, dtype=example.dtype)
    with torch.no_grad():
        eager, replayed = model(sample), traced(sample)
    difference = float((eager - replayed).abs().max())
    if difference > TRACE_TOLERANCE * max(1.0, float(eager.abs().max())):
        raise ExportError(f"torch.jit.script failed ({first_line(script_error)}) and the traced model differs from the eager "
                          f"one by {difference:.3g} on other inputs (its forward depends on the input)",
                          fix="export to another format (--format onnx or pt2)")
    return traced


def torchscript_runner(payload: bytes) -> Runner:
    with quiet_deprecations():
        module = torch.jit.load(io.BytesIO(payload), map_location="cpu")

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(images)

    return run


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat("onnx", ".onnx", export_onnx, onnx_runner, DEPLOY_PACKAGES, "ONNX, run with onnxruntime"),
    "pt2": ExportFormat("pt2", ".pt2", export_pt2, pt2_runner, (), "a torch.export ExportedProgram (torch.export.load)"),
    "torchscript": ExportFormat("torchscript", ".torchscript.pt", export_torchscript, torchscript_runner, (),
                                "TorchScript (torch.jit.load)"),
}


def get_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise ExportError(f"unknown export format {name!r}", fix=f"use one of: {', '.join(FORMATS)}")
    export_format = FORMATS[name]
    if export_format.packages:
        require(*export_format.packages, purpose=f"--format {name}")
    return export_format
