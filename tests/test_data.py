"""Tests for transferlab.data: IDX reading, dataset lookup, splits, augmentation and batches."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from transferlab.config import DataConfig
from transferlab.data import datasets
from transferlab.data.augment import augment_batch
from transferlab.data.batches import Preprocess, TensorBatches
from transferlab.data.datasets import FASHION_MNIST_CLASSES, read_idx
from transferlab.data.prepare import prepare_splits
from transferlab.data.sources import DatasetError, RawDataset, load_dataset

FASHION_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------------------------
# fixtures written in the exact IDX format


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding: 2 zero bytes, dtype 0x08 (uint8), ndim, big-endian uint32 dims, raw data."""
    assert arr.dtype == np.uint8
    return struct.pack(">I", 0x00000800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    data = idx_bytes(arr)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def fashion_arrays(n_train: int = 40, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": (np.arange(n_train) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": (np.arange(n_test) % 10).astype(np.uint8),
    }


def write_fashion(directory: Path, gz: bool = False, **kwargs: int) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = fashion_arrays(**kwargs)
    for key, name in IDX_NAMES.items():
        write_idx(directory / (name + (".gz" if gz else "")), arrays[key])
    return arrays


@pytest.fixture
def no_default_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every default lookup location at empty folders so only data.root can be found."""
    empty_env, empty_debian = tmp_path / "env_data", tmp_path / "debian"
    empty_env.mkdir()
    empty_debian.mkdir()
    monkeypatch.setenv("TRANSFERLAB_DATA", str(empty_env))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", empty_debian)
    return empty_env


# --------------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_images_and_labels(tmp_path: Path, suffix: str) -> None:
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    img_path = write_idx(tmp_path / f"images-idx3-ubyte{suffix}", images)
    lbl_path = write_idx(tmp_path / f"labels-idx1-ubyte{suffix}", labels)
    if not suffix:  # the exact magic numbers of the format
        assert img_path.read_bytes()[:4] == b"\x00\x00\x08\x03"
        assert lbl_path.read_bytes()[:8] == b"\x00\x00\x08\x01\x00\x00\x00\x05"
    got_images, got_labels = read_idx(img_path), read_idx(lbl_path)
    assert got_images.dtype == np.uint8 and got_images.shape == (5, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.shape == (5,)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-5])
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "(3, 4, 4) (48 bytes) but 43 bytes follow" in str(info.value)


def test_read_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "header-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((3, 4, 4), np.uint8))[:10])  # 3 dims need 16 header bytes
    with pytest.raises(DatasetError, match="truncated IDX header") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError, match="too short"):
        read_idx(path)


def test_read_idx_truncated_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    assert str(path) in str(info.value) and "cannot read IDX file" in str(info.value)


@pytest.mark.parametrize("magic", [0x00000903, 0x00000D01, 0x01000803, 0x1F8B0800])
def test_read_idx_wrong_magic(tmp_path: Path, magic: int) -> None:
    path = tmp_path / "bad-idx-ubyte"
    path.write_bytes(struct.pack(">II", magic, 2) + b"\x00\x01")
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert f"magic {magic:08x}" in str(info.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read IDX file"):
        read_idx(tmp_path / "missing-idx1-ubyte")


# --------------------------------------------------------------------------------------------
# fashion_mnist loader


def test_fashion_mnist_class_names() -> None:
    assert FASHION_MNIST_CLASSES == FASHION_NAMES


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_root(tmp_path: Path, no_default_data: Path, gz: bool) -> None:
    root = tmp_path / "fm"
    arrays = write_fashion(root, gz=gz)
    raw = load_dataset(DataConfig(dataset="fashion_mnist", root=str(root)))
    assert raw.train_x.shape == (40, 1, 28, 28) and raw.train_x.dtype == torch.uint8
    assert raw.test_x.shape == (20, 1, 28, 28) and raw.test_x.dtype == torch.uint8
    assert raw.train_y.dtype == torch.int64 and raw.test_y.dtype == torch.int64
    np.testing.assert_array_equal(raw.train_x[:, 0].numpy(), arrays["train_x"])
    np.testing.assert_array_equal(raw.test_x[:, 0].numpy(), arrays["test_x"])
    assert raw.train_y.tolist() == list(range(10)) * 4
    assert raw.test_y.tolist() == list(range(10)) * 2
    assert raw.class_names == FASHION_NAMES
    assert raw.source == str(root)
    raw.train_x[0, 0, 0, 0] = 7  # decoded tensors are writable, not views of read-only buffers


def test_fashion_mnist_torchvision_layout(tmp_path: Path, no_default_data: Path) -> None:
    root = tmp_path / "tv"
    arrays = write_fashion(root / "FashionMNIST" / "raw", gz=True, n_train=30, n_test=10)
    raw = load_dataset(DataConfig(dataset="fashion_mnist", root=str(root)))
    assert raw.source == str(root / "FashionMNIST" / "raw")
    assert raw.train_x.shape == (30, 1, 28, 28) and raw.test_x.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(raw.test_x[:, 0].numpy(), arrays["test_x"])


def test_fashion_mnist_from_env_folder(tmp_path: Path, no_default_data: Path) -> None:
    write_fashion(no_default_data / "fashion_mnist", n_train=20, n_test=10)
    raw = load_dataset(DataConfig(dataset="fashion_mnist"))
    assert raw.source == str(no_default_data / "fashion_mnist")
    assert len(raw.train_x) == 20


def test_fashion_mnist_label_count_mismatch(tmp_path: Path, no_default_data: Path) -> None:
    root = tmp_path / "fm"
    write_fashion(root)
    write_idx(root / IDX_NAMES["test_y"], np.zeros(19, np.uint8))
    with pytest.raises(DatasetError, match="test images and labels differ in count"):
        load_dataset(DataConfig(root=str(root)))


def test_fashion_mnist_missing_explains_how_to_get_it(
    tmp_path: Path, no_default_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    root = tmp_path / "empty_root"
    root.mkdir()
    calls = []

    def offline(path: str, train: bool, download: bool) -> None:
        calls.append(path)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetError) as info:
        load_dataset(DataConfig(dataset="fashion_mnist", root=str(root)))
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.root" in message
    assert "OSError: network is unreachable" in message
    assert str(root) in message and str(no_default_data / "fashion_mnist") in message
    assert calls == [str(root)]  # the download goes into data.root


def test_fashion_mnist_download_branch(tmp_path: Path, no_default_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def fake_download(path: str, train: bool, download: bool) -> None:
        assert download
        write_fashion(Path(path) / "FashionMNIST" / "raw", gz=True, n_train=20, n_test=10)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    root = tmp_path / "dl"
    raw = load_dataset(DataConfig(dataset="fashion_mnist", root=str(root)))
    assert raw.source == str(root / "FashionMNIST" / "raw")
    assert raw.train_x.shape == (20, 1, 28, 28)


def test_unknown_dataset_suggests() -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'fashion_mnst' \(did you mean 'fashion_mnist'\?\)"):
        load_dataset(DataConfig(dataset="fashion_mnst"))


def test_real_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not debian.is_dir():
        pytest.skip(f"Fashion-MNIST is not installed in {debian}: `apt-get install dataset-fashion-mnist`")
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path))  # no user copy in the way
    raw = load_dataset(DataConfig(dataset="fashion_mnist"))
    assert raw.source == str(debian)
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.train_x.dtype == torch.uint8
    assert raw.test_x.shape == (10000, 1, 28, 28) and raw.test_x.dtype == torch.uint8
    assert torch.bincount(raw.train_y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(raw.test_y, minlength=10).tolist() == [1000] * 10
    assert int(raw.train_x.max()) == 255 and int(raw.train_x.min()) == 0
    assert raw.class_names == FASHION_NAMES


# --------------------------------------------------------------------------------------------
# digits


def test_digits() -> None:
    from sklearn.datasets import load_digits

    raw = load_dataset(DataConfig(dataset="digits"))
    assert raw.class_names == [str(i) for i in range(10)]
    assert raw.train_x.dtype == torch.uint8 and raw.train_x.shape[1:] == (1, 8, 8)
    assert int(raw.train_x.min()) == 0 and int(raw.train_x.max()) == 255
    assert len(raw.train_x) + len(raw.test_x) == 1797 and len(raw.test_x) == 450
    assert len(raw.train_y) == len(raw.train_x) and raw.train_y.dtype == torch.int64
    assert set(raw.test_y.tolist()) == set(range(10))

    # train + test is exactly the whole dataset (a partition: disjoint, nothing lost)
    d = load_digits()
    full = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    rows = lambda x, y: sorted(a.tobytes() + bytes([b]) for a, b in zip(x, y, strict=True))  # noqa: E731
    split_x = np.concatenate([raw.train_x[:, 0].numpy(), raw.test_x[:, 0].numpy()])
    split_y = np.concatenate([raw.train_y.numpy(), raw.test_y.numpy()])
    assert rows(split_x, split_y) == rows(full, d.target)

    again = load_dataset(DataConfig(dataset="digits"))  # fixed split, independent of the experiment
    assert torch.equal(again.test_x, raw.test_x) and torch.equal(again.train_y, raw.train_y)


# --------------------------------------------------------------------------------------------
# prepare_splits


def toy_raw(per_class: list[int] | None = None, n_test_per_class: int = 10, size: int = 8) -> RawDataset:
    """Unbalanced toy dataset; pixel (0,0) and (0,1) encode the image's index (i // 256, i % 256)."""
    per_class = per_class or [10 + 4 * c for c in range(10)]

    def make(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
        y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))]
        x = torch.full((len(y), 1, size, size), 100, dtype=torch.uint8)
        i = torch.arange(len(y))
        x[:, 0, 0, 0], x[:, 0, 0, 1] = (i // 256).to(torch.uint8), (i % 256).to(torch.uint8)
        return x, y

    train_x, train_y = make(per_class)
    test_x, test_y = make([n_test_per_class] * len(per_class))
    return RawDataset(train_x, train_y, test_x, test_y, [f"c{c}" for c in range(len(per_class))], "toy")


def decode_index(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()


def test_prepare_splits_stratified_and_disjoint() -> None:
    raw = toy_raw()
    s = prepare_splits(DataConfig(val_fraction=0.2), seed=0, raw=raw)
    train, val, test = s.indices["train"], s.indices["val"], s.indices["test"]
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(len(raw.train_y)))  # no subset: every image used once
    assert test == list(range(len(raw.test_y)))
    assert len(val) == round(0.2 * len(raw.train_y))
    counts = torch.bincount(raw.train_y, minlength=10)
    val_counts = torch.bincount(s.val_y, minlength=10)
    for c in range(10):
        assert abs(val_counts[c].item() - 0.2 * counts[c].item()) <= 1, (c, val_counts[c], counts[c])
    # images and labels are the ones the indices name
    assert decode_index(s.train_x) == train and decode_index(s.val_x) == val
    assert s.train_y.tolist() == raw.train_y[train].tolist()
    assert s.val_y.tolist() == raw.train_y[val].tolist()
    assert s.num_classes == 10 and s.class_names == raw.class_names and s.source == "toy"
    assert s.train_x.shape[1:] == (1, 8, 8) and s.train_x.dtype == torch.uint8


def test_prepare_splits_seeded() -> None:
    raw = toy_raw()
    cfg = DataConfig(val_fraction=0.2, train_subset=0.5, test_subset=0.5)
    a, b, c = (prepare_splits(cfg, seed, raw) for seed in (1, 1, 2))
    assert a.indices == b.indices
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert a.indices["train"] != c.indices["train"]
    assert a.indices["val"] != c.indices["val"]
    assert a.indices["test"] != c.indices["test"]


def test_train_subset_fraction_and_count() -> None:
    raw = toy_raw()  # 280 training images, class c has 10 + 4c
    counts = torch.bincount(raw.train_y, minlength=10)
    half = prepare_splits(DataConfig(val_fraction=0.2, train_subset=0.5), 0, raw)
    used = half.indices["train"] + half.indices["val"]
    assert len(used) == 140 and len(set(used)) == 140
    used_counts = torch.bincount(raw.train_y[used], minlength=10)
    for c in range(10):
        assert abs(used_counts[c].item() - counts[c].item() / 2) <= 1
    assert len(half.indices["val"]) == 28

    count = prepare_splits(DataConfig(val_fraction=0.2, train_subset=100), 0, raw)
    assert len(count.indices["train"]) + len(count.indices["val"]) == 100
    assert len(count.train_x) + len(count.val_x) == 100
    everything = prepare_splits(DataConfig(val_fraction=0.2, train_subset=280), 0, raw)
    assert len(everything.indices["train"]) + len(everything.indices["val"]) == 280


def test_train_subset_leaving_fewer_than_one_per_class_out() -> None:
    raw = toy_raw()
    # 275 of 280 leaves a remainder of 5 < 10 classes, which sklearn cannot stratify
    s = prepare_splits(DataConfig(val_fraction=0.2, train_subset=275), 0, raw)
    used = s.indices["train"] + s.indices["val"]
    assert len(used) == 275 and len(set(used)) == 275


def test_test_subset() -> None:
    raw = toy_raw(n_test_per_class=10)
    frac = prepare_splits(DataConfig(test_subset=0.5), 0, raw)
    assert len(frac.test_x) == 50
    assert torch.bincount(frac.test_y, minlength=10).tolist() == [5] * 10
    assert decode_index(frac.test_x) == frac.indices["test"]
    count = prepare_splits(DataConfig(test_subset=30), 0, raw)
    assert len(count.test_y) == 30 and torch.bincount(count.test_y, minlength=10).tolist() == [3] * 10


def test_image_size_resizes_once() -> None:
    raw = toy_raw()
    raw.train_x[:, :, :, :] = 77  # constant images stay constant under bilinear resizing
    s = prepare_splits(DataConfig(image_size=20), 0, raw)
    assert s.train_x.shape[1:] == (1, 20, 20) and s.val_x.shape[1:] == (1, 20, 20)
    assert s.test_x.shape[1:] == (1, 20, 20)
    assert s.train_x.dtype == torch.uint8
    assert torch.all(s.train_x == 77)
    same = prepare_splits(DataConfig(image_size=8), 0, raw)
    assert torch.equal(same.train_x, raw.train_x[same.indices["train"]])


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (DataConfig(train_subset=1000), "data.train_subset=1000 asks for 1000 images but the split has only 280"),
        (DataConfig(train_subset=5), "data.train_subset=5 gives 5 images, fewer than the 10 classes"),
        (DataConfig(test_subset=101), "data.test_subset=101 asks for 101 images but the split has only 100"),
        (DataConfig(val_fraction=0.01), "data.val_fraction=0.01 of 280 training images leaves too few"),
        (DataConfig(val_fraction=0.99), "data.val_fraction=0.99 of 280 training images leaves too few"),
        (DataConfig(train_subset=30, val_fraction=0.2), "data.val_fraction=0.2 of 30 training images"),
    ],
)
def test_prepare_splits_errors(cfg: DataConfig, expected: str) -> None:
    with pytest.raises(DatasetError) as info:
        prepare_splits(cfg, 0, toy_raw())
    assert expected in str(info.value)


