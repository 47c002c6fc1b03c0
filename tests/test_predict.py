"""Predictions on image files from outside any dataset, and the test predictions a run records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import transferlab
from report_fixtures import synthetic_class_image, tiny_study_dir
from transferlab.cli import main
from transferlab.rundir import load_test_predictions
from transferlab.tools.predict import PredictError, collect_image_files, predict


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory) -> Path:
    return tiny_study_dir(tmp_path_factory.mktemp("report_study"))


@pytest.fixture(scope="module")
def run_dir(study_dir) -> Path:
    return study_dir / "scratch.seed0"


def test_recorded_test_predictions_agree_with_the_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    preds = load_test_predictions(run_dir)
    assert preds is not None and len(preds.true) == metrics["n_test"]
    assert (preds.true == preds.pred).mean() == pytest.approx(metrics["test_acc"])
    cm = np.zeros((4, 4), dtype=int)
    np.add.at(cm, (preds.true, preds.pred), 1)
    assert cm.tolist() == metrics["confusion_matrix"]
    assert np.all((preds.prob >= preds.true_prob - 1e-6) & (preds.prob <= 1))
    # the sample images are the run's own test images, at the training size
    assert preds.images is not None and preds.images.shape[1:] == (3, metrics["image_size"], metrics["image_size"])
    assert len(preds.positions) == len(preds.images) >= 32
    selection = json.loads((run_dir / "selection.json").read_text())
    assert len(selection["test"]) == len(preds.true)


def test_predict_reproduces_the_recorded_prediction_of_a_test_image_saved_as_a_file(run_dir, tmp_path):
    """The same pixels through predict (file -> decode -> run's preprocessing) give the same probabilities."""
    preds = load_test_predictions(run_dir)
    files = []
    for k in range(4):
        path = tmp_path / f"test_{k}.png"
        Image.fromarray(preds.images[k].permute(1, 2, 0).numpy()).save(path)
        files.append(path)
    out = predict(run_dir, files, top_k=4)
    for k, p in enumerate(out):
        pos = preds.positions[k]
        name, index, prob = p.top[0]
        assert index == preds.pred[pos] and prob == pytest.approx(preds.prob[pos], abs=1e-4)
        assert sum(q for _, _, q in p.top) == pytest.approx(1.0, abs=1e-4)  # k = all 4 classes
        assert [q for _, _, q in p.top] == sorted([q for _, _, q in p.top], reverse=True)


def _save_modes(img: np.ndarray, folder: Path) -> list[Path]:
    """One image of the class in many formats and modes, larger than the training size."""
    rgb = Image.fromarray(img)
    paths = {
        "rgb.jpg": rgb,
        "rgba.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "palette.gif": rgb.convert("P", palette=Image.Palette.ADAPTIVE),
        "gray.webp": rgb.convert("L"),
        "gray_alpha.png": rgb.convert("LA"),
        "gray16.png": Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257),
        "bits.bmp": rgb.convert("L").point(lambda v: 255 if v > 128 else 0).convert("1"),
        "wide.tif": rgb.resize((img.shape[1] * 5 // 4, img.shape[0])),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, im in paths.items():
        im.save(folder / name)
    return [folder / name for name in paths]


def test_predict_any_image_mode_and_size_outside_the_dataset(run_dir, tmp_path):
    files = _save_modes(synthetic_class_image(2, scale=4, seed=7), tmp_path / "outside")
    assert Image.open(files[2]).mode == "CMYK" and Image.open(files[6]).mode.startswith("I")
    out = predict(transferlab.load_run(run_dir), [tmp_path / "outside"], top_k=2)
    assert sorted(p.file for p in out) == sorted(map(str, files))
    for p in out:
        assert p.error is None, p
        assert p.top[0][:2] == ("class_2", 2), p  # the square's position decides the class


def test_predict_cli_table_json_and_bad_files(run_dir, tmp_path, capsys):
    good = tmp_path / "cls1.png"
    Image.fromarray(synthetic_class_image(1, scale=2, seed=3)).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out_json = tmp_path / "pred.json"
    assert main(["predict", str(run_dir), str(good), str(bad), "--top-k", "3", "--json", str(out_json)]) == 1  # one bad file
    text = capsys.readouterr().out
    assert "class_1" in text and "broken.jpg" in text and "error" in text
    doc = json.loads(out_json.read_text())
    assert doc["input"] == {"channels": 3, "image_size": 16, "resize": "crop", "crop_pct": 1.0}
    assert doc["class_names"] == [f"class_{i}" for i in range(4)]
    first, second = doc["images"]
    assert first["file"] == str(good) and len(first["predictions"]) == 3
    assert first["predictions"][0]["class"] == "class_1" and first["predictions"][0]["index"] == 1
    assert "error" in second and "predictions" not in second

    assert main(["predict", str(run_dir), str(good), "--json", "-"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"][0]["predictions"][0]["class"] == "class_1" and len(printed["images"][0]["predictions"]) == 4


def test_predict_errors_name_the_path(study_dir, tmp_path):
    with pytest.raises(PredictError, match="no such file or folder"):
        collect_image_files([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(PredictError, match="holds no image files"):
        collect_image_files([tmp_path / "empty"])
    img = tmp_path / "x.png"
    Image.fromarray(synthetic_class_image(0)).save(img)
    with pytest.raises(PredictError, match="did not finish.*failed"):
        predict(study_dir / "broken", [img])
