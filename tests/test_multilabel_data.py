"""Multi-label data (issue 24): the list formats, iterative stratification, selections, folds, mosaics, check-data, batches.

Every expected value is computed here from the fixture itself (the rows written, the source images pasted, a
hypergeometric spread), not copied from a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from data_fixtures import png
from transferlab.cli.check_data import run as check_data_command
from transferlab.cli.main import main as cli_main
from transferlab.config import ConfigError, DataConfig, ExperimentConfig, from_dict
from transferlab.data import DatasetError, ImageSplits, load_dataset, make_batches, prepare_splits
from transferlab.data.check import check_path
from transferlab.data.datasets import digits
from transferlab.data.folds import fold_test_positions, folds_limit
from transferlab.data.lists import detect_task
from transferlab.data.mosaic import make_mosaics, mosaic_dataset
from transferlab.data.multilabel import iterative_folds, iterative_split, iterative_take
from transferlab.data.normalize import Preprocess
from transferlab.data.sampler import balanced_order
from transferlab.data.sources import RawDataset

CLASSES = ["cat", "dog", "fox"]
# (file, labels, split): one image with no label; fox is missing from the test split
ROWS = [
    ("img/0.png", ["cat"], "train"), ("img/1.png", ["cat", "dog"], "train"), ("img/2.png", ["dog", "fox"], "train"),
    ("img/3.png", ["fox"], "train"), ("img/4.png", [], "train"), ("img/5.png", ["cat", "dog", "fox"], "train"),
    ("img/6.png", ["dog"], "test"), ("img/7.png", ["cat"], "test"), ("img/8.png", ["cat", "dog"], "test"),
]  # fmt: skip


def _images(root: Path) -> None:
    for i, (file, _, _) in enumerate(ROWS):
        png(root / file, size=(8, 8), colour=(i * 20, i * 20, i * 20))  # pixel value = 20 * row: tells the rows apart


def _expected(split: str | None, classes: list[str] = CLASSES) -> torch.Tensor:
    rows = [labels for _, labels, s in ROWS if split is None or s == split]
    return torch.tensor([[1.0 if c in labels else 0.0 for c in classes] for labels in rows])


def _write_sep_csv(root: Path, split: bool, sep: str = ";") -> Path:
    header = "path,labels" + (",split" if split else "")
    lines = [f"{f},{sep.join(labels)}" + (f",{s}" if split else "") for f, labels, s in ROWS]
    (root / "labels.csv").write_text("\n".join([header, *lines]) + "\n")
    return root / "labels.csv"


def _write_flag_csv(root: Path, split: bool) -> Path:
    header = ",".join(["path", *CLASSES] + (["split"] if split else []))
    lines = [",".join([f, *("1" if c in labels else "0" for c in CLASSES)] + ([s] if split else [])) for f, labels, s in ROWS]
    (root / "flags.csv").write_text("\n".join([header, *lines]) + "\n")
    return root / "flags.csv"


def _write_jsonl(root: Path, split: bool) -> Path:
    lines = [json.dumps({"path": f, "labels": labels, **({"split": s} if split else {})}) for f, labels, s in ROWS]
    (root / "labels.jsonl").write_text("\n".join(lines) + "\n")
    return root / "labels.jsonl"


WRITERS = {"sep_csv": _write_sep_csv, "flag_csv": _write_flag_csv, "jsonl": _write_jsonl}


def _ml(root: Path | str, **kw: object) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), task="multilabel", **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the list formats


@pytest.mark.parametrize("form", sorted(WRITERS))
def test_each_list_form_with_a_split_column_loads_multi_hot_rows(tmp_path: Path, form: str) -> None:
    _images(tmp_path)
    raw = load_dataset(_ml(WRITERS[form](tmp_path, split=True)))
    assert raw.class_names == CLASSES
    assert raw.train_y.dtype == torch.float32 and raw.train_y.shape == (6, 3)
    assert torch.equal(raw.train_y, _expected("train")) and torch.equal(raw.test_y, _expected("test"))
    assert [Path(p).name for p in raw.train_x.paths] == [Path(f).name for f, _, s in ROWS if s == "train"]  # type: ignore[union-attr]
    assert detect_task(raw.source) == "multilabel"


@pytest.mark.parametrize("form", sorted(WRITERS))
def test_each_list_form_without_a_split_column_holds_out_a_test_split(tmp_path: Path, form: str) -> None:
    _images(tmp_path)
    raw = load_dataset(_ml(WRITERS[form](tmp_path, split=False), test_fraction=0.3))
    every = _expected(None)
    assert len(raw.train_y) + len(raw.test_y) == len(ROWS) and len(raw.test_y) == round(0.3 * len(ROWS))
    files = [Path(p).name for p in raw.train_x.paths + raw.test_x.paths]  # type: ignore[union-attr]
    rows = {Path(f).name: every[i] for i, (f, _, _) in enumerate(ROWS)}
    assert torch.equal(torch.cat([raw.train_y, raw.test_y]), torch.stack([rows[f] for f in files]))  # each file keeps its labels
    again = load_dataset(_ml(tmp_path / Path(raw.source).name, test_fraction=0.3))
    assert again.test_x.paths == raw.test_x.paths  # type: ignore[union-attr]  # the held-out test split is fixed


def test_a_label_sep_other_than_semicolon_and_labels_as_one_json_string(tmp_path: Path) -> None:
    _images(tmp_path)
    raw = load_dataset(_ml(_write_sep_csv(tmp_path, split=True, sep="|"), label_sep="|"))
    assert torch.equal(raw.train_y, _expected("train"))
    lines = [json.dumps({"path": f, "labels": "|".join(labels), "split": s}) for f, labels, s in ROWS]
    (tmp_path / "s.jsonl").write_text("\n".join(lines))
    assert torch.equal(load_dataset(_ml(tmp_path / "s.jsonl", label_sep="|")).test_y, _expected("test"))


def test_classes_txt_orders_the_classes_and_refuses_an_unknown_label(tmp_path: Path) -> None:
    _images(tmp_path)
    _write_sep_csv(tmp_path, split=True)
    order = ["fox", "dog", "cat", "owl"]
    (tmp_path / "classes.txt").write_text("\n".join(order) + "\n")
    raw = load_dataset(_ml(tmp_path / "labels.csv"))
    assert raw.class_names == order and torch.equal(raw.train_y, _expected("train", order))
    text = (tmp_path / "labels.csv").read_text().replace("img/3.png,fox", "img/3.png,foxx")
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DatasetError, match=r"labels.csv:5: unknown label 'foxx' \(did you mean 'fox'\?\): not in .*classes.txt"):
        load_dataset(_ml(tmp_path / "labels.csv"))


def test_bad_rows_are_listed_with_file_line_and_key(tmp_path: Path) -> None:
    _images(tmp_path)
    (tmp_path / "flags.csv").write_text("path,cat,dog\nimg/0.png,1,0\nimg/1.png,1,2\nimg/2.png,1\nimg/3.png,0,yes\n")
    with pytest.raises(DatasetError) as info:
        load_dataset(_ml(tmp_path / "flags.csv"))
    message = str(info.value)
    assert "flags.csv:3: column 'dog': '2' is not 0 or 1" in message and "flags.csv:5: column 'dog': 'yes' is not 0 or 1" in message
    assert "flags.csv:4: expected 3 columns, found 2" in message
    good = json.dumps({"path": "img/0.png", "labels": ["cat"]})
    (tmp_path / "l.jsonl").write_text("\n".join([good, "{not json", json.dumps({"path": "img/1.png", "labels": [1.5]}),
                                                 json.dumps({"labels": ["cat"]}), json.dumps(["img/2.png"])]))
    with pytest.raises(DatasetError) as info:
        load_dataset(_ml(tmp_path / "l.jsonl"))
    message = str(info.value)
    assert "l.jsonl:2: not valid JSON" in message and "l.jsonl:3: key 'labels' must be a list of class names, found [1.5]" in message
    assert "l.jsonl:4: key 'path' must be a string, found None" in message and "l.jsonl:5: expected a JSON object" in message


def test_a_task_mismatch_is_an_error_naming_data_task(tmp_path: Path) -> None:
    _images(tmp_path)
    for path in (_write_sep_csv(tmp_path, split=True), _write_jsonl(tmp_path, split=True)):
        with pytest.raises(DatasetError, match="set data.task: multilabel"):
            load_dataset(DataConfig(dataset="folder", root=str(path)))
    with pytest.raises(DatasetError, match="one 0/1 column per class is a multi-label list: set data.task: multilabel"):
        load_dataset(DataConfig(dataset="folder", root=str(_write_flag_csv(tmp_path, split=True))))
    with pytest.raises(DatasetError, match="data.task: multilabel, but dataset 'digits' has one label per image"):
        load_dataset(DataConfig(dataset="digits", task="multilabel"))
    png(tmp_path / "tree" / "a" / "0.png")
    with pytest.raises(DatasetError, match="class folders give one label per image, but data.task is multilabel"):
        load_dataset(_ml(tmp_path / "tree"))
    cfg = from_dict(ExperimentConfig, {"name": "m", "data": {"dataset": "digits_mosaic"},
                                        "model": {"backbone": "transferlab_cnn", "weights": "scratch"}})
    with pytest.raises(ConfigError, match=r"experiment 'm': dataset 'digits_mosaic' is multi-label .*set data.task: multilabel"):
        cfg.validate()


def test_a_single_label_csv_read_as_multilabel_splits_its_label_column(tmp_path: Path) -> None:
    _images(tmp_path)
    (tmp_path / "one.csv").write_text("path,label\n" + "".join(f"{f},{';'.join(labels)}\n" for f, labels, _ in ROWS))
    raw = load_dataset(_ml(tmp_path / "one.csv", test_fraction=0.3))
    assert raw.class_names == CLASSES and raw.train_y.shape[1] == 3


# --------------------------------------------------------------------------------------------
# iterative stratification


def _random_labels(n: int, k: int, seed: int) -> np.ndarray:
    """Correlated multi-hot labels with shares from rare (~2 %) to common (~45 %)."""
    rng = np.random.default_rng(seed)
    shares = np.linspace(0.02, 0.45, k)
    y = rng.random((n, k)) < shares
    y[:, 1] |= y[:, 0] & (rng.random(n) < 0.5)  # label 1 often comes with label 0
    return y.astype(np.float32)


def _share_deviation(y: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per label: how many images the part has away from its share (part size / all) of the label's positives."""
    return np.abs(y[positions].sum(0) - y.sum(0) * len(positions) / len(y))


