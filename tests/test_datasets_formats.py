"""Datasets in their exact on-disk formats, selections, augmentations on both data paths, the CLI.

Fixtures are written by ``data_fixtures`` in the real formats (Python-2 CIFAR pickles, IDX files, a
tiny-imagenet-200 tree, image folders, CSV files), so the real loading code runs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data_fixtures import (
    CIFAR10_NAMES,
    py2_pickle,
    write_cifar10,
    write_cifar100,
    write_folder,
    write_mnist,
    write_tiny_imagenet,
)
from transferlab.config import ConfigError, DataConfig, ExperimentConfig, from_dict, parse_study
from transferlab.data import cifar
from transferlab.data import resize as prepare
from transferlab.data.archives import download_archive, safe_extract
from transferlab.data.augment import AUGMENTATIONS, inverse_affine_matrices, parse_augmentation, warp_batch
from transferlab.data.batches import ImageDataset, LoaderBatches, Preprocess, TensorBatches, make_batches
from transferlab.data.images import FileImages
from transferlab.data.prepare import prepare_splits
from transferlab.data.sources import DatasetError, RawDataset, load_dataset

IDENTITY = Preprocess(mean=(0.0,), std=(1.0 / 255,), in_chans=1)
REAL_DATA = os.environ.get("TRANSFERLAB_DATA")  # read before the fixture below empties it


@pytest.fixture(autouse=True)
def _no_default_data(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default lookup folders are empty: only data.root is found; downloads are faked per test."""
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path_factory.mktemp("default_data")))


def _offline(*args: object, **kwargs: object) -> None:
    raise OSError("network is unreachable")


# --------------------------------------------------------------------------------------------
# CIFAR


def cifar_pixels(rows: np.ndarray) -> np.ndarray:
    """The CIFAR row layout: 1024 red, 1024 green, 1024 blue, each 32 rows of 32."""
    return rows.reshape(-1, 3, 32, 32)


@pytest.mark.parametrize("style", ["py2", "p4"])
@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_from_root(tmp_path: Path, style: str, nested: bool) -> None:
    batch_dir = tmp_path / "c" / "cifar-10-batches-py" if nested else tmp_path / "c"
    written = write_cifar10(batch_dir, style=style)
    if style == "py2":  # the official files' exact opcodes: byte-string keys, numpy.core global
        head = (batch_dir / "data_batch_1").read_bytes()
        assert head.startswith(b"\x80\x02}q\x00(U\x0bbatch_label") and b"cnumpy.core.multiarray\n_reconstruct\n" in head
    raw = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "c")))
    assert raw.source == str(batch_dir)
    assert raw.train_x.shape == (30, 3, 32, 32) and raw.train_x.dtype == torch.uint8
    assert raw.test_x.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(raw.train_x.numpy(), cifar_pixels(written["train_x"]))
    np.testing.assert_array_equal(raw.test_x.numpy(), cifar_pixels(written["test_x"]))
    row = written["train_x"][4]  # pixel (r=5, c=7) of image 4: red, green, blue planes
    assert raw.train_x[4, :, 5, 7].tolist() == [row[5 * 32 + 7], row[1024 + 5 * 32 + 7], row[2048 + 5 * 32 + 7]]
    assert raw.train_y.tolist() == written["train_y"].tolist() and raw.train_y.dtype == torch.int64
    assert raw.test_y.tolist() == written["test_y"].tolist()
    assert raw.class_names == CIFAR10_NAMES


@pytest.mark.parametrize(("name", "n_classes", "key"), [("cifar100", 100, "fine"), ("cifar100_coarse", 20, "coarse")])
def test_cifar100_fine_and_coarse(tmp_path: Path, name: str, n_classes: int, key: str) -> None:
    written = write_cifar100(tmp_path / "cifar-100-python")
    raw = load_dataset(DataConfig(dataset=name, root=str(tmp_path)))
    assert len(raw.class_names) == n_classes and raw.class_names[3] == f"{key}3"
    assert raw.train_y.tolist() == written[f"train_{key}"].tolist()
    assert raw.test_y.tolist() == written[f"test_{key}"].tolist()
    np.testing.assert_array_equal(raw.test_x.numpy(), cifar_pixels(written["test_x"]))


class _Evil:
    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):  # noqa: ANN204 - what an attacker's pickle does on load
        if self.how == "os.system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "eval":
            return (eval, (f"open({str(self.marker)!r}, 'w').write('x')",))
        return (Path.write_text, (self.marker, "x"))


@pytest.mark.parametrize("how", ["os.system", "eval", "method"])
@pytest.mark.parametrize("victim", ["data_batch_3", "batches.meta"])
def test_cifar_malicious_pickle_runs_nothing(tmp_path: Path, how: str, victim: str) -> None:
    d = tmp_path / "cifar-10-batches-py"
    write_cifar10(d)
    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"labels": [0], "data": _Evil(marker, how)}, protocol=2)
    (d / victim).write_bytes(payload)
    with pytest.raises(DatasetError) as info:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert not marker.exists()
    message = str(info.value)
    assert str(d / victim) in message and "refusing to load global" in message


