"""Turning a trained PromptedViT into one deployable file, checked against the eager model.

The exported graph is backbone + prompts + head: a float32 NCHW batch of already normalised
images in, logits out, any batch size. Every file is re-loaded and compared with eager PyTorch
before it replaces `output`, so a file that exists is a file that was verified (or, for ONNX
without onnxruntime, is reported as unchecked).

ONNX goes through torch's TorchScript-based exporter (`dynamo=False`): it needs no package beyond
torch, emits the requested opset natively (the dynamo exporter starts at opset 18 and
down-converts) and is several times faster. It is deprecated upstream; the parity check below is
what makes a switch to `dynamo=True` safe when it goes away.
"""
from __future__ import annotations

import copy
import os
import secrets
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from vpt_cli.errors import ExportError
from vpt_cli.prompts import PromptedViT

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# A single protobuf cannot hold more; bigger models would spill into external data files.
_ONNX_MAX_BYTES = 2**31 - 1
_CHECK_SEED = 0

# Runs the exported file on a batch and returns its logits.
Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ExportResult:
    """What was written and how closely it matches eager PyTorch."""

    path: Path
    format: str  # "onnx" | "torchscript"
    max_abs_diff: float | None  # vs eager on a seeded random batch; None when it could not be run
    checked_with: str  # "onnxruntime 1.32.0", "torch.jit" or "not checked: <why>"
    size_bytes: int


def export_model(
    model: PromptedViT,
    image_size: int,
    fmt: str,
    output: Path,
    *,
    opset: int = 17,
    atol: float = 1e-4,
    batch_for_check: int = 3,
) -> ExportResult:
    """Export `model` as `fmt` to `output`, verified at batch sizes 1 and `batch_for_check`.

    The caller's model is left untouched: a CPU fp32 eval-mode copy is exported. `output` is
    replaced atomically, and only once the check passed; on any failure nothing is left behind.
    Raises ExportError for an unknown format, an exporter failure or logits further than `atol`
    from eager.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}' (choose one of {', '.join(FORMATS)})")
    if batch_for_check < 1:
        raise ExportError("batch_for_check must be at least 1")
    output = Path(output)
    frozen = _export_copy(model)
    batches = _check_batches(frozen, image_size, batch_for_check)
    # Traced with batch 2: a batch of 1 invites exporters to bake that size into the graph.
    example = torch.zeros(2, 3, image_size, image_size)
    with _temporary_sibling(output) as tmp:
        if fmt == "onnx":
            _write_onnx(frozen, example, tmp, opset)
            runner, checked_with = _onnx_runner(tmp)
        else:
            _write_torchscript(frozen, example, tmp)
            runner, checked_with = _torchscript_runner(tmp), "torch.jit"
        max_diff = None if runner is None else _max_abs_diff(runner, batches, atol, fmt)
        try:
            os.replace(tmp, output)
        except OSError as exc:
            raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
    return ExportResult(
        path=output,
        format=fmt,
        max_abs_diff=max_diff,
        checked_with=checked_with,
        size_bytes=output.stat().st_size,
    )


def _export_copy(model: PromptedViT) -> PromptedViT:
    """A CPU fp32 eval-mode copy without grads, so export never changes the caller's model."""
    frozen = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    frozen.eval()
    frozen.requires_grad_(False)
    return frozen


def _check_batches(
    model: PromptedViT, image_size: int, batch_for_check: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random inputs with their eager logits; a model that cannot run them fails early."""
    generator = torch.Generator().manual_seed(_CHECK_SEED)
    sizes = sorted({1, batch_for_check})
    batches = []
    for size in sizes:
        images = torch.randn(size, 3, image_size, image_size, generator=generator)
        try:
            with torch.no_grad():
                logits = model(images)
        except Exception as exc:
            raise ExportError(
                f"the model does not run on a ({size}, 3, {image_size}, {image_size}) batch: {_one_line(exc)}"
            ) from None
        batches.append((images, logits))
    return batches


@contextmanager
def _temporary_sibling(output: Path) -> Iterator[Path]:
    """A temp file next to `output` (same filesystem, so os.replace is atomic), always cleaned up."""
    tmp = output.parent / f".{output.name}.{secrets.token_hex(6)}.tmp"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # Not mkstemp: its 0600 mode would survive the rename; this one honours the umask.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise ExportError(f"cannot write to {output.parent}: {exc.strerror or exc}") from None
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter deprecation and tracer warnings; library code must not write to the console."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if size > _ONNX_MAX_BYTES:
        raise ExportError(
            f"the model has {size / 2**30:.1f} GiB of weights, over ONNX's 2 GiB single-file limit; "
            "export to torchscript instead"
        )
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {_one_line(exc)}") from None


def _onnx_runner(path: Path) -> tuple[Runner | None, str]:
    """An onnxruntime CPU session on `path`, or None (and why) when onnxruntime is missing."""
    try:
        import onnxruntime
    except ImportError:
        return None, "not checked: onnxruntime not installed"
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT logs graph-optimisation notes to stderr
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the exported model: {_one_line(exc)}") from None

    def run(images: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        return torch.from_numpy(logits)

    return run, f"onnxruntime {onnxruntime.__version__}"


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        with _quiet(), torch.no_grad():
            # check_trace would re-run and compare with its own tolerance; our check follows.
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as exc:
        raise ExportError(f"TorchScript export failed: {_one_line(exc)}") from None


def _torchscript_runner(path: Path) -> Runner:
    """The saved file loaded back, so the check covers serialisation too, not just the trace."""
    try:
        with _quiet():
            loaded = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ExportError(f"the saved TorchScript file cannot be loaded: {_one_line(exc)}") from None

    def run(images: torch.Tensor) -> torch.Tensor:
        with _quiet(), torch.no_grad():
            return loaded(images)

    return run


def _max_abs_diff(runner: Runner, batches: list[tuple[torch.Tensor, torch.Tensor]], atol: float, fmt: str) -> float:
    """Largest |exported - eager| over all check batches; over `atol` (or NaN) is an ExportError."""
    worst = 0.0
    for images, expected in batches:
        try:
            actual = runner(images)
        except Exception as exc:
            raise ExportError(
                f"the exported {fmt} model fails on a batch of {images.shape[0]}: {_one_line(exc)}"
            ) from None
        if actual.shape != expected.shape:
            raise ExportError(
                f"the exported {fmt} model returns shape {tuple(actual.shape)} for a batch of "
                f"{images.shape[0]}, expected {tuple(expected.shape)}"
            )
        diff = (actual.float() - expected).abs().max().item()
        if not diff <= atol:  # also catches NaN
            raise ExportError(
                f"the exported {fmt} model differs from eager by {diff:.3g} at batch {images.shape[0]} "
                f"(tolerance {atol:g})"
            )
        worst = max(worst, diff)
    return worst


def _one_line(exc: BaseException) -> str:
    """First line of an exception message (exporter errors can run to pages), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