ONE_IMAGE = 1.0
"""The tolerance: a part's share of a label is fractional (2.7 images), so rounding alone may cost up to one image."""


def test_iterative_take_keeps_every_label_share_and_the_exact_size() -> None:
    y = _random_labels(2000, 8, seed=0)
    n = 500
    taken = iterative_take(y, n, seed=3)
    assert len(taken) == n and len(np.unique(taken)) == n
    assert (_share_deviation(y, taken) <= ONE_IMAGE).all(), _share_deviation(y, taken)
    rng = np.random.default_rng(3)
    random_subsets = [_share_deviation(y, rng.choice(len(y), n, replace=False)) for _ in range(5)]
    assert all((d > ONE_IMAGE).any() for d in random_subsets)  # the tolerance is one a random subset does not meet
    assert np.array_equal(taken, iterative_take(y, n, seed=3)) and not np.array_equal(taken, iterative_take(y, n, seed=4))


def test_iterative_split_places_unlabelled_images_and_respects_sizes() -> None:
    y = _random_labels(300, 4, seed=1)
    y[:40] = 0  # images without a label fill the room left
    part = iterative_split(y, [200, 60, 40], seed=0)
    assert np.bincount(part, minlength=3).tolist() == [200, 60, 40]
    assert all((_share_deviation(y, np.flatnonzero(part == j)) <= ONE_IMAGE).all() for j in range(3))
    with pytest.raises(ValueError, match="must be >= 0 and add up to the 300 images"):
        iterative_split(y, [200, 50], seed=0)


