"""Tests for vpt_cli.data: folder discovery, splitting, decoding, transforms, loaders, sample_data."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

from vpt_cli.core.errors import DataError, UsageError
from vpt_cli.data import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    ImageLoadError,
    Sample,
    build_transform,
    collate_skip_bad,
    discover_splits,
    list_images,
    load_image,
    make_loader,
    scan_class_folders,
    validate_samples,
)

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# What timm.data.resolve_data_config returns for a ViT, shrunk to 32 px to keep tests fast.
DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.9,
    "crop_mode": "center",
}


def write_image(path: Path, size: tuple[int, int] = (6, 4), mode: str = "RGB", color: object = "red") -> Path:
    """A tiny real image at `path` (format from the extension), parents created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def make_tree(root: Path, counts: dict[str, int]) -> Path:
    """root/<class>/<i>.png with counts[class] images each."""
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_image(root / name / f"{i:03d}.png")
    return root


def labels_by_class(samples: list[Sample], classes: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(classes, 0)
    for sample in samples:
        counts[classes[sample.label]] += 1
    return counts


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*"))


# --- layout detection ------------------------------------------------------------------------


def test_class_folders_are_sorted_and_label_their_images(tmp_path):
    make_tree(tmp_path, {"zebra": 3, "Ant": 3, "cat": 3})
    splits = discover_splits(tmp_path)
    assert splits.classes == ["Ant", "cat", "zebra"]
    for sample in splits.train + splits.val:
        assert sample.path.parent.name == splits.classes[sample.label]
    assert splits.source == "auto-split (10% val, seed 0)"


@pytest.mark.parametrize("val_name", ["val", "valid", "Validation", "TEST"])
def test_split_folders_use_the_val_folder(tmp_path, val_name):
    make_tree(tmp_path / "train", {"b": 4, "a": 4})
    make_tree(tmp_path / val_name, {"a": 2, "b": 1})
    splits = discover_splits(tmp_path)
    assert splits.source == "folders"
    assert splits.classes == ["a", "b"]
    assert len(splits.train) == 8
    assert labels_by_class(splits.val, splits.classes) == {"a": 2, "b": 1}
    assert all(s.path.is_relative_to(tmp_path / val_name) for s in splits.val)


def test_val_folder_priority_and_unused_folders_reported(tmp_path):
    make_tree(tmp_path / "train", {"a": 2, "b": 2})
    make_tree(tmp_path / "test", {"a": 1, "b": 1})
    make_tree(tmp_path / "val", {"a": 3, "b": 3})
    splits = discover_splits(tmp_path)
    assert len(splits.val) == 6
    assert (tmp_path / "test") in [path for path, _ in splits.skipped]


def test_train_folder_without_val_is_auto_split(tmp_path):
    make_tree(tmp_path / "train", {"a": 10, "b": 10})
    splits = discover_splits(tmp_path, val_split=0.2)
    assert splits.source.startswith("auto-split (20% val")
    assert labels_by_class(splits.val, splits.classes) == {"a": 2, "b": 2}


def test_val_class_missing_from_train_is_an_error(tmp_path):
    make_tree(tmp_path / "train", {"a": 2, "b": 2})
    make_tree(tmp_path / "val", {"a": 1, "c": 1})
    with pytest.raises(DataError, match="not in train/: c"):
        discover_splits(tmp_path)


def test_nested_subfolders_are_included_in_sorted_order(tmp_path):
    make_tree(tmp_path, {"a": 1, "b": 1})
    write_image(tmp_path / "a" / "z_sub" / "deep" / "x.png")
    write_image(tmp_path / "a" / "m_sub" / "y.jpg")
    _, samples, _, _ = scan_class_folders(tmp_path)
    a_paths = [s.path.relative_to(tmp_path / "a").as_posix() for s in samples if s.label == 0]
    assert a_paths == ["000.png", "m_sub/y.jpg", "z_sub/deep/x.png"]


# --- auto split ------------------------------------------------------------------------------


def test_auto_split_is_stratified_with_clamped_counts(tmp_path):
    make_tree(tmp_path, {"one": 1, "two": 2, "ten": 10, "many": 25})
    splits = discover_splits(tmp_path, val_split=0.1)
    val = labels_by_class(splits.val, splits.classes)
    train = labels_by_class(splits.train, splits.classes)
    assert val == {"many": 2, "one": 0, "ten": 1, "two": 1}  # round(2.5) == 2; min 1 val when n >= 2
    assert train == {"many": 23, "one": 1, "ten": 9, "two": 1}  # always >= 1 train image
    assert not {s.path for s in splits.train} & {s.path for s in splits.val}


def test_auto_split_is_deterministic_per_seed(tmp_path):
    make_tree(tmp_path, {"a": 30, "b": 30})

    def val_paths(seed: int) -> list[Path]:
        return [s.path for s in discover_splits(tmp_path, val_split=0.5, seed=seed).val]

    assert val_paths(0) == val_paths(0)
    assert val_paths(0) != val_paths(1)


def test_zero_val_split_leaves_val_empty(tmp_path):
    make_tree(tmp_path, {"a": 5, "b": 5})
    splits = discover_splits(tmp_path, val_split=0.0)
    assert splits.val == [] and len(splits.train) == 10


def test_bad_val_split_is_a_usage_error(tmp_path):
    make_tree(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(UsageError):
        discover_splits(tmp_path, val_split=1.0)


def test_discovery_never_copies_or_moves_files(tmp_path):
    make_tree(tmp_path, {"a": 5, "b": 5})
    before = all_files(tmp_path)
    splits = discover_splits(tmp_path, val_split=0.4)
    assert all_files(tmp_path) == before
    assert sorted(s.path for s in splits.train + splits.val) == [p for p in before if p.is_file()]


# --- what is ignored or skipped --------------------------------------------------------------


def test_hidden_and_os_clutter_are_ignored_silently(tmp_path):
    make_tree(tmp_path, {"a": 2, "b": 2})
    for junk in ("a/.DS_Store", "a/THUMBS.DB", "b/desktop.ini", ".notes.txt"):
        (tmp_path / junk).write_bytes(b"junk")
    for hidden_image in (".root.png", "a/._000.png", "a/.cache/x.png", "__MACOSX/a/000.png", ".git/x.png"):
        write_image(tmp_path / hidden_image)
    splits = discover_splits(tmp_path)
    assert splits.classes == ["a", "b"]
    assert splits.skipped == []
    assert len(splits.train) + len(splits.val) == 4


def test_non_images_are_skipped_and_listed(tmp_path):
    make_tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "b" / "README").write_text("x")
    write_image(tmp_path / "a" / "upper.JPG")
    (tmp_path / "LICENSE.md").write_text("next to the class folders: not data, not reported")
    write_image(tmp_path / "stray.png")
    splits = discover_splits(tmp_path)
    reasons = {path.name: reason for path, reason in splits.skipped}
    assert set(reasons) == {"notes.txt", "README", "stray.png"}
    assert "outside a class folder" in reasons["stray.png"]
    assert "'.txt'" in reasons["notes.txt"] and "no extension" in reasons["README"]
    assert len(splits.train) + len(splits.val) == 5  # .JPG counts: extensions compare lowercase


def test_image_extensions_cover_the_documented_formats():
    documented = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
    assert documented == IMAGE_EXTENSIONS


# --- errors a user must fix ------------------------------------------------------------------


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover_splits(tmp_path / "nope")


def test_data_is_a_file(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        discover_splits(write_image(tmp_path / "x.png"))


def test_no_class_folders(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        discover_splits(tmp_path)


def test_images_at_root_explain_the_layout(tmp_path):
    write_image(tmp_path / "1.png")
    write_image(tmp_path / "2.jpg")
    with pytest.raises(DataError, match=r"DATA/<class>/<image>"):
        discover_splits(tmp_path)


def test_single_class(tmp_path):
    make_tree(tmp_path, {"only": 3})
    with pytest.raises(DataError, match="need at least 2 classes"):
        discover_splits(tmp_path)


def test_empty_class_folders_are_named(tmp_path):
    make_tree(tmp_path, {"a": 2, "empty1": 0, "empty2": 0})
    (tmp_path / "empty2" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="empty1, empty2"):
        discover_splits(tmp_path)


def test_no_images_at_all(tmp_path):
    make_tree(tmp_path, {"a": 0, "b": 0})
    (tmp_path / "a" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="no images found"):
        discover_splits(tmp_path)


def test_empty_train_split_errors_name_the_train_folder(tmp_path):
    make_tree(tmp_path / "train", {"a": 2})
    make_tree(tmp_path / "val", {"a": 1})
    with pytest.raises(DataError, match="need at least 2 classes"):
        discover_splits(tmp_path)


def test_val_folder_without_images(tmp_path):
    make_tree(tmp_path / "train", {"a": 2, "b": 2})
    make_tree(tmp_path / "val", {"a": 0, "b": 0})
    with pytest.raises(DataError, match="no images found"):
        discover_splits(tmp_path)


# --- scan with a known class list (eval) -----------------------------------------------------


def test_scan_with_given_classes_reports_unknown_folders(tmp_path):
    make_tree(tmp_path, {"cat": 2, "dog": 1, "horse": 3, "empty": 0})
    classes, samples, _, unknown = scan_class_folders(tmp_path, classes=["dog", "cat", "bird", "empty"])
    assert classes == ["dog", "cat", "bird", "empty"]
    assert unknown == ["horse"]
    assert sorted((s.path.parent.name, s.label) for s in samples) == [("cat", 1), ("cat", 1), ("dog", 0)]


def test_scan_with_given_classes_and_no_known_images(tmp_path):
    make_tree(tmp_path, {"horse": 2})
    with pytest.raises(DataError, match="horse"):
        scan_class_folders(tmp_path, classes=["cat", "dog"])


# --- list_images (predict inputs) ------------------------------------------------------------


def test_list_images_files_folders_globs_and_missing(tmp_path):
    one = write_image(tmp_path / "one.png")
    write_image(tmp_path / "dir" / "b.jpg")
    write_image(tmp_path / "dir" / "sub" / "a.png")
    write_image(tmp_path / "dir" / ".hidden.png")
    (tmp_path / "dir" / "notes.txt").write_text("x")
    write_image(tmp_path / "glob" / "x1.png")
    write_image(tmp_path / "glob" / "x2.png")
    (tmp_path / "empty").mkdir()
    args = [str(one), str(tmp_path / "dir"), str(tmp_path / "glob" / "x*.png"), str(one),
            str(tmp_path / "missing.png"), str(tmp_path / "nomatch*.png"), str(tmp_path / "empty")]
    images, problems = list_images(args)
    names = [p.relative_to(tmp_path).as_posix() for p in images]
    assert names == ["one.png", "dir/b.jpg", "dir/sub/a.png", "glob/x1.png", "glob/x2.png"]
    assert [arg for arg, _ in problems] == args[4:]
    assert "no such file" in problems[0][1]


def test_list_images_recursive_glob(tmp_path):
    write_image(tmp_path / "a" / "b" / "c.png")
    write_image(tmp_path / "a" / "d.png")
    images, problems = list_images([str(tmp_path / "**" / "*.png")])
    assert [p.name for p in images] == ["c.png", "d.png"] and problems == []  # sorted as paths


# --- load_image ------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.new("RGB", (20, 10), (0, 128, 0)).save(path, exif=exif.tobytes())
    image = load_image(path)
    assert image.size == (10, 20) and image.mode == "RGB"


@pytest.mark.parametrize(
    ("name", "mode", "color", "expected"),
    [
        ("gray.png", "L", 77, (77, 77, 77)),
        ("bw.png", "1", 1, (255, 255, 255)),
        ("cmyk.jpg", "CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("rgba.png", "RGBA", (0, 0, 255, 0), (255, 255, 255)),  # transparent -> white
        ("la.png", "LA", (0, 255), (0, 0, 0)),
        ("deep.png", "I;16", 40000, (156, 156, 156)),  # 40000 / 256
        ("int32.tif", "I", 1000, (255, 255, 255)),  # scaled by the max
    ],
)
def test_any_mode_loads_as_rgb(tmp_path, name, mode, color, expected):
    image = load_image(write_image(tmp_path / name, size=(4, 4), mode=mode, color=color))
    assert image.mode == "RGB" and image.size == (4, 4)
    assert all(abs(a - b) <= 3 for a, b in zip(image.getpixel((0, 0)), expected))  # JPEG rounding


def test_palette_with_transparency_composites_on_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    loaded = load_image(tmp_path / "p.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 0)) == (200, 0, 0)


@pytest.mark.parametrize("limit", [60, 40])  # 100 px: a warning (> limit) and an error (> 2x limit)
def test_decompression_bombs_are_refused(tmp_path, monkeypatch, limit):
    path = write_image(tmp_path / "big.png", size=(10, 10))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    filters_before = list(warnings.filters)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(path)
    assert warnings.filters == filters_before


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_corrupt_files_raise_image_load_error(tmp_path, content):
    good = write_image(tmp_path / "good.png", size=(64, 64))
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:60] if content == "truncated" else content)
    with pytest.raises(ImageLoadError) as info:
        load_image(bad)
    assert info.value.path == bad and info.value.reason


def test_missing_file_raises_image_load_error(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "gone.png")


# --- validation and loaders ------------------------------------------------------------------


def test_validate_samples_splits_good_from_bad(tmp_path):
    good = write_image(tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    ok, failed = validate_samples([Sample(good, 0), Sample(bad, 1)])
    assert ok == [Sample(good, 0)]
    assert [path for path, _ in failed] == [bad]


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_skips_images_that_fail_late(tmp_path, workers):
    samples = [Sample(write_image(tmp_path / f"{i}.png"), i % 2) for i in range(5)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    samples.insert(2, Sample(broken, 1))
    dataset = ImageDataset(samples, build_transform(DATA_CONFIG, train=False))
    loader = make_loader(dataset, batch_size=4, shuffle=False, workers=workers, seed=0)
    seen = [i for _, _, indices in (b for b in loader if b is not None) for i in indices.tolist()]
    assert seen == [0, 1, 3, 4, 5]
    assert [path for path, _ in dataset.failures] == [broken]
    assert "not a recognised image" in dataset.failures[0][1]


def test_item_is_tensor_label_index(tmp_path):
    transform = build_transform(DATA_CONFIG, train=False)
    dataset = ImageDataset([Sample(write_image(tmp_path / "a.png"), 3)], transform)
    image, label, index = dataset[0]
    assert image.shape == (3, 32, 32) and label == 3 and index == 0


def test_collate_drops_failed_items_and_empty_batches():
    item = (torch.zeros(3, 2, 2), 1, 7)
    images, labels, indices = collate_skip_bad([None, item, None])
    assert images.shape == (1, 3, 2, 2) and labels.tolist() == [1] and indices.tolist() == [7]
    assert collate_skip_bad([None, None]) is None


def test_make_loader_auto_workers_and_seeded_shuffle(tmp_path):
    dataset = list(range(20))
    loader = make_loader(dataset, batch_size=20, shuffle=True, workers=None, seed=3)
    assert loader.num_workers == 0  # tiny dataset: no worker processes

    def order(seed: int) -> list[int]:
        return list(make_loader(dataset, 20, True, 0, seed).batch_sampler)[0]

    assert order(3) == order(3) and order(3) != order(4)


# --- transforms ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "augment"), [(False, "flip"), (False, "crop"), (True, "none"), (True, "flip"), (True, "crop")]
)
def test_transforms_output_model_sized_tensors(train, augment):
    transform = build_transform(DATA_CONFIG, train=train, augment=augment)
    out = transform(Image.new("RGB", (50, 37), (1, 2, 3)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_flip_augment_is_eval_plus_a_flip_before_to_tensor():
    eval_steps = [type(t) for t in build_transform(DATA_CONFIG, train=False).transforms]
    flip_steps = [type(t) for t in build_transform(DATA_CONFIG, train=True, augment="flip").transforms]
    flip_at = flip_steps.index(transforms.RandomHorizontalFlip)
    assert flip_steps[:flip_at] + flip_steps[flip_at + 1 :] == eval_steps
    assert "ToTensor" in flip_steps[flip_at + 1].__name__


def test_unknown_augment_is_a_usage_error():
    with pytest.raises(UsageError):
        build_transform(DATA_CONFIG, train=True, augment="mixup")


# --- bundled sample_data ---------------------------------------------------------------------


def test_sample_data_has_4_classes_40_train_15_val_all_loadable():
    splits = discover_splits(SAMPLE_DATA)
    assert splits.source == "folders" and splits.skipped == []
    assert splits.classes == ["bag", "dress", "sneaker", "trouser"]
    assert set(labels_by_class(splits.train, splits.classes).values()) == {40}
    assert set(labels_by_class(splits.val, splits.classes).values()) == {15}
    good, bad = validate_samples(splits.train + splits.val)
    assert bad == []
    assert all(load_image(s.path).size == (28, 28) for s in good)
    assert sum(p.stat().st_size for p in SAMPLE_DATA.rglob("*.png")) < 500_000
    assert (SAMPLE_DATA / "LICENSE.md").is_file()


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_sample_data_script_reproduces_the_bundled_pixels(tmp_path):
    script = SAMPLE_DATA / "make_sample_data.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True)
    bundled = sorted(p.relative_to(SAMPLE_DATA) for p in SAMPLE_DATA.rglob("*.png"))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png")) == bundled
    for rel in bundled:
        assert Image.open(tmp_path / rel).tobytes() == Image.open(SAMPLE_DATA / rel).tobytes()


def test_a_symlink_back_to_the_data_root_is_not_a_class(tmp_path):
    for name in ("cat", "dog"):
        write_image(tmp_path / "data" / name / "1.png")
    (tmp_path / "data" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    (tmp_path / "data" / "cat" / "up").symlink_to(tmp_path, target_is_directory=True)
    splits = discover_splits(tmp_path / "data", val_split=0.0)
    assert splits.classes == ["cat", "dog"]
    assert sorted(s.path.name for s in splits.train) == ["1.png", "1.png"]
