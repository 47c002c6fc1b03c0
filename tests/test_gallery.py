"""The gallery of study files (``studies/*.yaml``, the packaged demo): every file parses, every model builds and runs.

For each file: ``load_study`` (every key, value and outside image checked), then every experiment's model
is built with random weights (``imagenet`` / ``embedded`` / ``run:`` / ``file:`` sources patched to
``scratch``, so nothing is downloaded or needed from an earlier run), its strategy applied, and one image
at the study's input size (the dataset's native size when ``data.image_size`` is null) goes through it;
``activations.layers`` must name modules with feature-map outputs. Consecutive experiments of the same shape share one build.
The seed reports' exact forms are checked too (seed 001's Keras layer-100 cut, seed 003's VGG on pooled
conv features, seed 004's frozen children), and every row of the seed reports' experiment list is named
in a ``notes:`` field.

Then the ``predict:`` / ``activations:`` sections of a study experiment: a tiny digits run through the CLI
writes its outside-image results into the run directory and the report, and they agree with
``transferlab predict`` on the finished run; bad values are errors naming the key before anything trains.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import transferlab
from transferlab.cli import main
from transferlab.config import ConfigError, ExperimentConfig, from_dict, load_study, parse_study, resolve_paths
from transferlab.models.model import build_model
from transferlab.strategies import apply_strategy
from transferlab.tools.inspect import ACTIVATIONS_DIR, ACTIVATIONS_FILE, OUTSIDE_CSV, OUTSIDE_JSON, OUTSIDE_PNG, capture_activations
from transferlab.tools.predict import predict

REPO = Path(__file__).resolve().parents[1]
GALLERY = sorted((REPO / "studies").glob("*.yaml")) + [REPO / "src" / "transferlab" / "studies" / "demo.yaml"]

NATIVE = {"cifar10": (32, 10), "cifar100": (32, 100), "cifar100_coarse": (32, 20), "tiny_imagenet": (64, 200),
          "fashion_mnist": (28, 10), "mnist": (28, 10), "digits": (8, 10), "fashion_mnist_mosaic": (56, 10)}
"""Native image side and class count of the datasets the gallery uses (nothing is loaded)."""

ROWS = ["0a", "0b", "0c", "0d", "0e", "0f", "0g", "0h", "1a", "1b", "1c", "2a", "2b", "2c", "3a", "3b", "3c",
        "4a", "4b", "4c", "4d", "4e"]
"""The rows of ../shared/seeds/EXPERIMENTS.md (the seed reports' experiments)."""


def load_gallery(path: Path, monkeypatch: pytest.MonkeyPatch):
    # outside images are named relative to the study file
    monkeypatch.chdir(path.parent)
    return load_study(path.name)


def _experiments(path: Path) -> list[str]:
    """Names of the file's experiments that build a model (collection time; a file that does not parse gives
    one case, whose test then fails on it)."""
    cwd = os.getcwd()
    try:
        os.chdir(path.parent)
        names = [c.name for c in load_study(path.name).experiments if c.kind != "ensemble"]
    except Exception:  # noqa: BLE001 - reported by the test itself
        names = ["?"]
    finally:
        os.chdir(cwd)
    return list(dict.fromkeys(names))


CASES = [(path, name) for path in GALLERY for name in _experiments(path)]


def random_weights(cfg: ExperimentConfig) -> ExperimentConfig:
    cfg = copy.deepcopy(cfg)
    cfg.model.weights = "scratch"  # imagenet / embedded / run: / file: / hf: -> the same architecture, random
    cfg.model.keep_head = False
    return cfg


def input_spec(cfg: ExperimentConfig) -> tuple[int, int]:
    """(image side, classes) of the experiment, without loading its dataset."""
    side, classes = NATIVE[cfg.data.dataset]
    return cfg.data.image_size or side, len(cfg.data.classes) if cfg.data.classes else classes


_built: dict[str, torch.nn.Module] = {}


def build(cfg: ExperimentConfig) -> torch.nn.Module:
    """The experiment's model with random weights and its strategy applied (cached by its shape)."""
    cfg = random_weights(cfg)
    _, classes = input_spec(cfg)
    key = repr((cfg.model, cfg.head, classes))
    if key not in _built:
        torch.manual_seed(0)
        _built.clear()  # keep one model in memory: VGG-19 alone is ~80 M parameters after the cut
        _built[key] = build_model(cfg.model, cfg.head, classes)[0].eval()
    model = _built[key]
    apply_strategy(model, cfg.strategy)
    return model


@pytest.mark.parametrize(("path", "name"), CASES, ids=[f"{p.stem}:{n}" for p, n in CASES])
def test_every_gallery_model_builds_and_runs_at_its_input_size(path, name, monkeypatch):
    study = load_gallery(path, monkeypatch)
    cfg = next(c for c in study.experiments if c.name == name)
    model = build(cfg)
    side, classes = input_spec(cfg)
    x = torch.randn(1, model.preprocess().in_chans, side, side)
    with torch.inference_mode():
        out = model(x)
    assert out.shape == (1, classes) and torch.isfinite(out).all()
    if cfg.activations.layers:
        acts = capture_activations(model, x, cfg.activations.layers)  # a wrong name or a non-map output raises
        assert all(a.dim() == 4 for a in acts.values())
    if check := EXACT_FORMS.get((path.stem, name)):
        check(model, cfg)


@pytest.mark.parametrize("path", GALLERY, ids=lambda p: p.name)
def test_gallery_outside_images_exist_relative_to_the_study_file(path, monkeypatch):
    study = load_gallery(path, monkeypatch)
    for cfg in study.experiments:
        for f in cfg.predict.images + cfg.activations.images:
            assert (path.parent / f).is_file(), (cfg.name, f)  # relative to the file (or made absolute from it)


def test_every_seed_report_row_is_named_in_a_notes_field(monkeypatch):
    named = set()
    for path in GALLERY:
        study = load_gallery(path, monkeypatch)
        notes = [c.notes for c in study.experiments] + [e.notes for e in study.ensembles]
        for note in notes:
            for first, last in re.findall(r"\brows? (\d[a-h])(?:\s*-\s*(\d[a-h]))?", note):
                named |= {first} if not last else {f"{first[0]}{chr(c)}" for c in range(ord(first[1]), ord(last[1]) + 1)}
    assert sorted(set(ROWS) - named) == []


# The seed reports' exact forms, checked on the model the test above builds (each is built once).


def seed001_keras_layer_100_cut(model: torch.nn.Module, cfg: ExperimentConfig) -> None:
    """Keras ResNet50 layers[:100] end at conv4_block2_3_conv = timm layer3.1.conv3; its BN (layer 100) trains."""
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert frozen[-1] == "layer3.1.conv3.weight" and trainable[0] == "layer3.1.bn3.weight"
    assert all(n.startswith(("conv1", "bn1", "layer1", "layer2", "layer3.0", "layer3.1.")) for n in frozen)
    assert "backbone.layer3.1.bn3" not in model.frozen_bn and "backbone.layer3.1.bn2" in model.frozen_bn
    assert cfg.train.optimizer == "sgd" and cfg.train.momentum == 0 and cfg.train.early_stopping.monitor == "val_loss"


def seed003_vgg_on_pooled_conv_features(model: torch.nn.Module, cfg: ExperimentConfig) -> None:
    """VGG's frozen conv body, global average pooling, the MLP on 512 features: no fc6 / fc7 left."""
    assert model.num_features == 512 and model.head[0].in_features == 512 and model.head[0].out_features == 128
    assert sum(p.numel() for p in model.backbone.parameters()) == sum(p.numel() for p in model.backbone.features.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters()) and all(p.requires_grad for p in model.head.parameters())
    assert cfg.train.epochs == 5 and cfg.head.dropout == 0.2 and len(cfg.predict.images) == 2


def seed004_first_children_frozen(frozen_children: list[str]):
    """The report's ``count < N`` loop over named_children: exactly these children frozen."""

    def check(model: torch.nn.Module, cfg: ExperimentConfig) -> None:
        for child, module in model.backbone.named_children():
            params = list(module.parameters())
            if params:
                assert all(not p.requires_grad for p in params) == (child in frozen_children), child
        assert cfg.data.val_count == 10000 and cfg.train.schedule == "cosine"

    return check


STEM = ["conv1", "bn1", "act1", "maxpool"]
EXACT_FORMS = {
    ("seed001_cifar10_resnet50_custom_cnn", "resnet50_from_layer100"): seed001_keras_layer_100_cut,
    ("seed003_cifar10_frozen_backbones", "vgg16"): seed003_vgg_on_pooled_conv_features,
    ("seed003_cifar10_frozen_backbones", "vgg19"): seed003_vgg_on_pooled_conv_features,
    ("seed004_cifar10_resnet18_freezing", "resnet18_frozen6"): seed004_first_children_frozen(STEM + ["layer1"]),
    ("seed004_cifar10_resnet18_freezing", "resnet18_frozen10"): seed004_first_children_frozen(STEM + ["layer1", "layer2", "layer3", "layer4"]),
}


def test_every_exact_form_check_has_its_experiment():
    assert set(EXACT_FORMS) <= {(p.stem, n) for p, n in CASES}


# --------------------------------------------------------------------------------------------
# predict: and activations: sections


def _photo(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)
    return path


STUDY = {
    "study": "outside",
    "defaults": {
        # resize: pad — the 20×30 photos are brought to size as the run's data.resize says, in the section and the tool
        "data": {"dataset": "digits", "image_size": 16, "val_fraction": 0.2, "resize": "pad"},
        "model": {"backbone": "transferlab_cnn"},
        "train": {"epochs": 1, "batch_size": 64, "progress": False, "accelerator": "cpu"},
    },
    "experiments": [{
        "name": "cnn",
        "predict": {"images": ["photos"], "top_k": 3},
        "activations": {"images": ["photos/a.png"], "layers": ["backbone.blocks.0", "backbone.blocks.1"], "max_maps": 4},
    }],
}


@pytest.fixture(scope="module")
def outside_study(tmp_path_factory) -> Path:
    """A study file whose experiment names a folder and a file of photos relative to itself, run through the CLI."""
    root = tmp_path_factory.mktemp("outside")
    (root / "photos").mkdir()
    _photo(root / "photos" / "a.png", 0)
    _photo(root / "photos" / "b.jpg", 1)
    (root / "study.yaml").write_text(yaml.safe_dump(STUDY))
    mp = pytest.MonkeyPatch()
    mp.chdir(root)  # relative paths start at the study file's folder
    try:
        assert main(["run", "study.yaml", "--runs-dir", str(root / "runs")]) == 0
    finally:
        mp.undo()
    return root


def test_predict_section_writes_what_transferlab_predict_says(outside_study):
    run = outside_study / "runs" / "outside" / "cnn"
    doc = json.loads((run / OUTSIDE_JSON).read_text())
    assert [Path(i["file"]).name for i in doc["images"]] == ["a.png", "b.jpg"]  # the folder, searched and sorted
    assert doc["input"] == {"channels": 1, "image_size": 16} and doc["top_k"] == 3
    again = predict(run, [outside_study / "photos"], top_k=3)  # the finished run, through the tool (data.resize: pad)
    from transferlab.tools.inspect import load_images

    files = [outside_study / "photos" / n for n in ("a.png", "b.jpg")]
    assert not torch.equal(load_images(files, 1, 16, "pad")[0], load_images(files, 1, 16, "crop")[0])  # it matters here
    for item, p in zip(doc["images"], again, strict=True):
        assert [q["index"] for q in item["predictions"]] == [i for _, i, _ in p.top]
        assert [q["prob"] for q in item["predictions"]] == pytest.approx([q for _, _, q in p.top], abs=1e-5)
    rows = (run / OUTSIDE_CSV).read_text().splitlines()
    assert rows[0].startswith("file,rank,class") and len(rows) == 1 + 2 * 3
    assert (run / OUTSIDE_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["predict"] == {"images": 2, "errors": 0, "file": OUTSIDE_JSON}


def test_activations_section_writes_one_png_per_image(outside_study):
    run = outside_study / "runs" / "outside" / "cnn"
    listing = json.loads((run / ACTIVATIONS_DIR / ACTIVATIONS_FILE).read_text())
    (entry,) = listing["images"]
    assert entry["png"] == "a.png" and entry["layers"] == ["backbone.blocks.0", "backbone.blocks.1"]
    assert entry["shapes"]["backbone.blocks.0"] == [1, 32, 8, 8]  # 16 px in, one max-pool
    assert (run / ACTIVATIONS_DIR / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "metrics.json").read_text())["activations"]["images"] == 1


def test_the_report_shows_the_outside_images(outside_study):
    html = (outside_study / "runs" / "outside" / "report.html").read_text()
    assert 'id="outside"' in html and "Predictions on outside images" in html
    assert "b.jpg" in html and "Activation maps" in html and "backbone.blocks.1" in html
    md = (outside_study / "runs" / "outside" / "report.md").read_text()
    table = md.split("## Predictions on outside images", 1)[1].split("\n\n", 2)[1].splitlines()
    assert table[0] == "| image | cnn |" and table[2].startswith("| a.png | ") and len(table) == 4


def _raw(**experiment) -> dict:
    raw = copy.deepcopy(STUDY)
    raw["experiments"] = [{"name": "cnn", **experiment}]
    return raw


def test_missing_or_unreadable_outside_images_fail_at_parse_time_naming_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"experiment 'cnn': predict\.images\[0\]='.*nothere\.png': no such file or folder"):
        parse_study(_raw(predict={"images": [str(tmp_path / "nothere.png")]}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"activations\.images\[0\]=.*empty': folder holds no image files"):
        parse_study(_raw(activations={"images": [str(tmp_path / "empty")]}))
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(ConfigError, match=r"predict\.images\[0\]: .*fake\.png: not an image file"):
        parse_study(_raw(predict={"images": [str(tmp_path / "fake.png")]}))


@pytest.mark.parametrize(("section", "bad", "match"), [
    ("predict", {"top_k": 0}, r"predict\.top_k=0 must be >= 1"),
    ("activations", {"max_maps": 0}, r"activations\.max_maps=0 must be >= 1"),
    ("activations", {"layers": []}, r"activations\.layers=\[\] must list at least one layer"),
    ("activations", {"layers": [" "]}, r"activations\.layers\[0\]=' ' must not be empty"),
    ("activations", {"gradcam_layer": ""}, r"activations\.gradcam_layer='' must name a layer"),
    ("predict", {"imgs": ["a.png"]}, r"unknown key 'experiments\[0\]\.predict\.imgs' \(did you mean 'images'\?\)"),
])
def test_bad_section_values_name_the_key(section, bad, match):
    with pytest.raises(ConfigError, match=match):
        parse_study(_raw(**{section: bad}))


def test_outside_images_are_for_kind_train_only(tmp_path):
    photo = str(_photo(tmp_path / "a.png", 0))
    with pytest.raises(ConfigError, match=r"predict\.images=.* applies to kind: train only \(this experiment is kind: knn\)"):
        parse_study(_raw(kind="knn", predict={"images": [photo]}))


@pytest.mark.parametrize(("section", "match"), [
    ({"layers": ["backbone.block.0"]}, r"activations\.layers\[0\]: no layer named 'backbone\.block\.0'.*did you mean 'backbone\.blocks\.0'"),
    ({"gradcam": True, "gradcam_layer": "backbone.blocks.9"}, r"activations\.gradcam_layer: no layer named 'backbone\.blocks\.9'"),
])
def test_a_wrong_layer_name_stops_the_run_before_training(tmp_path, section, match):
    photo = str(_photo(tmp_path / "a.png", 0))
    cfg = from_dict(ExperimentConfig, {**STUDY["defaults"], "name": "cnn", "activations": {"images": [photo], **section}})
    cfg.validate()  # layer names need the model: checked when it is built
    with pytest.raises(ConfigError, match=match):
        transferlab.run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "history.csv").exists() and not (tmp_path / "run" / "checkpoints" / "last.safetensors").exists()


def test_resolve_paths_joins_relative_paths_to_the_study_folder(tmp_path):
    cfg = from_dict(ExperimentConfig, {"predict": {"images": ["photos/a.png", "/abs/b.png", "~/c.png"]}, "activations": {"images": ["x"]}})
    resolve_paths(cfg, tmp_path)
    assert cfg.predict.images == [str(tmp_path / "photos" / "a.png"), "/abs/b.png", str(Path("~/c.png").expanduser())]
    assert cfg.activations.images == [str(tmp_path / "x")]


def test_load_study_takes_outside_images_relative_to_the_study_file(outside_study, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    study = load_study(outside_study / "study.yaml")
    assert study.experiments[0].predict.images == [str(outside_study / "photos")]