def test_iterative_folds_cover_every_image_once_with_label_shares_kept() -> None:
    y = _random_labels(1003, 6, seed=2)
    folds = iterative_folds(y, 5, seed=0)
    together = np.concatenate(folds)
    assert sorted(together.tolist()) == list(range(len(y)))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert all((_share_deviation(y, f) <= ONE_IMAGE).all() for f in folds)
    assert all(np.array_equal(a, b) for a, b in zip(folds, fold_test_positions(y, 5, seed=0), strict=True))


def test_more_folds_than_a_label_has_images_is_an_error_naming_the_key() -> None:
    y = np.zeros((100, 3), dtype=np.float32)
    y[:50, 0], y[50:, 1], y[:3, 2] = 1, 1, 1  # c, the rarest class, has 3 images
    with pytest.raises(DatasetError, match=r"data.folds=4 but class 'c' has only 3 images"):
        fold_test_positions(y, 4, seed=0, names=["a", "b", "c"])


# --------------------------------------------------------------------------------------------
# selections on the synthetic multi-label dataset


def _synthetic(**kw: object) -> DataConfig:
    return DataConfig(dataset="synthetic", task="multilabel", synthetic_classes=5, synthetic_size=400, **kw)  # type: ignore[arg-type]


def test_synthetic_multilabel_images_show_the_squares_of_their_classes() -> None:
    raw = load_dataset(_synthetic())
    labels_per_image = raw.train_y.sum(1)
    assert raw.train_y.dtype == torch.float32 and labels_per_image.min() >= 1 and labels_per_image.max() <= 3
    for c in range(5):
        r, col = divmod(c, 4)
        bright = (raw.train_x[:, 0, 2 + 3 * r : 5 + 3 * r, 2 + 3 * col : 5 + 3 * col] == 230).all(dim=(1, 2))
        assert torch.equal(bright, raw.train_y[:, c] > 0)  # the class's square is there exactly when it has the class