def test_cifar_corrupt_and_wrong_content(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    write_cifar10(d)
    good = (d / "data_batch_2").read_bytes()
    (d / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="not a valid CIFAR pickle") as info:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert str(d / "data_batch_2") in str(info.value)
    (d / "data_batch_2").write_bytes(py2_pickle({b"labels": [1, 2], b"data": np.zeros((2, 100), np.uint8)}))
    with pytest.raises(DatasetError, match=r"'data' must be a uint8 array of shape \(N, 3072\), found uint8 array \(2, 100\)"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    (d / "data_batch_2").write_bytes(py2_pickle({b"labels": [1, 12], b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DatasetError, match="values outside 0..9"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_cifar_missing_offline_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(tvu, "download_url", _offline)
    with pytest.raises(DatasetError) as info:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "nothing")))
    message = str(info.value)
    assert "cifar-10-batches-py" in message and "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "network is unreachable" in message and "data.root" in message and str(tmp_path / "nothing") in message


def test_cifar_download_checks_md5_and_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    import torchvision.datasets.utils as tvu

    src = tmp_path / "src"
    written = write_cifar10(src / "cifar-10-batches-py")
    archive = tmp_path / "official.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    urls = []

    def fake_download(url: str, root: str, filename: str, md5: str) -> None:
        urls.append(url)
        Path(root, filename).write_bytes(archive.read_bytes())

    monkeypatch.setattr(tvu, "download_url", fake_download)
    monkeypatch.setitem(cifar.CIFAR["cifar10"], "md5", md5)
    root = tmp_path / "dl"
    raw = load_dataset(DataConfig(dataset="cifar10", root=str(root)))
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert raw.source == str(root / "cifar-10-batches-py")
    np.testing.assert_array_equal(raw.train_x.numpy(), cifar_pixels(written["train_x"]))
    # a download whose checksum differs is refused
    monkeypatch.setitem(cifar.CIFAR["cifar10"], "md5", "0" * 32)
    with pytest.raises(DatasetError, match="MD5 checksum does not match"):
        download_archive("https://example.invalid/x.tar.gz", "0" * 32, tmp_path / "dl2", "x.tar.gz")


# --------------------------------------------------------------------------------------------
# safe extraction


def test_safe_extract_refuses_zip_slip(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n0\n")
        zf.writestr("../evil", "pwned")
    target = tmp_path / "out"
    with pytest.raises(DatasetError) as info:
        safe_extract(archive, target)
    assert "refusing to extract member '../evil'" in str(info.value) and str(archive) in str(info.value)
    assert not (tmp_path / "evil").exists()
    assert not (target / "tiny-imagenet-200" / "wnids.txt").exists()  # checked before anything is written


@pytest.mark.parametrize("member", ["../evil", "/tmp/transferlab_abs_evil", "a/../../evil"])
def test_safe_extract_refuses_tar_escapes(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 5
        tar.addfile(info, io.BytesIO(b"pwned"))
    with pytest.raises(DatasetError, match="refusing to extract member"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not Path("/tmp/transferlab_abs_evil").exists()


def test_safe_extract_refuses_links_and_extracts_good_archives(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("data/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DatasetError, match="links and special files are not allowed"):
        safe_extract(archive, tmp_path / "out")
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("a/b/c.txt", "hello")
    out = safe_extract(good, tmp_path / "out2")
    assert (out / "a" / "b" / "c.txt").read_text() == "hello"


# --------------------------------------------------------------------------------------------
# MNIST


def test_mnist_torchvision_layout(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path / "MNIST" / "raw")
    raw = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))
    assert raw.source == str(tmp_path / "MNIST" / "raw")
    assert raw.train_x.shape == (40, 1, 28, 28) and raw.class_names == [str(i) for i in range(10)]
    np.testing.assert_array_equal(raw.test_x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])


def test_mnist_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", _offline)
    with pytest.raises(DatasetError, match=r"MNIST not found \(looked in: .*\) and download failed \(OSError: network is unreachable\)"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path / "none")))


# --------------------------------------------------------------------------------------------
# Tiny ImageNet


def test_tiny_imagenet_layout(tmp_path: Path) -> None:
    d = write_tiny_imagenet(tmp_path)
    for root in (tmp_path, d):  # the parent or the tiny-imagenet-200 folder itself
        raw = load_dataset(DataConfig(dataset="tiny_imagenet", root=str(root)))
        assert raw.source == str(d)
    assert raw.class_names == ["goldfish", "European fire salamander", "tabby"]
    assert isinstance(raw.train_x, FileImages) and raw.train_x.channels == 3 and raw.train_x.size == (64, 64)
    assert len(raw.train_y) == 18 and torch.bincount(raw.train_y).tolist() == [6, 6, 6]
    # the official val split (labels from val_annotations.txt) is the test split; test/ is unlabelled
    assert raw.test_y.tolist() == [0, 2, 1, 0, 2, 1, 0, 2, 1]  # val_0, val_1, ... sorted by file name
    assert all("/val/images/val_" in p for p in raw.test_x.paths)
    s = prepare_splits(DataConfig(dataset="tiny_imagenet", root=str(tmp_path), val_fraction=1 / 6), 0)
    assert s.in_memory and s.train_x.shape == (15, 3, 64, 64) and s.test_x.shape == (9, 3, 64, 64)
    # pixels: class colours survive JPEG; the grayscale JPEG of class 2 became 3 equal channels
    mean = s.test_x.float().mean((2, 3))
    for img_mean, label in zip(mean, s.test_y, strict=True):
        c = int(label)
        assert abs(img_mean[0] - (40 + 80 * c)) < 4 and abs(img_mean[1] - (200 - 60 * c)) < 4
    gray = [i for i, p in enumerate(raw.train_x.paths) if p.endswith("n02123045_0.JPEG")]
    full = prepare_splits(DataConfig(dataset="tiny_imagenet", root=str(tmp_path), val_count=3), 0)
    pos = full.indices["train"].index(gray[0]) if gray[0] in full.indices["train"] else None
    if pos is not None:
        img = full.train_x[pos]
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_tiny_imagenet_annotation_problems(tmp_path: Path) -> None:
    d = write_tiny_imagenet(tmp_path)
    ann = d / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_99.JPEG\tn01443537\t0\t0\t1\t1\nval_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    (d / "train" / "n01629819" / "images" / "n01629819_0.JPEG").unlink()
    for p in (d / "train" / "n01629819" / "images").iterdir():
        p.unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset(DataConfig(dataset="tiny_imagenet", root=str(tmp_path)))
    message = str(info.value)
    assert "class n01629819 (European fire salamander) has no training images" in message
    assert f"{ann}:11: wnid 'n00000000' is not in wnids.txt" in message
    assert f"{d / 'val' / 'images' / 'val_99.JPEG'}: file not found (listed in {ann} line 10)" in message


def test_tiny_imagenet_download_and_unzip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transferlab.data import tiny_imagenet

    src = write_tiny_imagenet(tmp_path / "src")
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src.parent).as_posix())
    calls = []

    def fake_download(url: str, md5: str, directory: Path, filename: str) -> Path:
        calls.append((url, md5))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / filename).write_bytes(archive.read_bytes())
        return directory / filename

    monkeypatch.setattr(tiny_imagenet, "download_archive", fake_download)
    raw = load_dataset(DataConfig(dataset="tiny_imagenet", root=str(tmp_path / "dl")))
    assert calls == [("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de")]
    assert raw.source == str(tmp_path / "dl" / "tiny-imagenet-200") and len(raw.train_y) == 18


