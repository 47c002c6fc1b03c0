"""Exports carry the preprocessing (issue 27 §1): a stranger with the file alone gets the run's predictions.

One tiny study: timm's ``test_resnet`` on the synthetic 16 px images with each ``data.resize`` (``crop``
at ``crop_pct`` 0.875, ``pad``, ``stretch``), and the built-in CNN on the grayscale digits at ``crop_pct``
0.875. Raw, non-square RGB files from outside the dataset are classified by the run itself
(``predict <run>``) and by the exported file with preprocessing written *here* from its metadata alone:
ONNX Runtime with PIL + numpy from ``metadata_props``, plain timm from ``config.json``
(``create_transform(**resolve_data_config(...))``), and the built-in CNN's folder in a Python where
transferlab cannot be imported.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import yaml
from PIL import Image

import transferlab
from transferlab.results.export import EXPORT_FORMATS, ExportSpec, export_run, parity_path
from transferlab.results.export.hf import STANDALONE_FILE
from transferlab.rundir import load_run
from transferlab.tools.predict import predict

SYNTH = {"dataset": "synthetic", "synthetic_size": 64, "val_fraction": 0.25}
STUDY = {
    "study": "prep",
    "defaults": {
        "data": SYNTH,
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu", "precision": "32-true"},
    },
    "experiments": [
        {"name": "crop", "model": {"backbone": "test_resnet"}, "data": {"resize": "crop", "crop_pct": 0.875}},
        {"name": "pad", "model": {"backbone": "test_resnet"}, "data": {"resize": "pad"}},
        {"name": "stretch", "model": {"backbone": "test_resnet"}, "data": {"resize": "stretch"}},
        {"name": "cnn_gray", "model": {"backbone": "transferlab_cnn"},
         "data": {"dataset": "digits", "train_subset": 200, "resize": "crop", "crop_pct": 0.875}},
    ],
}
TIMM_RUNS = ["crop", "pad", "stretch"]
SHAPES = [(40, 24), (24, 40), (53, 31), (17, 45)]  # (width, height): landscape, portrait, odd sizes


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep_study")
    path = root / "prep.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    result = transferlab.run_study(path, runs_dir=root / "runs")
    assert sorted(result.finished) == sorted(e["name"] for e in STUDY["experiments"]), result
    return result.runs_dir


@pytest.fixture(scope="module")
def raw_files(tmp_path_factory) -> list[Path]:
    """Non-square RGB files, smooth enough that resizing matters, with a bright block somewhere."""
    folder = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(7)
    out = []
    for i, (w, h) in enumerate(SHAPES):
        small = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
        arr = np.asarray(img).copy()
        arr[h // 4 : h // 2, w // 3 : w // 3 + 6] = 240
        path = folder / f"outside_{i}.png"
        Image.fromarray(arr, "RGB").save(path)
        out.append(path)
    return out


def _run_probs(run_dir: Path, files: list[Path]) -> np.ndarray:
    """The run's own probabilities (``predict <run>``: load_images with the run's resize/crop_pct), class order."""
    n = len(load_run(run_dir).class_names)
    out = np.zeros((len(files), n))
    for i, pred in enumerate(predict(run_dir, files, top_k=n)):
        assert pred.error is None, pred.error
        for _, k, p in pred.top:
            out[i, k] = p
    return out


def _from_metadata(path: Path, meta: dict[str, str]) -> np.ndarray:
    """Preprocessing written from the ONNX metadata_props alone (as a stranger would), PIL + numpy."""
    size, mode, resize, crop_pct = int(meta["image_size"]), meta["image_mode"], meta["resize"], float(meta["crop_pct"])
    assert meta["interpolation"] == "bilinear"
    img = Image.open(path).convert(mode)
    w, h = img.size
    if resize == "stretch":
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    elif resize == "crop":
        short = int(size / crop_pct)
        nw, nh = (int(short * w / h), short) if h <= w else (short, int(short * h / w))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        top, left = round((nh - size) / 2), round((nw - size) / 2)
        img = img.crop((left, top, left + size, top + size))
    else:
        scale = size / max(w, h)
        nw, nh = round(w * scale), round(h * scale)
        canvas = Image.new(mode, (size, size), int(meta["pad_fill"]))
        canvas.paste(img.resize((nw, nh), Image.Resampling.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
        img = canvas
    x = np.asarray(img, dtype=np.float32) / 255
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    x = np.repeat(x, int(meta["in_chans"]) // x.shape[0], axis=0)
    mean, std = np.array(json.loads(meta["mean"]), np.float32), np.array(json.loads(meta["std"]), np.float32)
    return (x - mean[:, None, None]) / std[:, None, None]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("name", [*TIMM_RUNS, "cnn_gray"])
def test_onnx_runtime_with_preprocessing_from_the_metadata_alone_gives_the_runs_predictions(study_dir, raw_files, tmp_path, name):
    run_dir = study_dir / name
    result = export_run(run_dir, "onnx", tmp_path / "model.onnx")
    raw = json.loads(parity_path(result.path).read_text())["raw_files"]
    assert raw["problem"] is None and raw["n"] >= 1 and all(raw["top1_same"]), raw
    assert len({tuple(map(int, s.split("x"))) for s in raw["sizes"]}) == raw["n"] and all(s.split("x")[0] != s.split("x")[1] for s in raw["sizes"])

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    cfg = load_run(run_dir).config.data
    assert (meta["resize"], float(meta["crop_pct"])) == (cfg.resize, cfg.crop_pct)
    assert meta["image_mode"] == ("L" if name == "cnn_gray" else "RGB") and "preprocessing" in meta
    x = np.stack([_from_metadata(f, meta) for f in raw_files]).astype(np.float32)
    theirs = _softmax(session.run(None, {session.get_inputs()[0].name: x})[0])
    ours = _run_probs(run_dir, raw_files)
    np.testing.assert_array_equal(theirs.argmax(1), ours.argmax(1))
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    # and transferlab's own reader of the file (predict model.onnx) preprocesses from the same metadata
    via_file = [p.top[0][1] for p in predict(result.path, raw_files)]
    assert via_file == list(ours.argmax(1))


@pytest.mark.parametrize("name", TIMM_RUNS)
def test_plain_timm_from_config_json_gives_the_runs_predictions(study_dir, raw_files, tmp_path, name):
    run_dir = study_dir / name
    folder = export_run(run_dir, "hf", tmp_path / "hf").path
    cfg = json.loads((folder / "config.json").read_text())
    pre = cfg["pretrained_cfg"]
    expected = {"crop": ("center", 0.875), "pad": ("border", 1.0), "stretch": ("squash", 1.0)}[name]
    assert (pre["crop_mode"], pre["crop_pct"], pre["interpolation"]) == (*expected, "bilinear")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data_cfg = timm.data.resolve_data_config(pretrained_cfg=pre)
    card = (folder / "README.md").read_text()
    if name == "pad":  # timm's border mode pads with the mean colour: the card says so and gives the exact transform
        assert cfg["transferlab"]["timm_transform_exact"] is False and "fill=0" in card and "not exact" in card
        from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio
        from torchvision import transforms as T

        transform = T.Compose([ResizeKeepRatio(16, longest=1.0, interpolation="bilinear"), CenterCropOrPad(16, fill=0),
                               T.ToTensor(), T.Normalize(data_cfg["mean"], data_cfg["std"])])
    else:
        assert cfg["transferlab"]["timm_transform_exact"] is True
        transform = timm.data.create_transform(**data_cfg)
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in raw_files])
    with torch.inference_mode():
        theirs = model(x).softmax(-1).numpy()
    ours = _run_probs(run_dir, raw_files)
    np.testing.assert_array_equal(theirs.argmax(1), ours.argmax(1))
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_builtin_cnn_folder_loads_without_transferlab(study_dir, raw_files, tmp_path):
    run_dir = study_dir / "cnn_gray"
    folder = export_run(run_dir, "hf", tmp_path / "hf").path
    cfg = json.loads((folder / "config.json").read_text())
    card = (folder / "README.md").read_text()
    assert (folder / STANDALONE_FILE).is_file() and cfg["transferlab"]["standalone"]["file"] == STANDALONE_FILE
    assert "library_name: transferlab" in card and "- timm" not in card.split("---")[1]  # not tagged as loadable by timm
    assert f"from {Path(STANDALONE_FILE).stem} import load_model, preprocess" in card
    site = sysconfig.get_paths()["purelib"]
    child = f"""