def test_prepare_splits_keeps_the_rows_and_records_the_selection() -> None:
    cfg = _synthetic(train_subset=300, test_subset=0.5, val_fraction=0.2)
    raw = load_dataset(cfg)
    s = prepare_splits(cfg, seed=1, raw=raw)
    assert s.multilabel and s.train_y.dtype == torch.float32
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (240, 60, 100)
    for split, source in (("train", raw.train_y), ("val", raw.train_y), ("test", raw.test_y)):
        assert torch.equal(getattr(s, f"{split}_y"), source[s.indices[split]])  # the selected rows, unchanged
    assert not set(s.indices["train"]) & set(s.indices["val"])
    rec = s.selection_record()
    assert rec["task"] == "multilabel" and rec["multilabel"]["positives"]["train"] == s.train_y.sum(0).int().tolist()
    assert prepare_splits(cfg, seed=1, raw=raw).indices == s.indices  # seeded
    pool = torch.cat([s.train_y, s.val_y]).numpy()  # the validation hold-out keeps every label's share of the pool
    assert (_share_deviation(pool, np.arange(len(s.train_y), len(pool))) <= ONE_IMAGE).all()


def test_data_classes_keeps_those_columns_and_drops_images_left_without_a_label() -> None:
    cfg = _synthetic(classes=["class_3", 1])
    raw = load_dataset(cfg)
    s = prepare_splits(cfg, seed=0, raw=raw)
    assert s.class_names == ["class_3", "class_1"] and s.train_y.shape[1] == 2
    kept = raw.train_y[:, [3, 1]]
    in_task = np.flatnonzero(kept.sum(1).numpy() > 0)
    assert sorted(s.indices["train"] + s.indices["val"]) == in_task.tolist()  # every image with class_3 or class_1, no other
    assert torch.equal(s.train_y, kept[s.indices["train"]])


def test_k_per_class_and_the_balanced_sampler_refuse_multilabel() -> None:
    with pytest.raises(DatasetError, match="data.k_per_class=5 has no meaning with data.task: multilabel"):
        prepare_splits(_synthetic(k_per_class=5), seed=0)
    with pytest.raises(ValueError, match="balanced .* not with data.task: multilabel"):
        balanced_order(torch.zeros(4, 3), torch.Generator())