# --------------------------------------------------------------------------------------------
# augmentation


def test_flip() -> None:
    x = torch.randint(0, 256, (4000, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, ["flip"], torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    unchanged = (out == x).flatten(1).all(1)
    symmetric = (x == x.flip(-1)).flatten(1).all(1)
    assert not symmetric.any()  # so "flipped" and "unchanged" cannot both hold
    assert torch.all(flipped ^ unchanged)
    assert abs(flipped.float().mean().item() - 0.5) < 0.03


def _reflect_windows(x: torch.Tensor, pad: int = 4) -> np.ndarray:
    return np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")


def test_crop_is_shifted_window_of_reflect_padded_input() -> None:
    x = torch.randint(0, 256, (32, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, ["crop"], torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded, got = _reflect_windows(x), out.numpy()
    offsets = []
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if np.array_equal(got[i], padded[i, :, dy : dy + 12, dx : dx + 12])
        ]
        assert len(matches) == 1, (i, matches)
        offsets.append(matches[0])
    assert len(set(offsets)) > 5  # offsets really vary between images

    # one image checked exactly against a hand-made reflect pad: window at offset (dy, dx)
    dy, dx = offsets[0]
    img = x[0, 0].numpy().astype(int)
    reflect = lambda k: abs(k) if k < 12 else 2 * 11 - k  # noqa: E731  (index -> source index, reflect)
    expected = np.array([[img[reflect(r + dy - 4), reflect(c + dx - 4)] for c in range(12)] for r in range(12)])
    np.testing.assert_array_equal(got[0, 0], expected)


def test_crop_deterministic_with_seeded_generator() -> None:
    x = torch.randint(0, 256, (16, 1, 10, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = augment_batch(x, ["flip", "crop"], torch.Generator().manual_seed(7))
    b = augment_batch(x, ["flip", "crop"], torch.Generator().manual_seed(7))
    c = augment_batch(x, ["flip", "crop"], torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(augment_batch(x, [], torch.Generator()), x)


def test_unknown_augmentation() -> None:
    x = torch.zeros((2, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"unknown augmentation 'rotat' \(did you mean 'rotate'\?\); available: flip, vflip, crop"):
        augment_batch(x, ["flip", "rotat"], torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------
# Preprocess


def test_preprocess_grayscale_to_rgb_and_normalise() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = Preprocess(mean=mean, std=std, in_chans=3)(x)
    assert out.shape == (2, 3, 5, 5) and out.dtype == torch.float32
    for c in range(3):
        expected = (x[:, 0].double() / 255 - mean[c]) / std[c]
        torch.testing.assert_close(out[:, c].double(), expected, atol=1e-5, rtol=0)


def test_preprocess_rgb_and_channel_errors() -> None:
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    same = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(x)
    torch.testing.assert_close(same, (x.float() / 255 - 0.5) / 0.5)
    gray = Preprocess(mean=(0.0,), std=(1.0,), in_chans=1)(x)
    assert gray.shape == (2, 1, 4, 4)
    luma = (0.299 * x[:, 0].float() + 0.587 * x[:, 1].float() + 0.114 * x[:, 2].float()) / 255
    torch.testing.assert_close(gray[:, 0], luma, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot feed 2-channel images to a 3-channel model"):
        Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3)(torch.zeros((1, 2, 4, 4), dtype=torch.uint8))


# --------------------------------------------------------------------------------------------
# TensorBatches


IDENTITY = Preprocess(mean=(0.0,), std=(1.0 / 255,), in_chans=1)


def numbered(n: int = 103) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i, its label is i."""
    return torch.arange(n, dtype=torch.uint8).view(-1, 1, 1, 1).expand(n, 1, 8, 8).clone(), torch.arange(n)


def epoch_order(batches: TensorBatches, epoch: int) -> list[int]:
    batches.set_epoch(epoch)
    return [i for _, yb in batches for i in yb.tolist()]


def test_tensor_batches_cover_every_index_once() -> None:
    x, y = numbered()
    tb = TensorBatches(x, y, batch_size=10, preprocess=IDENTITY, shuffle=True, seed=3)
    assert len(tb) == 11
    sizes = []
    for xb, yb in tb:
        sizes.append(len(yb))
        assert xb.shape[1:] == (1, 8, 8) and xb.dtype == torch.float32
        assert xb.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xb[:, 0, 0, 0], yb.float())  # images stay with their labels
    assert sizes == [10] * 10 + [3]
    for epoch in range(3):
        assert sorted(epoch_order(tb, epoch)) == list(range(103))


def test_tensor_batches_order_per_epoch_and_resume() -> None:
    x, y = numbered()
    tb = TensorBatches(x, y, batch_size=16, preprocess=IDENTITY, shuffle=True, seed=3)
    e0, e1 = epoch_order(tb, 0), epoch_order(tb, 1)
    assert e0 != e1
    assert e0 != list(range(103))
    resumed = TensorBatches(x, y, batch_size=16, preprocess=IDENTITY, shuffle=True, seed=3)
    assert epoch_order(resumed, 1) == e1  # a resumed run sees epoch 1 exactly as before
    assert epoch_order(resumed, 0) == e0
    other_seed = TensorBatches(x, y, batch_size=16, preprocess=IDENTITY, shuffle=True, seed=4)
    assert epoch_order(other_seed, 0) != e0
    plain = TensorBatches(x, y, batch_size=16, preprocess=IDENTITY, shuffle=False, seed=3)
    assert epoch_order(plain, 0) == list(range(103)) == epoch_order(plain, 5)


def test_tensor_batches_augmentation_reproducible_per_epoch() -> None:
    x = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40)

    def images(epoch: int) -> torch.Tensor:
        tb = TensorBatches(x, y, batch_size=16, preprocess=IDENTITY, shuffle=True, augment=["flip", "crop"], seed=1)
        tb.set_epoch(epoch)
        return torch.cat([xb for xb, _ in tb])

    first = images(2)
    assert torch.equal(first, images(2))
    assert not torch.equal(first, images(3))