# --------------------------------------------------------------------------------------------
# folder and CSV


def test_folder_single_pool_holds_out_fixed_test(tmp_path: Path) -> None:
    write_folder(tmp_path / "pets", ["cat", "dog", "bird"], 10)
    raw = load_dataset(DataConfig(dataset="folder", root=str(tmp_path / "pets"), test_fraction=0.2))
    assert raw.class_names == ["bird", "cat", "dog"]
    assert len(raw.train_y) == 24 and len(raw.test_y) == 6 and torch.bincount(raw.test_y).tolist() == [2, 2, 2]
    again = load_dataset(DataConfig(dataset="folder", root=str(tmp_path / "pets"), test_fraction=0.2))
    assert again.test_x.paths == raw.test_x.paths  # fixed: the test split never depends on the experiment seed
    assert not set(raw.train_x.paths) & set(raw.test_x.paths)
    s = prepare_splits(DataConfig(dataset="folder", root=str(tmp_path / "pets"), val_count=6), 3)
    assert s.in_memory and s.train_x.shape == (18, 3, 10, 12) and s.val_x.shape == (6, 3, 10, 12)
    # decoded pixels are the files' pixels, in CHW order, with the right label
    path = raw.train_x.paths[s.indices["train"][0]]
    expected = np.asarray(Image.open(path)).transpose(2, 0, 1)
    np.testing.assert_array_equal(s.train_x[0].numpy(), expected)
    assert raw.class_names[int(s.train_y[0])] == Path(path).parent.name


def test_folder_train_val_test_and_train_val(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        write_folder(root / split, ["a", "b"], n, seed=len(split))
    raw = load_dataset(DataConfig(dataset="folder", root=str(root)))
    assert (len(raw.train_y), len(raw.val_y), len(raw.test_y)) == (12, 4, 6)
    s = prepare_splits(DataConfig(dataset="folder", root=str(root)), 0)
    assert s.val_from == "dataset" and len(s.train_y) == 12 and len(s.val_y) == 4 and len(s.test_y) == 6
    assert s.selection_record()["val_from"] == "dataset"
    # train/ + val/ without test/: val/ is the test split, validation is carved from train/
    import shutil

    shutil.rmtree(root / "test")
    raw = load_dataset(DataConfig(dataset="folder", root=str(root)))
    assert raw.val_x is None and len(raw.test_y) == 4 and all("/val/" in p for p in raw.test_x.paths)


def test_folder_class_names_with_spaces_and_unicode(tmp_path: Path) -> None:
    import unicodedata

    names = ["big dog", "café", "猫", unicodedata.normalize("NFD", "über")]
    write_folder(tmp_path / "train", names, 4)
    write_folder(tmp_path / "test", [unicodedata.normalize("NFC", n) for n in names], 2)
    raw = load_dataset(DataConfig(dataset="folder", root=str(tmp_path)))
    assert raw.class_names == sorted(unicodedata.normalize("NFC", n) for n in names)
    assert "über" in raw.class_names  # NFD folder name on train, NFC on test: the same class
    assert len(raw.test_y) == 8 and sorted(torch.bincount(raw.test_y).tolist()) == [2, 2, 2, 2]


@pytest.mark.parametrize("with_split", [True, False])
def test_csv_variant(tmp_path: Path, with_split: bool) -> None:
    files = write_folder(tmp_path / "imgs", ["x", "y"], 6)
    lines = ["path,label" + (",split" if with_split else "")]
    for i, f in enumerate(files):
        label = "10" if f.parent.name == "x" else "9"  # numeric labels sort numerically: 9 before 10
        split = (",test" if i % 3 == 0 else ",train") if with_split else ""
        lines.append(f"{f.relative_to(tmp_path).as_posix()},{label}{split}")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    raw = load_dataset(DataConfig(dataset="folder", root=str(csv_path)))
    assert raw.class_names == ["9", "10"]
    assert len(raw.train_y) + len(raw.test_y) == 12
    if with_split:
        assert len(raw.test_y) == 4 and all(files.index(Path(p)) % 3 == 0 for p in raw.test_x.paths)
    for p, y in zip(raw.train_x.paths, raw.train_y.tolist(), strict=True):
        assert (Path(p).parent.name == "x") == (raw.class_names[y] == "10")


def test_csv_problems_listed_together(tmp_path: Path) -> None:
    files = write_folder(tmp_path / "imgs", ["x", "y"], 3)
    rel = [f.relative_to(tmp_path).as_posix() for f in files]
    (tmp_path / "l.csv").write_text(
        f"path,label,split\n{rel[0]},x,train\n{rel[1]},x,train\nimgs/missing.png,x,train\n"
        f"{rel[3]},y,train\n{rel[4]},y,holdout\n{rel[0]},y,train\n{rel[5]},y\n"
    )
    with pytest.raises(DatasetError) as info:
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path / "l.csv")))
    message = str(info.value)
    assert f"{tmp_path / 'imgs' / 'missing.png'}: file not found (listed in {tmp_path / 'l.csv'} line 4)" in message
    assert f"{tmp_path / 'l.csv'}:6: unknown split 'holdout'" in message
    assert f"{tmp_path / 'l.csv'}:7: " in message and "is listed again (first on line 2) with another label" in message
    assert f"{tmp_path / 'l.csv'}:8: expected 3 columns, found 2" in message
    (tmp_path / "bad.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DatasetError, match="first line must be a header with columns 'path' and 'label'"):
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path / "bad.csv")))