def test_a_class_without_training_images_is_an_error_naming_it() -> None:
    raw = load_dataset(_synthetic())
    raw.train_y[:, 4] = 0  # class_4 only in the test split
    with pytest.raises(DatasetError, match=r"class\(es\) \['class_4'\] have no image in the training split"):
        prepare_splits(_synthetic(), seed=0, raw=raw)


def test_folds_of_multilabel_data_pool_train_and_test() -> None:
    tests = []
    for k in range(3):
        s = prepare_splits(_synthetic(folds=3, fold=k), seed=0)
        assert s.multilabel and not set(s.indices["test"]) & set(s.indices["train"] + s.indices["val"])
        tests.append(s.indices["test"])
    pooled = 400 + 200
    assert sorted(sum(tests, [])) == list(range(pooled))
    raw = load_dataset(_synthetic())
    positives = torch.cat([raw.train_y, raw.test_y]).sum(0)
    limit = folds_limit(_synthetic())
    assert limit is not None and limit.largest == int(positives.min()) and limit.n_images == pooled
    assert limit.smallest_class == raw.class_names[int(positives.argmin())]


# --------------------------------------------------------------------------------------------
# mosaics


def test_mosaic_tiles_are_the_source_images_and_labels_their_classes() -> None:
    src = digits(DataConfig(dataset="digits"))
    x, y, sources = make_mosaics(src.train_x, src.train_y, 10, count=50, seed=7)  # type: ignore[arg-type]
    assert x.shape == (50, 1, 16, 16) and y.shape == (50, 10)
    for i in range(50):
        tiles = [x[i, :, :8, :8], x[i, :, :8, 8:], x[i, :, 8:, :8], x[i, :, 8:, 8:]]  # row-major
        for t, j in zip(tiles, sources[i], strict=True):
            assert torch.equal(t, src.train_x[j])  # type: ignore[index]
        assert set(np.flatnonzero(y[i].numpy()).tolist()) == set(src.train_y[sources[i]].tolist())
    again = make_mosaics(src.train_x, src.train_y, 10, count=50, seed=7)  # type: ignore[arg-type]
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


def test_train_mosaics_use_the_train_split_only() -> None:
    marked = RawDataset(torch.full((30, 1, 4, 4), 10, dtype=torch.uint8), torch.arange(30) % 3,
                        torch.full((30, 1, 4, 4), 200, dtype=torch.uint8), torch.arange(30) % 3, ["a", "b", "c"], "marked")
    m = mosaic_dataset(marked, train=40, test=20, name="m")
    assert (m.train_x == 10).all() and (m.test_x == 200).all()  # type: ignore[union-attr]
    assert m.train_y.shape == (40, 3) and m.test_y.shape == (20, 3)


def test_registered_mosaic_datasets_are_deterministic() -> None:
    a = load_dataset(DataConfig(dataset="digits_mosaic", task="multilabel"))
    b = load_dataset(DataConfig(dataset="digits_mosaic", task="multilabel"))
    assert a.train_x.shape == (4000, 1, 16, 16) and a.test_x.shape == (1000, 1, 16, 16)  # type: ignore[union-attr]
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)  # type: ignore[arg-type]
    src = digits(DataConfig(dataset="digits"))
    _, y, _ = make_mosaics(src.test_x, src.test_y, 10, count=1000, seed=1)  # type: ignore[arg-type]
    assert torch.equal(a.test_y, y)  # the documented recipe: test mosaics from the test split, seed 1


def test_fashion_mnist_mosaic_follows_the_recipe() -> None:
    try:
        raw = load_dataset(DataConfig(dataset="fashion_mnist_mosaic", task="multilabel"))
    except DatasetError as e:
        pytest.skip(f"Fashion-MNIST is not here: {e}")
    assert raw.train_x.shape == (20_000, 1, 56, 56) and raw.test_y.shape == (4_000, 10)  # type: ignore[union-attr]
    src = load_dataset(DataConfig(dataset="fashion_mnist"))
    x, y, _ = make_mosaics(src.train_x, src.train_y, 10, count=20_000, seed=0)  # type: ignore[arg-type]
    assert torch.equal(raw.train_x, x) and torch.equal(raw.train_y, y)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# check-data


