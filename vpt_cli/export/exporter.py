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
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from vpt_cli.core.errors import ExportError, one_line
from vpt_cli.core.fileio import atomic_target
from vpt_cli.models.multitask import MultiTaskViT
from vpt_cli.models.prompted import PromptedViT

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
TASK_INPUT_NAME = "task_index"
OUTPUT_NAME = "logits"
# A single protobuf cannot hold more; bigger models would spill into external data files.
_ONNX_MAX_BYTES = 2**31 - 1
_CHECK_SEED = 0

# Runs the exported file on a batch (images, then any further inputs) and returns its logits.
Runner = Callable[..., torch.Tensor]
# Inputs of one check batch, and the eager model's logits for them.
CheckBatch = tuple[tuple[torch.Tensor, ...], torch.Tensor]


@dataclass
class ExportResult:
    """What was written and how closely it matches eager PyTorch."""

    path: Path
    format: str  # "onnx" | "torchscript"
    max_abs_diff: float | None  # vs eager on a seeded random batch; None when it could not be run
    checked_with: str  # "onnxruntime 1.32.0", "torch.jit" or "not checked: <why>"
    size_bytes: int


def export_model(
    model: PromptedViT | MultiTaskViT,
    image_size: int,
    fmt: str,
    output: Path,
    *,
    opset: int = 17,
    atol: float = 1e-4,
    batch_for_check: int = 3,
    metadata: dict[str, str] | None = None,
    dynamic_size: bool = False,
) -> ExportResult:
    """Export `model` as `fmt` to `output`, verified at batch sizes 1 and `batch_for_check`.

    The caller's model is left untouched: a CPU fp32 eval-mode copy is exported. `output` is
    replaced atomically, and only once the check passed; on any failure nothing is left behind.
    Raises ExportError for an unknown format, an exporter failure or logits further than `atol`
    from eager.

    `metadata` (string keys and values: class names, preprocessing, task names) travels inside the
    file: ONNX `metadata_props`, TorchScript extra files (`<key>.txt`), so the file can be used
    without vpt-cli.

    `dynamic_size` (ONNX, backbones whose adapter allows it): height and width become dynamic
    axes too, position embeddings are resampled inside the graph, and the check also runs at a
    larger and a non-square size.

    A MultiTaskViT becomes a multi-task bundle: the backbone once plus every task's stacked
    prompts and heads, a second input `task_index` (int64, one per image), logits padded to the
    largest class count with -inf; it is checked on batches that mix every task.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}' (choose one of {', '.join(FORMATS)})")
    if batch_for_check < 1:
        raise ExportError("batch_for_check must be at least 1")
    frozen = _export_copy(model)
    tasks = model.num_tasks if isinstance(model, MultiTaskViT) else 0
    shapes = [(image_size, image_size)]
    if dynamic_size:
        if fmt != "onnx":
            raise ExportError("--dynamic-size needs --format onnx (a TorchScript trace keeps the traced size)")
        step = frozen.adapter.enable_dynamic_size()  # the copy's backbone only; raises if the family cannot
        shapes += [(image_size + step, image_size + step), (image_size, image_size + 2 * step)]

    def inputs(size: int, generator: torch.Generator, shape: tuple[int, int] = shapes[0]) -> tuple[torch.Tensor, ...]:
        images = torch.randn(size, 3, *shape, generator=generator)
        return (images, torch.arange(size) % tasks) if tasks else (images,)

    batches = [batch for shape in shapes
               for batch in _check_batches(frozen, sorted({1, max(batch_for_check, tasks)}),
                                           lambda size, generator: inputs(size, generator, shape))]
    names = (INPUT_NAME, TASK_INPUT_NAME) if tasks else (INPUT_NAME,)
    # Traced with batch 2: a batch of 1 invites exporters to bake that size into the graph; a
    # dynamic-size export is traced off the trained size, where timm skips the resampling.
    example = inputs(2, torch.Generator(), shapes[-1])
    output = Path(output)
    try:
        with atomic_target(output) as tmp:
            if fmt == "onnx":
                _write_onnx(frozen, example, tmp, opset, names, dynamic_size)
                _add_onnx_metadata(tmp, metadata or {})
                runner, checked_with = _onnx_runner(tmp)
            else:
                _write_torchscript(frozen, example, tmp, metadata or {})
                runner, checked_with = _torchscript_runner(tmp), "torch.jit"
            max_diff = None if runner is None else _max_abs_diff(runner, batches, atol, fmt)
    except OSError as exc:
        raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
    return ExportResult(
        path=output,
        format=fmt,
        max_abs_diff=max_diff,
        checked_with=checked_with,
        size_bytes=output.stat().st_size,
    )


def _export_copy(model: nn.Module) -> nn.Module:
    """A CPU fp32 eval-mode copy without grads, so export never changes the caller's model."""
    frozen = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    frozen.eval()
    frozen.requires_grad_(False)
    return frozen


