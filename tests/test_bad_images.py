"""Every bad input a user can throw at a dataset: each case is found, named, and never silently dropped.

Bad files (truncated, empty, not images, unreadable, decompression bombs) fail the load with one
error listing all of them, or are skipped and recorded with ``skip_bad_images``. Unusual but valid
images (RGBA, LA, palette with transparency, CMYK, 16-bit, 1-bit, EXIF-rotated, huge) are converted
correctly. Structural problems (empty class folder, no classes, different class sets) always fail.
``transferlab check-data`` lists everything at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import png, write_folder
from transferlab.cli import main
from transferlab.config import DataConfig, ExperimentConfig, from_dict
from transferlab.data.batches import Preprocess, make_batches
from transferlab.data.check import check_config, check_path
from transferlab.data.images import ImageReadError, load_image, probe_image
from transferlab.data.prepare import prepare_splits
from transferlab.data.sources import DatasetError, load_dataset


def folder_cfg(root: Path, **kw: object) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), **kw)  # type: ignore[arg-type]


def good_tree(root: Path, per_class: int = 10) -> None:
    write_folder(root / "train", ["cat", "dog"], per_class)
    write_folder(root / "test", ["cat", "dog"], 2, seed=9)


def truncated_jpeg(path: Path) -> Path:
    arr = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)  # the fixtures' 12x10
    Image.fromarray(arr).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])  # the headers stay, the scan data is cut
    return path


def truncated_png(path: Path) -> Path:
    png(path, (12, 10))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 60])  # into the IDAT chunk
    return path


# --------------------------------------------------------------------------------------------
# single files


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (truncated_jpeg, "truncated or corrupt image data"),
        (truncated_png, "truncated or corrupt image data"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty file (0 bytes)"),
        (lambda p: (p.write_text("name,label\nnot an image\n"), p)[1], "not an image file that PIL can read (starts with b'name,label\\nn'"),
    ],
    ids=["truncated_jpeg", "truncated_png", "zero_bytes", "text_with_jpg_extension"],
)
def test_bad_file_reason(tmp_path: Path, make, expected: str) -> None:
    path = make(tmp_path / "x.jpg")
    with pytest.raises(ImageReadError) as info:
        load_image(path, 3, 16)
    assert expected in str(info.value)


def test_unreadable_file_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = png(tmp_path / "secret.png")
    real_open = Image.open

    def denied(fp, *args, **kwargs):  # noqa: ANN001, ANN202 - what open() raises without read permission
        if Path(fp) == path:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", denied)
    for fn in (lambda: probe_image(path), lambda: load_image(path, 3)):
        with pytest.raises(ImageReadError, match="cannot read the file: permission denied"):
            fn()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_real_chmod(tmp_path: Path) -> None:
    good_tree(tmp_path)
    secret = tmp_path / "train" / "cat" / "0.png"
    secret.chmod(0)
    try:
        with pytest.raises(DatasetError, match=f"{secret}: cannot read the file: permission denied"):
            load_dataset(folder_cfg(tmp_path))
    finally:
        secret.chmod(0o644)


def test_rgba_composited_on_white_not_black(tmp_path: Path) -> None:
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent, stored black
    arr[0, 1] = (255, 0, 0, 255)  # opaque red
    arr[1, 0] = (255, 0, 0, 128)  # half-transparent red
    arr[1, 1] = (0, 0, 255, 255)
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 3)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0] and out[1, 1].tolist() == [0, 0, 255]
    assert out[1, 0, 0] == 255 and abs(int(out[1, 0, 1]) - 127) <= 1 and abs(int(out[1, 0, 2]) - 127) <= 1
    assert load_image(tmp_path / "a.png", 1)[0, 0, 0] == 255  # also in a grayscale dataset


def test_la_and_palette_transparency(tmp_path: Path) -> None:
    la = np.array([[[0, 0], [0, 255]], [[200, 255], [100, 0]]], np.uint8)  # (gray, alpha)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png", 1)
    assert out[:, :, 0].tolist() == [[255, 0], [200, 255]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.putdata([0, 1])
    pal.save(tmp_path / "p.png", transparency=0)  # palette index 0 is transparent
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = load_image(tmp_path / "p.png", 3)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 200, 0]
    pal.save(tmp_path / "p_opaque.png")  # without transparency, index 0 stays black
    assert load_image(tmp_path / "p_opaque.png", 3)[0, 0].tolist() == [0, 0, 0]


def test_cmyk_16bit_1bit_and_float(tmp_path: Path) -> None:
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    red = load_image(tmp_path / "cmyk.jpg", 3)[0, 0]
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    values = np.array([[0, 257 * 100], [65535, 30000]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    assert load_image(tmp_path / "deep.png", 1)[:, :, 0].tolist() == [[0, 100], [255, 117]]  # not clipped to 255
    assert load_image(tmp_path / "deep.png", 3)[0, 1].tolist() == [100, 100, 100]
    bits = Image.new("1", (2, 1))
    bits.putdata([0, 1])
    bits.save(tmp_path / "bits.png")
    assert load_image(tmp_path / "bits.png", 1)[0, :, 0].tolist() == [0, 255]
    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ImageReadError, match=r"32-bit float image \(mode F\)"):
        probe_image(tmp_path / "float.tif")


def test_exif_orientation_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white, landscape
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg", 3)
    assert out.shape == (40, 20, 3)  # portrait as displayed
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def test_huge_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = _bomb_png(tmp_path / "bomb.png", 30000, 30000)  # 900 Mpx claimed in 100 bytes
    with pytest.raises(ImageReadError, match="image too large to decode safely"):
        probe_image(bomb)
    with pytest.raises(ImageReadError, match="image too large to decode safely"):
        load_image(bomb, 3, 32)
    big = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (10, 120, 240)).save(big, quality=90)  # 12 Mpx photo: fine, decoded small
    out = load_image(big, 3, 32)
    assert out.shape == (32, 32, 3) and np.abs(out.astype(int) - [10, 120, 240]).max() <= 3
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8_000_000)  # now 12 Mpx is "huge" (a warning, still usable)
    info = probe_image(big)
    assert info.huge and (info.width, info.height) == (4000, 3000)
    good_tree(tmp_path / "ds")
    shutil.copy(big, tmp_path / "ds" / "train" / "cat" / "big.jpg")
    report = check_config(folder_cfg(tmp_path / "ds", image_size=16))
    assert report.ok and any(p.kind == "huge_image" and p.path.endswith("big.jpg") for p in report.warnings)


# --------------------------------------------------------------------------------------------
# folders


def test_all_bad_files_listed_at_once(tmp_path: Path) -> None:
    good_tree(tmp_path)
    bad = [
        truncated_jpeg(tmp_path / "train" / "cat" / "trunc.jpg"),
        truncated_png(tmp_path / "train" / "dog" / "trunc.png"),
        tmp_path / "train" / "dog" / "empty.png",
        tmp_path / "test" / "cat" / "notes.jpeg",
    ]
    bad[2].write_bytes(b"")
    bad[3].write_text("hello")
    with pytest.raises(DatasetError) as info:  # header problems: found while loading
        prepare_splits(folder_cfg(tmp_path, val_count=2), 0)
    message = str(info.value)
    assert f"{bad[2]}: empty file (0 bytes)" in message and f"{bad[3]}: not an image file" in message
    assert "set data.skip_bad_images: true" in message
    bad[2].unlink()
    bad[3].unlink()
    with pytest.raises(DatasetError) as info:  # truncated data: found when decoding, both at once
        prepare_splits(folder_cfg(tmp_path, val_count=2), 0)
    message = str(info.value)
    assert "2 bad image(s)" in message
    assert f"{bad[0]}: truncated or corrupt image data" in message and f"{bad[1]}: truncated or corrupt image data" in message


def test_skip_bad_images_records_list_and_count(tmp_path: Path) -> None:
    from transferlab.kinds import run_experiment

    good_tree(tmp_path / "ds")
    t1 = truncated_jpeg(tmp_path / "ds" / "train" / "cat" / "t.jpg")
    t2 = tmp_path / "ds" / "train" / "dog" / "zero.png"
    t2.write_bytes(b"")
    cfg = from_dict(
        ExperimentConfig,
        {
            "name": "skip",
            "data": {"dataset": "folder", "root": str(tmp_path / "ds"), "val_count": 2, "skip_bad_images": True},
            "model": {"backbone": "transferlab_cnn"},
            "train": {"epochs": 1, "batch_size": 4, "progress": False, "accelerator": "cpu"},
        },
    )
    metrics = run_experiment(cfg, tmp_path / "run")
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    skipped = {s["path"]: s["reason"] for s in selection["skipped_bad_images"]}
    assert set(skipped) == {str(t1), str(t2)} and selection["skipped_bad_images_count"] == 2
    assert skipped[str(t2)] == "empty file (0 bytes)" and "truncated" in skipped[str(t1)]
    assert metrics["skipped_bad_images"] == 2
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_bad_images"] == 2
    assert metrics["n_train"] + metrics["n_val"] == 20  # every good image kept, the 2 bad ones out


def test_pil_path_bad_images(tmp_path: Path) -> None:
    good_tree(tmp_path)
    bad = truncated_jpeg(tmp_path / "train" / "cat" / "t.jpg")
    cfg = folder_cfg(tmp_path, val_count=2, image_size=16, in_memory=False)
    s = prepare_splits(cfg, 0)  # header is fine: found while iterating, with the file's name
    assert not s.in_memory
    batches = make_batches(s, "train", 64, Preprocess((0.5,) * 3, (0.5,) * 3), num_workers=0)
    if str(bad) in s.train_x.paths:
        with pytest.raises(DatasetError, match=f"{bad}: truncated or corrupt image data.*check-data"):
            list(batches)
    skipping = prepare_splits(folder_cfg(tmp_path, val_count=2, image_size=16, in_memory=False, skip_bad_images=True), 0)
    assert [p.path for p in skipping.skipped] == [str(bad)]  # checked up front on the PIL path too
    assert str(bad) not in skipping.train_x.paths + skipping.val_x.paths
    assert sum(len(y) for _, y in make_batches(skipping, "train", 64, Preprocess((0.5,) * 3, (0.5,) * 3), num_workers=0)) == len(skipping.train_y)


def test_empty_class_folder_and_loose_files(tmp_path: Path) -> None:
    good_tree(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "README.md").write_text("todo")
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(DatasetError) as info:
        load_dataset(folder_cfg(tmp_path))
    message = str(info.value)
    assert f"{tmp_path / 'train' / 'bird'}: class folder 'bird' has no images" in message
    assert f"{tmp_path / 'test' / 'bird'}: class folder 'bird' has no images" in message
    report = check_path(tmp_path)[0]
    assert any(p.kind == "ignored_file" and p.path.endswith("README.md") for p in report.warnings)


def test_root_without_classes(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no class folders \(expected .*/empty/<class>/<image>\)"):
        load_dataset(folder_cfg(tmp_path / "empty"))
    png(tmp_path / "flat" / "a.png")
    png(tmp_path / "flat" / "b.png")
    with pytest.raises(DatasetError, match="it has 2 images directly in it: put them into .*/flat/<class>/"):
        load_dataset(folder_cfg(tmp_path / "flat"))


def test_train_and_val_with_different_classes(tmp_path: Path) -> None:
    write_folder(tmp_path / "train", ["cat", "dog", "fox"], 3)
    write_folder(tmp_path / "val", ["cat", "dog", "owl"], 2)
    write_folder(tmp_path / "test", ["cat", "dog", "fox"], 2)
    with pytest.raises(DatasetError) as info:
        load_dataset(folder_cfg(tmp_path))
    message = str(info.value)
    assert f"{tmp_path / 'val'}: val split lacks class(es) ['fox'] that train has" in message
    assert f"{tmp_path / 'val'}: val split has class(es) ['owl'] that train has not" in message
    assert f"{tmp_path / 'test'}:" not in message  # test/ matches train/


def test_class_names_with_spaces_and_non_ascii_are_fine(tmp_path: Path) -> None:
    write_folder(tmp_path / "train", ["sea lion", "ñandú", "жук"], 10)
    write_folder(tmp_path / "test", ["sea lion", "ñandú", "жук"], 2, seed=3)
    report = check_path(tmp_path)[0]
    assert report.ok and not report.problems and report.n_classes == 3
    s = prepare_splits(folder_cfg(tmp_path, val_count=3), 0)
    assert s.class_names == ["sea lion", "ñandú", "жук"] and len(s.train_y) == 27


def test_duplicates_reported_not_dropped(tmp_path: Path) -> None:
    good_tree(tmp_path)
    shutil.copy(tmp_path / "train" / "cat" / "0.png", tmp_path / "train" / "cat" / "copy.png")  # same class
    shutil.copy(tmp_path / "train" / "cat" / "1.png", tmp_path / "train" / "dog" / "cat1.png")  # another class!
    shutil.copy(tmp_path / "train" / "dog" / "2.png", tmp_path / "test" / "dog" / "leak.png")  # train/test leakage
    report = check_path(tmp_path)[0]
    by_kind = [(p.severity, p.message) for p in report.problems if p.kind == "duplicate"]
    assert len(by_kind) == 3
    errors = [m for s, m in by_kind if s == "error"]
    assert len(errors) == 1 and "identical images under different classes ['cat', 'dog']" in errors[0] and "cat1.png" in errors[0]
    assert any("test leakage" in m and "leak.png" in m for s, m in by_kind if s == "warning")
    assert any("2 identical images" in m and "copy.png" in m for s, m in by_kind if s == "warning")
    with pytest.raises(DatasetError, match=re.escape(errors[0])):  # a run refuses what check-data rejects, with its message
        load_dataset(folder_cfg(tmp_path))
    (tmp_path / "train" / "dog" / "cat1.png").unlink()
    raw = load_dataset(folder_cfg(tmp_path))  # the warnings load: every file kept, nothing silently dropped
    assert len(raw.train_y) + len(raw.test_y) == 20 + 4 + 2
    assert sum(p.kind == "duplicate" for p in raw.warnings) == 2


def test_check_data_cli_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good_tree(tmp_path / "ds")
    t = truncated_png(tmp_path / "ds" / "train" / "cat" / "t.png")
    z = tmp_path / "ds" / "train" / "dog" / "z.jpg"
    z.write_bytes(b"")
    (tmp_path / "ds" / "test" / "owl").mkdir()
    assert main(["check-data", str(tmp_path / "ds")]) == 1
    out = capsys.readouterr().out
    assert "4 error(s)" in out
    expected_problems = (
        f"{t}: truncated or corrupt image data", f"{z}: empty file (0 bytes)", "class folder 'owl' has no images", "test split has class(es) ['owl']",
    )
    for expected in expected_problems:
        assert expected in out, expected
    shutil.rmtree(tmp_path / "ds" / "test" / "owl")
    t.unlink()
    z.unlink()
    assert main(["check-data", str(tmp_path / "ds")]) == 0
    assert "ok: no problems found" in capsys.readouterr().out


def test_check_data_on_a_study_checks_selections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    good_tree(tmp_path / "ds")
    study = {
        "study": "s",
        "defaults": {"data": {"dataset": "folder", "root": str(tmp_path / "ds"), "val_count": 2}},
        "experiments": [
            {"name": "ok"},
            {"name": "too_many", "data": {"k_per_class": 50}},
            {"name": "digits", "data": {"dataset": "digits", "root": None, "classes": [0, 1]}},
        ],
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    reports = check_path(tmp_path / "s.yaml")
    assert [r.ok for r in reports] == [True, False, True]
    assert "data.k_per_class=50 but class 'cat' has only 10 training images" in reports[1].errors[0].message
    assert main(["check-data", str(tmp_path / "s.yaml")]) == 1
    out = capsys.readouterr().out
    assert "folder [too_many]" in out and "digits [digits]" in out


def test_grayscale_folder_is_one_channel(tmp_path: Path) -> None:
    for k, c in enumerate(("a", "b")):  # distinct images: identical ones under two classes are refused
        for i in range(4):
            png(tmp_path / "train" / c / f"{i}.png", mode="L", seed=100 * k + i)
            png(tmp_path / "test" / c / f"{i}.png", mode="L", seed=100 * k + 10 + i)
    s = prepare_splits(folder_cfg(tmp_path, val_count=2), 0)
    assert s.train_x.shape[1] == 1
    png(tmp_path / "train" / "a" / "colour.png", seed=5)  # one RGB image: the dataset becomes RGB
    s = prepare_splits(folder_cfg(tmp_path, val_count=2), 0)
    assert s.train_x.shape[1] == 3
    gray = torch.cat([s.train_x, s.val_x])
    assert sum(bool(torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])) for img in gray) == len(gray) - 1
