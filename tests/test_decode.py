"""Photos decoded once: JPEG draft decoding, the size cap on what is decoded, and the per-run cache."""
from __future__ import annotations

import os

import pytest
from PIL import Image

from vpt_cli.data import DecodeCache, ImageLoadError, Sample, decode_size, load_image, validate_samples
from vpt_cli.data import cache as cache_module


def write_jpeg(path, size=(640, 480)):
    Image.radial_gradient("L").resize(size).convert("RGB").save(path, quality=90)
    return path


def test_draft_decodes_large_jpegs_at_a_reduced_scale_that_still_covers_the_target(tmp_path):
    photo = write_jpeg(tmp_path / "photo.jpg")
    assert load_image(photo).size == (640, 480)
    drafted = load_image(photo, target=100)
    assert drafted.size == (160, 120) and drafted.mode == "RGB"  # 1/4 scale: the short side stays >= 100
    assert load_image(photo, target=500).size == (640, 480)  # no scale keeps 500: decoded whole


def test_the_pixel_cap_applies_to_what_is_decoded(tmp_path, monkeypatch):
    photo = write_jpeg(tmp_path / "photo.jpg")
    png = tmp_path / "photo.png"
    Image.open(photo).save(png)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # 640 x 480 = 307,200: over it, under twice it
    assert load_image(photo, target=100).size == (160, 120)  # drafted: 19,200 decoded
    for path, target in ((photo, None), (png, 100)):  # decoded whole: refused, and validation agrees
        with pytest.raises(ImageLoadError, match="too large"):
            load_image(path, target=target)
    good, bad = validate_samples([Sample(photo, 0), Sample(png, 0)], target=100)
    assert [s.path for s in good] == [photo] and "too large" in bad[0][1]


def test_the_aspect_cap_still_applies_with_draft(tmp_path):
    strip = write_jpeg(tmp_path / "strip.jpg", size=(4100, 100))
    with pytest.raises(ImageLoadError, match="too thin"):
        load_image(strip, target=8)


def test_each_photo_is_decoded_once_and_shrunk_to_the_needed_size(tmp_path, monkeypatch):
    photo = write_jpeg(tmp_path / "photo.jpg")
    calls = []
    real = cache_module.load_image
    monkeypatch.setattr(cache_module, "load_image", lambda path, target=None: calls.append(path) or real(path, target))
    cache = DecodeCache(tmp_path / "cache", 64)
    (tmp_path / "cache").mkdir()
    first = cache.load(photo)
    assert first.size == (85, 64) and calls == [photo]
    again = DecodeCache(tmp_path / "cache", 64).load(photo)  # another process: same folder, same entry
    assert calls == [photo] and again.tobytes() == first.tobytes()
    os.utime(photo, ns=(1, 1))  # a changed file is decoded again
    cache.load(photo)
    assert len(calls) == 2
    assert DecodeCache(tmp_path / "gone", 64).load(photo).size == (85, 64)  # no folder: still loads


def test_decode_size_covers_the_eval_resize_and_crops():
    config = {"input_size": (3, 224, 224), "crop_pct": 0.875}
    assert decode_size(config) == 256 and decode_size(config, train=True, augment="flip") == 256
    assert decode_size(config, train=True, augment="crop") == 317  # half-area crops still cover 224