def test_check_data_lists_no_label_images_absent_classes_and_unknown_labels(tmp_path: Path) -> None:
    _images(tmp_path)
    _write_sep_csv(tmp_path, split=True)
    (report,) = check_path(tmp_path / "labels.csv")  # the header says multi-label
    assert [p.path for p in report.problems if p.kind == "no_label"] == [str(tmp_path / "img" / "4.png")]
    absent = [p.message for p in report.problems if p.kind == "absent_class" and p.severity == "warning"]
    assert any("['fox']" in m and "test split" in m for m in absent)
    assert report.ok  # warnings only
    (tmp_path / "classes.txt").write_text("cat\ndog\nfox\nowl\n")
    (report,) = check_path(tmp_path / "labels.csv")
    assert not report.ok
    owl = [p for p in report.problems if p.kind == "absent_class" and p.severity == "error"]
    assert len(owl) == 1 and "['owl']" in owl[0].message and "train split" in owl[0].message
    (tmp_path / "labels.csv").write_text((tmp_path / "labels.csv").read_text().replace("cat;dog,test", "cat;dgo,test"))
    (report,) = check_path(tmp_path / "labels.csv")
    assert any(p.kind == "unknown_label" and "labels.csv:10" in p.path and "'dgo'" in p.message for p in report.problems)
    assert cli_main(["check-data", str(tmp_path / "labels.csv")]) == 1


def test_check_data_of_a_multilabel_array_dataset(capsys: pytest.CaptureFixture[str]) -> None:
    (report,) = check_path("digits_mosaic")
    assert report.n_classes == 10 and report.split_sizes == {"train": 4000, "test": 1000}
    assert not [p for p in report.problems if p.kind in ("no_label", "absent_class")]
    assert cli_main(["check-data", "synthetic", "--task", "multilabel"]) == 0


# --------------------------------------------------------------------------------------------
# batches carry the N×K targets unchanged


def _index_marked_splits(n: int) -> ImageSplits:
    """Splits whose image i has pixel value i, so a batch tells which rows it holds."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    y = torch.from_numpy(_random_labels(n, 5, seed=4))
    return ImageSplits(x, y, x[:0], y[:0], x[:0], y[:0], [f"c{i}" for i in range(5)], "marked")


@pytest.mark.parametrize("in_memory", [True, False])
def test_batches_targets_are_the_selected_rows(in_memory: bool) -> None:
    s = _index_marked_splits(100)
    s.in_memory = in_memory
    identity = Preprocess(mean=(0.0,), std=(1 / 255,), in_chans=1)
    batches = make_batches(s, "train", 16, identity, shuffle=True, seed=3, channels_last=False, num_workers=0)
    seen = []
    for xb, yb in batches:
        rows = xb[:, 0, 0, 0].round().long()
        assert yb.dtype == torch.float32 and torch.equal(yb, s.train_y[rows])
        seen += rows.tolist()
    assert sorted(seen) == list(range(100)) and seen != list(range(100))  # every row once, shuffled


def test_batches_of_a_multilabel_list_on_the_pil_path(tmp_path: Path) -> None:
    _images(tmp_path)
    cfg = _ml(_write_jsonl(tmp_path, split=True), in_memory=False, val_count=2)
    s = prepare_splits(cfg, seed=0)
    assert not s.in_memory and s.multilabel
    identity = Preprocess(mean=(0.0,), std=(1 / 255,), in_chans=1)
    every = _expected(None)
    for xb, yb in make_batches(s, "train", 3, identity, shuffle=True, seed=1, channels_last=False, num_workers=0):
        rows = (xb[:, 0, 0, 0] / 20).round().long()  # the fixture's pixel value is 20 * row
        assert torch.equal(yb, every[rows])


def test_cli_check_data_prints_the_findings(tmp_path: Path) -> None:
    _images(tmp_path)
    _write_flag_csv(tmp_path, split=True)
    console = Console(record=True, width=200)

    class Args:
        target, root, no_decode, task, label_sep = str(tmp_path / "flags.csv"), None, True, "multilabel", ";"

    assert check_data_command(Args(), console) == 0  # type: ignore[arg-type]
    text = console.export_text()
    assert "no_label" in text and "absent_class" in text