def test_folder_needs_root_and_existing_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset 'folder' needs data.root"):
        load_dataset(DataConfig(dataset="folder"))
    with pytest.raises(DatasetError, match=f"data.root {tmp_path / 'nope'} is not a folder or a .csv file"):
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path / "nope")))


def test_large_folder_goes_to_pil_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path / "ds", ["a", "b"], 8, size=(20, 20))
    cfg = DataConfig(dataset="folder", root=str(tmp_path / "ds"), image_size=16, val_fraction=0.25)
    assert prepare_splits(cfg, 0).in_memory
    monkeypatch.setattr(prepare, "IN_MEMORY_MAX_BYTES", 1000)  # 16 images x 3 x 16 x 16 > 1000 bytes
    s = prepare_splits(cfg, 0)
    assert not s.in_memory and isinstance(s.train_x, FileImages) and s.train_x.shape == (10, 3, 16, 16)
    assert s.image_size == 16
    batches = make_batches(s, "train", 4, Preprocess((0.5,) * 3, (0.5,) * 3), num_workers=0)
    assert isinstance(batches, LoaderBatches) and len(batches) == 3
    got = [(x.shape, y.tolist()) for x, y in batches]
    assert [g[0] for g in got] == [(4, 3, 16, 16), (4, 3, 16, 16), (2, 3, 16, 16)]
    assert sorted(y for g in got for y in g[1]) == sorted(s.train_y.tolist())
    forced = prepare_splits(DataConfig(**{**cfg.__dict__, "in_memory": True}), 0)
    assert forced.in_memory and isinstance(forced.train_x, torch.Tensor)


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    write_folder(tmp_path / "ds" / "train", ["a", "b"], 4, size=(12, 10))
    write_folder(tmp_path / "ds" / "test", ["a", "b"], 2, size=(30, 20))
    with pytest.raises(DatasetError, match=r"images differ in size \(e\.g\. .* is 12x10, .* is 30x20\): set data.image_size"):
        prepare_splits(DataConfig(dataset="folder", root=str(tmp_path / "ds"), val_count=2), 0)
    s = prepare_splits(DataConfig(dataset="folder", root=str(tmp_path / "ds"), val_count=2, image_size=16), 0)
    assert s.train_x.shape[1:] == (3, 16, 16) and s.test_x.shape[1:] == (3, 16, 16)


# --------------------------------------------------------------------------------------------
# selections


def fashion_like(n_per_class: int = 30) -> RawDataset:
    """10 classes; pixel (0, 0..1) encodes the image index."""
    y = torch.arange(10).repeat_interleave(n_per_class)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    x = torch.zeros((len(y), 1, 8, 8), dtype=torch.uint8)
    i = torch.arange(len(y))
    x[:, 0, 0, 0], x[:, 0, 0, 1] = (i // 256).to(torch.uint8), (i % 256).to(torch.uint8)
    test_y = torch.arange(10).repeat(5)
    return RawDataset(x, y, x[: len(test_y)].clone(), test_y, [f"c{k}" for k in range(10)], "toy")


def decode_index(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()


def test_classes_subset_and_relabel_two_tasks() -> None:
    raw = fashion_like()
    first = prepare_splits(DataConfig(classes=[0, 1, 2, 3, 4], val_fraction=0.2), 0, raw)
    second = prepare_splits(DataConfig(classes=["c5", "c6", "c7", "c8", "c9"], val_fraction=0.2), 0, raw)
    for task, offset in ((first, 0), (second, 5)):
        assert task.class_names == [f"c{k + offset}" for k in range(5)] and task.class_map == list(range(offset, offset + 5))
        for split in ("train", "val", "test"):
            idx = task.indices[split]
            source = raw.test_y if split == "test" else raw.train_y
            assert getattr(task, f"{split}_y").tolist() == (source[idx] - offset).tolist()
        assert decode_index(task.train_x) == task.indices["train"]
        assert len(task.train_y) + len(task.val_y) == 150 and len(task.test_y) == 25
    assert not set(first.indices["train"]) & set(second.indices["train"])
    reordered = prepare_splits(DataConfig(classes=[9, 0]), 0, raw)
    assert reordered.class_names == ["c9", "c0"] and set(reordered.test_y[raw.test_y[reordered.indices["test"]] == 9].tolist()) == {0}
    record = first.selection_record()
    assert record["classes"] == {"dataset_index": [0, 1, 2, 3, 4], "names": ["c0", "c1", "c2", "c3", "c4"]}


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        ([0, 10], "data.classes[1]: class index 10 is out of range 0..9"),
        (["c1", "c11"], "data.classes[1]: no class named 'c11' (did you mean 'c1'?)"),
        ([3, "c3"], "data.classes[1]: class 'c3' is listed twice"),
    ],
)
def test_classes_errors(classes: list, expected: str) -> None:
    with pytest.raises(DatasetError) as info:
        prepare_splits(DataConfig(classes=classes), 0, fashion_like())
    assert expected in str(info.value)