import sys
sys.path[:] = [p for p in sys.path if "site-packages" not in p] + [{str(folder)!r}, {site!r}]
try:
    import transferlab
except ImportError:
    pass
else:
    raise SystemExit("transferlab is importable here")
import json
from modeling_transferlab_cnn import load_model, preprocess
model, names, config = load_model({str(folder)!r})
import torch
x = torch.stack([preprocess(p, config) for p in {[str(f) for f in raw_files]!r}])
with torch.inference_mode():
    print(json.dumps(model(x).softmax(-1).tolist()))
"""
    # -S: no site (so no editable-install hook that would make transferlab importable), -I: no PYTHONPATH, no cwd
    proc = subprocess.run([sys.executable, "-S", "-I", "-c", child], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-500:]
    theirs = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    ours = _run_probs(run_dir, raw_files)
    np.testing.assert_array_equal(theirs.argmax(1), ours.argmax(1))
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_hf_folder_files_are_0644_and_the_card_states_the_resize_without_python_reprs(study_dir, tmp_path):
    folder = export_run(study_dir / "crop", "hf", tmp_path / "hf").path
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    card = (folder / "README.md").read_text()
    assert "no crop" not in card and "`resize: crop`, crop_pct 0.875" in card and "floor(16 / crop_pct) = 18 px" in card
    assert "None" not in card and "{'" not in card
    assert "test_fraction" not in card and "% of the" in card


def test_every_format_records_the_preprocessing_and_predict_reads_it(study_dir, raw_files, tmp_path):
    run_dir = study_dir / "stretch"
    ours = _run_probs(run_dir, raw_files).argmax(1)
    for fmt in ("torchscript", "exported-program", "safetensors"):
        path = export_run(run_dir, fmt, tmp_path / EXPORT_FORMATS.get(fmt).filename).path
        preds = predict(path, raw_files)
        assert [p.top[0][1] for p in preds] == list(ours), fmt


def test_an_export_without_the_new_fields_reads_as_crop_at_one():
    spec = ExportSpec(class_names=("a",), image_size=8, channels=3, in_chans=3, mean=(0.5,) * 3, std=(0.2,) * 3, resize="pad")
    old = json.loads(spec.to_json())
    for key in ("resize", "crop_pct", "interpolation"):
        del old[key]
    back = ExportSpec.from_json(json.dumps(old), "old.onnx")
    assert (back.resize, back.crop_pct, back.interpolation) == ("crop", 1.0, "bilinear")
    assert back.metadata()["resize"] == "crop" and back.metadata()["crop_pct"] == "1.0"
