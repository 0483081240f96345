"""Exported ONNX/TorchScript files must compute what the eager PromptedViT computes."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from vpt_cli.config import BackboneConfig, PromptConfig
from vpt_cli.core.errors import ExportError
from vpt_cli.export.exporter import FORMATS, export_model
from vpt_cli.models.backbones import create_backbone
from vpt_cli.models.prompted import PromptedViT

IMG = 32
TINY = BackboneConfig(
    name="vit_tiny_patch16_224", img_size=IMG, kwargs=dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)
)


def tiny_model(method: str = "vpt-deep") -> PromptedViT:
    """A random 2-block ViT with random (not init-sized) prompts and head, so errors show up."""
    torch.manual_seed(0)
    backbone = create_backbone(TINY, pretrained=False)
    model = PromptedViT(backbone.model, num_classes=4, prompt=PromptConfig(method=method, num_prompts=3))
    with torch.no_grad():
        if model.num_prompts:
            model.prompts.normal_()
        model.head.weight.normal_()
        model.head.bias.normal_()
    return model.eval()


def eager(model: PromptedViT, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("method", ["vpt-deep", "vpt-shallow", "linear"])
def test_onnx_matches_eager_at_batch_1_and_5(tmp_path: Path, method: str) -> None:
    model = tiny_model(method)
    out = tmp_path / "model.onnx"
    result = export_model(model, IMG, "onnx", out, batch_for_check=5)
    assert result.path == out and result.format == "onnx"
    assert result.size_bytes == out.stat().st_size > 0

    import onnxruntime as ort  # a dev dependency: its absence must fail this test, not skip it

    assert result.checked_with == f"onnxruntime {ort.__version__}"
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 5):
        images = torch.randn(batch, 3, IMG, IMG)
        (logits,) = session.run(None, {"images": images.numpy()})
        assert logits.shape == (batch, 4)
        assert (torch.from_numpy(logits) - eager(model, images)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", ["vpt-deep", "vpt-shallow"])
def test_torchscript_matches_eager(tmp_path: Path, method: str) -> None:
    model = tiny_model(method)
    out = tmp_path / "model.pt"
    result = export_model(model, IMG, "torchscript", out)
    assert result.checked_with == "torch.jit"
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated upstream
        loaded = torch.jit.load(str(out))
    for batch in (1, 5):
        images = torch.randn(batch, 3, IMG, IMG)
        with torch.no_grad():
            assert (loaded(images) - eager(model, images)).abs().max().item() <= 1e-4


def test_success_creates_parents_and_leaves_only_the_output(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir" / "model.onnx"
    export_model(tiny_model(), IMG, "onnx", out)
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not a private temp file


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_check_leaves_no_files_and_keeps_old_output(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "model.bin"
    out.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="differs from eager by"):
        export_model(tiny_model(), IMG, fmt, out, atol=-1.0)  # no diff can pass a negative tolerance
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_exporter_crash_is_one_line_export_error_without_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(model: torch.nn.Module, args: tuple, f: str, **kwargs: object) -> None:
        Path(f).write_bytes(b"half a graph")
        raise RuntimeError("unsupported operator\nlong traceback-like detail")

    monkeypatch.setattr(torch.onnx, "export", crash)
    with pytest.raises(ExportError) as info:
        export_model(tiny_model(), IMG, "onnx", tmp_path / "model.onnx")
    assert str(info.value) == "ONNX export failed: unsupported operator"
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_names_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="onnx, torchscript") as info:
        export_model(tiny_model(), IMG, "tflite", tmp_path / "model.tflite")
    assert info.value.exit_code == 6
    assert list(tmp_path.iterdir()) == []


def test_callers_training_state_is_preserved(tmp_path: Path) -> None:
    model = tiny_model("vpt-deep").train()  # prompt dropout 0.1 is active, yet the export must match eval
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = export_model(model, IMG, "torchscript", tmp_path / "model.pt")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert model.training and model.prompt_dropout.training and not model.backbone.training
    assert model.prompts.requires_grad and model.head.weight.requires_grad
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_without_onnxruntime_exports_unchecked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    out = tmp_path / "model.onnx"
    result = export_model(tiny_model(), IMG, "onnx", out)
    assert result.max_abs_diff is None
    assert result.checked_with == "not checked: onnxruntime not installed"
    assert out.stat().st_size == result.size_bytes > 0


def test_wrong_image_size_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not run on a"):
        export_model(tiny_model(), IMG * 2, "onnx", tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_is_silent(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fmt in FORMATS:
            export_model(tiny_model(), IMG, fmt, tmp_path / f"model.{fmt}")
    assert capfd.readouterr() == ("", "")


def test_half_precision_model_is_exported_in_fp32_and_left_as_is(tmp_path: Path) -> None:
    model = tiny_model("vpt-shallow").to(torch.bfloat16)
    result = export_model(model, IMG, "onnx", tmp_path / "model.onnx")
    assert result.max_abs_diff is None or result.max_abs_diff <= 1e-4
    assert model.prompts.dtype == torch.bfloat16 and model.head.weight.dtype == torch.bfloat16


def test_dynamic_size_onnx_runs_at_other_sizes_like_eager(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = tiny_model("vpt-deep")
    result = export_model(model, IMG, "onnx", tmp_path / "dynamic.onnx", dynamic_size=True)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4  # checked at 3 sizes, one non-square
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [str(d) for d in session.get_inputs()[0].shape[2:]] == ["height", "width"]
    at_trained = torch.randn(2, 3, IMG, IMG)
    (logits,) = session.run(None, {"images": at_trained.numpy()})
    assert (torch.from_numpy(logits) - eager(model, at_trained)).abs().max().item() <= 1e-4  # unchanged at its size
    (bigger,) = session.run(None, {"images": torch.randn(1, 3, IMG + 16, IMG + 8).numpy()})
    assert bigger.shape == (1, 4)
    with pytest.raises(ExportError, match="needs --format onnx"):
        export_model(model, IMG, "torchscript", tmp_path / "dynamic.pt", dynamic_size=True)
    assert not model.adapter.dynamic and model.backbone.patch_embed.flatten  # only the export copy changed