def test_k_per_class_and_val_count() -> None:
    raw = fashion_like()
    s = prepare_splits(DataConfig(k_per_class=12, val_count=20), 1, raw)
    used = s.indices["train"] + s.indices["val"]
    assert len(used) == 120 and torch.bincount(raw.train_y[used], minlength=10).tolist() == [12] * 10
    assert len(s.val_y) == 20 and torch.bincount(s.val_y, minlength=10).tolist() == [2] * 10
    assert prepare_splits(DataConfig(k_per_class=12, val_count=20), 1, raw).indices == s.indices
    assert prepare_splits(DataConfig(k_per_class=12, val_count=20), 2, raw).indices != s.indices
    with pytest.raises(DatasetError, match="data.k_per_class=31 but class 'c0' has only 30 training images"):
        prepare_splits(DataConfig(k_per_class=31), 0, raw)
    with pytest.raises(DatasetError, match="data.val_count=5 of 300 training images leaves too few images for 10 classes"):
        prepare_splits(DataConfig(val_count=5), 0, raw)


def test_selection_config_validation() -> None:
    def error(data: dict) -> str:
        with pytest.raises(ConfigError) as info:
            from_dict(ExperimentConfig, {"name": "e", "data": data}).validate()
        return str(info.value)

    assert "data.k_per_class=5 and data.train_subset cannot both be set" in error({"k_per_class": 5, "train_subset": 0.5})
    assert "data.classes=[1] must list at least 2 classes" in error({"classes": [1]})
    assert "data.classes=[1, '1'] lists a class twice" in error({"classes": [1, "1"]})
    assert "data.val_count=0 must be >= 1" in error({"val_count": 0})
    assert "data.test_fraction=1.0 must be in (0, 1)" in error({"test_fraction": 1})
    assert from_dict(ExperimentConfig, {"data": {"in_memory": "auto"}}).data.in_memory == "auto"
    assert from_dict(ExperimentConfig, {"data": {"in_memory": False}}).data.in_memory is False
    with pytest.raises(ConfigError, match="data.in_memory"):
        from_dict(ExperimentConfig, {"data": {"in_memory": "sometimes"}})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "n_train", "n_test", "n_classes", "size"),
    [("cifar10", 50000, 10000, 10, 32), ("cifar100_coarse", 50000, 10000, 20, 32), ("tiny_imagenet", 100000, 10000, 200, 64)],
)
def test_real_downloaded_datasets(name: str, n_train: int, n_test: int, n_classes: int, size: int) -> None:
    """The real files, where a user's $TRANSFERLAB_DATA holds them (skipped otherwise; never downloads)."""
    if not REAL_DATA or not (Path(REAL_DATA) / name.replace("_coarse", "")).is_dir():
        pytest.skip(f"no {name} under $TRANSFERLAB_DATA")
    raw = load_dataset(DataConfig(dataset=name, root=str(Path(REAL_DATA) / name.replace("_coarse", ""))))
    assert (len(raw.train_y), len(raw.test_y), len(raw.class_names)) == (n_train, n_test, n_classes)
    assert torch.bincount(raw.train_y).tolist() == [n_train // n_classes] * n_classes
    s = prepare_splits(DataConfig(dataset=name, root=str(Path(REAL_DATA) / name.replace("_coarse", "")), train_subset=0.1, test_subset=0.1), 0, raw)
    assert s.in_memory and s.train_x.shape[1:] == (3, size, size)


def test_real_fashion_mnist_two_tasks_k_per_class(tmp_path: Path) -> None:
    """Real data (Debian's dataset-fashion-mnist): classes 0-4 and 5-9 as two tasks, 50 per class."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist")
    raw = load_dataset(DataConfig(dataset="fashion_mnist"))
    a = prepare_splits(DataConfig(classes=[0, 1, 2, 3, 4], k_per_class=50, val_count=50, test_subset=500), 0, raw)
    b = prepare_splits(DataConfig(classes=[5, 6, 7, 8, 9], k_per_class=50, val_count=50, test_subset=500), 0, raw)
    assert a.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    assert b.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    for task, offset in ((a, 0), (b, 5)):
        assert len(task.train_y) == 200 and len(task.val_y) == 50 and len(task.test_y) == 500
        assert torch.bincount(task.test_y).tolist() == [100] * 5
        assert (raw.train_y[task.indices["train"]] - offset).tolist() == task.train_y.tolist()
        assert torch.equal(task.train_x, raw.train_x[task.indices["train"]])


# --------------------------------------------------------------------------------------------
# augmentations: parsing


def test_augment_syntax_in_study_file() -> None:
    raw = {
        "study": "s",
        "experiments": [
            {"name": "a", "data": {"augment": ["flip", {"crop": {"padding": 2}}, {"rotate": 15}, {"affine": {"shear": 10, "zoom": 0.1}}, "erase"]}}
        ],
    }
    cfg = parse_study(raw).experiments[0]
    augs = [parse_augmentation(a) for a in cfg.data.augment]
    assert [a.name for a in augs] == ["flip", "crop", "rotate", "affine", "erase"]
    assert augs[1].padding == 2 and augs[2].degrees == 15.0 and (augs[3].shear, augs[3].zoom, augs[3].degrees) == (10.0, 0.1, 0.0)
    assert parse_augmentation({"resized_crop": 0.5}).scale == (0.5, 1.0)
    assert parse_augmentation({"erase": {"scale": [0.1, 0.2]}}).scale == (0.1, 0.2)
    assert set(AUGMENTATIONS) == {"flip", "vflip", "crop", "translate", "rotate", "affine", "erase", "resized_crop",
                                  "randaugment", "trivialaugment", "autoaugment", "augmix"}  # the last four: tests/test_recipes.py


@pytest.mark.parametrize(
    ("augment", "expected"),
    [
        (["flip", "rotat"], "data.augment[1]: unknown augmentation 'rotat' (did you mean 'rotate'?); available: flip, vflip"),
        (
            [{"crop": {"paddin": 2}}],
            "data.augment[0]: crop: unknown parameter 'paddin' (did you mean 'padding'?); valid: padding, padding_mode, fill",
        ),
        ([{"rotate": "lots"}], "data.augment[0]: rotate: degrees='lots' must be a number"),
        ([{"rotate": 400}], "rotate: degrees=400.0 must be in (0, 180]"),
        ([{"affine": 10}], "affine: give its parameters as a mapping"),
        ([{"affine": {}}], "affine: set at least one of degrees, translate, zoom, shear"),
        ([{"flip": 0.5, "crop": 4}], "expected a name or a one-key mapping"),
        ([{"crop": {"padding_mode": "wrap"}}], "crop: padding_mode='wrap' must be one of reflect, constant, edge"),
        ([{"erase": {"scale": [0.5, 0.1]}}], "erase: scale=[0.5, 0.1] must be [low, high]"),
    ],
)
def test_augment_errors_in_study_file(augment: list, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_study({"study": "s", "experiments": [{"name": "a", "data": {"augment": augment}}]}, "s.yaml")
    assert str(info.value).startswith("s.yaml: experiment 'a': ")
    assert expected in str(info.value)


# --------------------------------------------------------------------------------------------
# augmentations: the two paths agree


def test_batched_affine_matrix_is_torchvisions() -> None:
    from torchvision.transforms.functional import _get_inverse_affine_matrix

    g = torch.Generator().manual_seed(0)
    n = 50
    ranges = ((-180, 180), (-5, 5), (-5, 5), (0.6, 1.4), (-40, 40), (-30, 30))
    params = [torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo for lo, hi in ranges]
    ours = inverse_affine_matrices(*params)
    for i in range(n):
        a, tx, ty, s, sx, sy = (float(p[i]) for p in params)
        theirs = _get_inverse_affine_matrix([0.0, 0.0], a, [tx, ty], s, [sx, sy])
        np.testing.assert_allclose(ours[i].flatten().numpy(), theirs, atol=1e-9)


def test_batched_warp_matches_torchvision_affine() -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = torch.randint(0, 256, (6, 3, 17, 23), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cases = [
        (30.0, 2, -3, 1.1, 10.0), (-75.0, 0, 0, 0.8, 0.0), (0.0, 5, 1, 1.0, -20.0),
        (90.0, 0, 0, 1.0, 0.0), (12.0, -4, 4, 1.3, 5.0), (0.0, 0, 0, 1.0, 0.0),
    ]
    angle, tx, ty, scale, shear = (torch.tensor([c[k] for c in cases], dtype=torch.float64) for k in range(5))
    theta = inverse_affine_matrices(angle, tx, ty, scale, shear, torch.zeros(6, dtype=torch.float64))
    ours = warp_batch(x, theta, fill=0.0)
    for i, (a, dx, dy, s, sh) in enumerate(cases):
        ref = TF.affine(x[i], angle=a, translate=[dx, dy], scale=s, shear=[sh, 0.0], interpolation=InterpolationMode.BILINEAR, fill=0)
        diff = (ours[i].int() - ref.int()).abs()
        assert diff.max() <= 1, (i, diff.max())  # float rounding only
    assert torch.equal(ours[5], x[5])  # the identity is exact


def _asym_images(n: int, size: int = 16, channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    x[:, :, :, : size // 2] //= 4  # a dark left half: flips and shifts are visible
    return x


def _both_paths(spec: object, n: int = 600, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _asym_images(n, channels=channels)
    pre = IDENTITY if channels == 1 else Preprocess((0.0,) * 3, (1 / 255,) * 3, 3)
    batch = TensorBatches(x, torch.zeros(n, dtype=torch.long), 200, pre, augment=[spec], seed=5, channels_last=False)
    fast = torch.cat([xb for xb, _ in batch]).round().to(torch.uint8)
    ds = ImageDataset(x, torch.zeros(n, dtype=torch.long), [spec])
    slow = torch.stack([ds[(i, 1000 + i)][0] for i in range(n)])
    return x, fast, slow


def _stats(x: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    same = (out == x).flatten(1).all(1).float().mean().item()
    flipped = (out == x.flip(-1)).flatten(1).all(1).float().mean().item()
    vflipped = (out == x.flip(-2)).flatten(1).all(1).float().mean().item()
    return {
        "unchanged": same,
        "flipped": flipped,
        "vflipped": vflipped,
        "mean_abs_change": (out.float() - x.float()).abs().mean().item(),
        "zeros": (out == 0).float().mean().item(),
        "left_mean": out[..., : out.shape[-1] // 2].float().mean().item(),
    }


@pytest.mark.parametrize(
    "spec",
    [
        "flip",
        {"vflip": 0.3},
        {"crop": {"padding": 3}},
        {"crop": {"padding": 2, "padding_mode": "constant"}},
        {"translate": 0.2},
        {"rotate": 30},
        {"affine": {"shear": 20, "zoom": 0.2}},
        "erase",
        {"resized_crop": 0.3},
    ],
)
def test_augmentations_agree_in_distribution(spec: object) -> None:
    """The same augmentation name on the in-memory path and the PIL path: same statistics.

    Rates (unchanged / flipped / zero pixels) agree within 0.05, magnitudes (mean change, mean of
    the dark half) within 10 %; with 1 500 images the sampling noise is a third of that.
    """
    x, fast, slow = _both_paths(spec, n=1500)
    assert fast.shape == slow.shape == x.shape and slow.dtype == torch.uint8
    a, b = _stats(x, fast), _stats(x, slow)
    assert a["mean_abs_change"] > 1.0  # the augmentation did something
    for key in a:
        if key in ("mean_abs_change", "left_mean"):
            assert abs(a[key] - b[key]) <= 0.1 * max(a[key], b[key]), (spec, key, a[key], b[key])
        else:
            assert abs(a[key] - b[key]) <= 0.05, (spec, key, a[key], b[key])


def test_distribution_check_detects_a_different_parameter() -> None:
    """The statistics above are sharp enough to see a changed parameter (the test can fail)."""
    x, fast, _ = _both_paths({"rotate": 30}, n=1500)
    _, _, slow = _both_paths({"rotate": 15}, n=1500)
    a, b = _stats(x, fast), _stats(x, slow)
    assert abs(a["mean_abs_change"] - b["mean_abs_change"]) > 0.1 * a["mean_abs_change"]
    x, fast, _ = _both_paths({"flip": 0.5}, n=1500)
    _, _, slow = _both_paths({"flip": 0.4}, n=1500)
    assert abs(_stats(x, fast)["flipped"] - _stats(x, slow)["flipped"]) > 0.05


def test_flip_rate_agrees_on_rgb() -> None:
    x, fast, slow = _both_paths({"flip": 0.3}, n=1000, channels=3)
    rate_fast = (fast == x.flip(-1)).flatten(1).all(1).float().mean().item()
    rate_slow = (slow == x.flip(-1)).flatten(1).all(1).float().mean().item()
    assert abs(rate_fast - 0.3) < 0.05 and abs(rate_slow - 0.3) < 0.05


def test_no_augmentation_paths_give_identical_batches() -> None:
    x = _asym_images(50, channels=3)
    y = torch.arange(50)
    pre = Preprocess((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    fast = TensorBatches(x, y, 16, pre, shuffle=True, seed=4)
    slow = LoaderBatches(x, y, 16, pre, shuffle=True, seed=4, num_workers=0)
    for epoch in (0, 1):
        fast.set_epoch(epoch)
        slow.set_epoch(epoch)
        pairs = list(zip(fast, slow, strict=True))
        assert len(pairs) == len(fast) == len(slow) == 4
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_loader_batches_reproducible_and_worker_independent() -> None:
    x = _asym_images(40, channels=3)
    y = torch.arange(40)
    pre = Preprocess((0.0,) * 3, (1 / 255,) * 3)
    augs = ["flip", {"rotate": 20}, "erase"]

    def epoch(workers: int, e: int, seed: int = 1) -> torch.Tensor:
        lb = LoaderBatches(x, y, 16, pre, shuffle=True, augment=augs, seed=seed, num_workers=workers)
        lb.set_epoch(e)
        return torch.cat([torch.cat([xb.flatten(1), yb.view(-1, 1).float()], 1) for xb, yb in lb])

    first = epoch(0, 2)
    assert torch.equal(first, epoch(0, 2))
    assert torch.equal(first, epoch(1, 2))  # a worker process gives the same images
    assert not torch.equal(first, epoch(0, 3)) and not torch.equal(first, epoch(0, 2, seed=2))
    # one loader with a persistent worker, epoch after epoch, as the training loop uses it
    lb = LoaderBatches(x, y, 16, pre, shuffle=True, augment=augs, seed=1, num_workers=1)
    for e in (2, 3):
        lb.set_epoch(e)
        got = torch.cat([torch.cat([xb.flatten(1), yb.view(-1, 1).float()], 1) for xb, yb in lb])
        assert torch.equal(got, epoch(0, e))


# --------------------------------------------------------------------------------------------
# end to end: the same accuracy on both paths, every loader from the CLI


def _train_digits(in_memory: bool, augment: list) -> float:
    from lightning.fabric import Fabric

    from transferlab.engine import fit
    from transferlab.engine.evaluation import evaluate
    from transferlab.models.model import build_model

    cfg = from_dict(
        ExperimentConfig,
        {
            "name": f"digits_{in_memory}",
            "data": {"dataset": "digits", "image_size": 16, "augment": augment, "in_memory": in_memory, "num_workers": 0},
            "model": {"backbone": "transferlab_cnn", "weights": "scratch", "channels_last": False},
            "train": {"epochs": 12, "batch_size": 64, "lr": 0.003, "progress": False, "accelerator": "cpu", "checkpoint_every_minutes": None},
        },
    )
    splits = prepare_splits(cfg.data, 0)
    assert splits.in_memory is in_memory
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0, verbose=False)
    model, _ = build_model(cfg.model, cfg.head, splits.num_classes)
    common = dict(preprocess=model.preprocess(), channels_last=False, num_workers=0)
    train = make_batches(splits, "train", 64, shuffle=True, augment=augment, seed=0, **common)
    val = make_batches(splits, "val", 256, **common)
    test = make_batches(splits, "test", 256, **common)
    assert isinstance(train, TensorBatches if in_memory else LoaderBatches)
    import tempfile

    with tempfile.TemporaryDirectory() as ckpt:
        fit(model, train, val, cfg, fabric, Path(ckpt), {"config": cfg.to_dict()})
    return evaluate(model, test, splits.num_classes).acc


def test_digits_same_accuracy_in_memory_and_pil() -> None:
    augment = [{"rotate": 10}, {"translate": 0.1}]
    fast = _train_digits(True, augment)
    slow = _train_digits(False, augment)
    assert fast > 0.9 and slow > 0.9
    assert abs(fast - slow) <= 0.01 + 1e-9, (fast, slow)


def _study(tmp_path: Path, data: dict) -> Path:
    study = {
        "study": "fmt",
        "defaults": {
            "data": {"val_fraction": 0.25, **data},
            "model": {"backbone": "transferlab_cnn", "weights": "scratch"},
            "train": {"epochs": 1, "batch_size": 8, "progress": False, "accelerator": "cpu"},
        },
        "experiments": [{"name": "e"}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _write_dataset(kind: str, tmp_path: Path) -> dict:
    if kind == "cifar10":
        write_cifar10(tmp_path / "d" / "cifar-10-batches-py", per_batch=8)
        return {"dataset": "cifar10", "root": str(tmp_path / "d")}
    if kind == "cifar100_coarse":
        write_cifar100(tmp_path / "d" / "cifar-100-python", n_train=100, n_test=40)
        return {"dataset": "cifar100_coarse", "root": str(tmp_path / "d"), "val_fraction": 0.4}
    if kind == "mnist":
        write_mnist(tmp_path / "d", n_train=60, n_test=20)
        return {"dataset": "mnist", "root": str(tmp_path / "d")}
    if kind == "tiny_imagenet":
        write_tiny_imagenet(tmp_path / "d")
        return {"dataset": "tiny_imagenet", "root": str(tmp_path / "d"), "image_size": 16, "augment": ["flip", "crop"]}
    if kind == "folder":
        write_folder(tmp_path / "d", ["a b", "ç"], 8)
        return {"dataset": "folder", "root": str(tmp_path / "d"), "image_size": 12, "in_memory": False, "num_workers": 0, "augment": [{"rotate": 5}]}
    files = write_folder(tmp_path / "d", ["p", "q"], 8)
    (tmp_path / "d" / "l.csv").write_text("path,label\n" + "".join(f"{f.relative_to(tmp_path / 'd').as_posix()},{f.parent.name}\n" for f in files))
    return {"dataset": "folder", "root": str(tmp_path / "d" / "l.csv"), "image_size": 12}


@pytest.mark.parametrize("kind", ["cifar10", "cifar100_coarse", "mnist", "tiny_imagenet", "folder", "csv"])
def test_every_loader_from_the_cli(tmp_path: Path, kind: str) -> None:
    from transferlab.cli import main

    data = _write_dataset(kind, tmp_path)
    study = _study(tmp_path, data)
    assert main(["check-data", str(study)]) == 0
    assert main(["run", str(study), "--runs-dir", str(tmp_path / "runs")]) == 0
    run = tmp_path / "runs" / "fmt" / "e"
    metrics = json.loads((run / "metrics.json").read_text())
    selection = json.loads((run / "selection.json").read_text())
    assert metrics["status"] == "ok" and metrics["dataset"] == data["dataset"] and metrics["skipped_bad_images"] == 0
    assert metrics["n_train"] == len(selection["train"]) and metrics["n_test"] == len(selection["test"])
    assert selection["skipped_bad_images"] == [] and selection["in_memory"] == (data.get("in_memory", True) is not False)


def test_selection_recorded_in_run_directory(tmp_path: Path) -> None:
    from transferlab.kinds import run_experiment

    write_folder(tmp_path / "d", ["a", "b", "c"], 10)
    cfg = from_dict(
        ExperimentConfig,
        {
            "name": "sel",
            "seed": 3,
            "data": {"dataset": "folder", "root": str(tmp_path / "d"), "classes": ["c", "a"], "k_per_class": 6, "val_count": 2},
            "model": {"backbone": "transferlab_cnn"},
            "train": {"epochs": 1, "batch_size": 4, "progress": False, "accelerator": "cpu"},
        },
    )
    run_experiment(cfg, tmp_path / "r1")
    run_experiment(cfg, tmp_path / "r2")
    one = json.loads((tmp_path / "r1" / "selection.json").read_text())
    assert one == json.loads((tmp_path / "r2" / "selection.json").read_text())  # same seed => same indices
    assert one["classes"] == {"dataset_index": [2, 0], "names": ["c", "a"]}
    assert len(one["train"]) == 10 and len(one["val"]) == 2 and one["val_from"] == "train"
    assert json.loads((tmp_path / "r1" / "metrics.json").read_text())["class_names"] == ["c", "a"]