def _check_batches(model: nn.Module, sizes: list[int],
                   make_inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]]) -> list[CheckBatch]:
    """Seeded random inputs of each size with their eager logits; a model that cannot run them fails early."""
    generator = torch.Generator().manual_seed(_CHECK_SEED)
    batches = []
    for size in sizes:
        inputs = make_inputs(size, generator)
        try:
            with torch.no_grad():
                logits = model(*inputs)
        except Exception as exc:
            raise ExportError(
                f"the model does not run on a {tuple(inputs[0].shape)} batch: {one_line(exc, 300)}"
            ) from None
        batches.append((inputs, logits))
    return batches


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter deprecation and tracer warnings; library code must not write to the console."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _write_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path, opset: int,
                input_names: tuple[str, ...], dynamic_size: bool = False) -> None:
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
                example,
                str(path),
                dynamo=False,
                input_names=list(input_names),
                output_names=[OUTPUT_NAME],
                dynamic_axes={**{name: {0: "batch"} for name in (*input_names, OUTPUT_NAME)},
                              **({INPUT_NAME: {0: "batch", 2: "height", 3: "width"}} if dynamic_size else {})},
                opset_version=opset,
            )
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {one_line(exc, 300)}") from None


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
        raise ExportError(f"onnxruntime cannot load the exported model: {one_line(exc, 300)}") from None

    names = [node.name for node in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run([OUTPUT_NAME], {name: value.numpy() for name, value in zip(names, inputs)})
        return torch.from_numpy(logits)

    return run, f"onnxruntime {onnxruntime.__version__}"


def _add_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Write `metadata` into the model's `metadata_props` (what onnxruntime's modelmeta shows)."""
    if not metadata:
        return
    try:
        import onnx
    except ImportError:
        raise ExportError("writing ONNX metadata needs the onnx package: pip install 'vpt-cli[onnx]'") from None
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def _write_torchscript(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path,
                       metadata: dict[str, str]) -> None:
    try:
        with _quiet(), torch.no_grad():
            # check_trace would re-run and compare with its own tolerance; our check follows.
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={f"{key}.txt": value for key, value in metadata.items()})
    except Exception as exc:
        raise ExportError(f"TorchScript export failed: {one_line(exc, 300)}") from None


def _torchscript_runner(path: Path) -> Runner:
    """The saved file loaded back, so the check covers serialisation too, not just the trace."""
    try:
        with _quiet():
            loaded = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ExportError(f"the saved TorchScript file cannot be loaded: {one_line(exc, 300)}") from None

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with _quiet(), torch.no_grad():
            return loaded(*inputs)

    return run


def _max_abs_diff(runner: Runner, batches: list[CheckBatch], atol: float, fmt: str) -> float:
    """Largest |exported - eager| over all check batches; over `atol` (or NaN) is an ExportError.

    Equal values count as no difference, so matching infinities (a bundle's padded classes) pass.
    """
    worst = 0.0
    for inputs, expected in batches:
        images = inputs[0]
        try:
            actual = runner(*inputs)
        except Exception as exc:
            raise ExportError(
                f"the exported {fmt} model fails on a batch of {images.shape[0]}: {one_line(exc, 300)}"
            ) from None
        if actual.shape != expected.shape:
            raise ExportError(
                f"the exported {fmt} model returns shape {tuple(actual.shape)} for a batch of "
                f"{images.shape[0]}, expected {tuple(expected.shape)}"
            )
        actual = actual.float()
        diff = torch.where(actual == expected, 0.0, (actual - expected).abs()).max().item()
        if not diff <= atol:  # also catches NaN
            raise ExportError(
                f"the exported {fmt} model differs from eager by {diff:.3g} at batch {images.shape[0]} "
                f"(tolerance {atol:g})"
            )
        worst = max(worst, diff)
    return worst
