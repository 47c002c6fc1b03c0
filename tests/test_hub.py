"""The Hugging Face Hub format: ``export --format hf`` folders, ``weights: hf:``, ``push``, and ``weights: imagenet``
against a hub cache laid out on disk — all without a network.

One tiny study (synthetic 16 px images, timm's ``test_resnet`` and the built-in CNN, one epoch) gives
the runs: a timm backbone with a linear head over two seeds (a plain timm model), a truncated backbone
with an mlp head and the built-in CNN (transferlab layout).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import timm
import torch
import yaml
from huggingface_hub import RepoUrl
from safetensors.torch import load_file, save_file

import transferlab
from transferlab.cli import main
from transferlab.config import TruncateConfig
from transferlab.files import CheckpointError
from transferlab.models import WEIGHT_SOURCES, WeightsError, create_backbone
from transferlab.results.export import EXPORT_FORMATS, export_checkpoint, parity_path
from transferlab.results.export import hf as hub
from transferlab.results.export.hf import PARITY_FILE, HubError, export_hf, load_hf_model, push_hf
from transferlab.rundir import load_run, load_test_predictions

STUDY = {
    "study": "hub",
    "defaults": {
        "data": {"dataset": "synthetic", "synthetic_size": 64, "val_fraction": 0.25},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu"},
    },
    "experiments": [
        {"name": "res_linear", "model": {"backbone": "test_resnet"}, "sweep": {"seed": [0, 1]}},
        {"name": "res_trunc_mlp", "model": {"backbone": "test_resnet", "truncate": {"stages": 2}}, "head": {"type": "mlp", "hidden": 16}},
        {"name": "cnn", "model": {"backbone": "transferlab_cnn"}},
    ],
}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    path = root / "hub.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    result = transferlab.run_study(path, runs_dir=root / "runs")
    assert not result.failed, result
    return result.runs_dir


@pytest.fixture(scope="module")
def exported(study, tmp_path_factory) -> dict[str, Path]:
    """Each run exported once: experiment -> folder."""
    out = tmp_path_factory.mktemp("exports")
    runs = {"res_linear": "res_linear.seed0", "res_trunc_mlp": "res_trunc_mlp", "cnn": "cnn"}
    return {name: export_hf(study / run, out / name).path for name, run in runs.items()}


def _logits(model: torch.nn.Module, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(float input, logits) of ``model`` on the run's recorded test samples, preprocessed as the run did."""
    run = load_run(run_dir)
    x = run.load_model().preprocess()(load_test_predictions(run_dir).images)
    with torch.inference_mode():
        return x, model.eval()(x)


def _hub_cache(hub_dir: Path, repo: str, files: dict[str, bytes], commit: str = "3f" * 20) -> Path:
    """huggingface_hub's cache layout: ``models--owner--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main}``."""
    base = hub_dir / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / commit
    for d in (base / "blobs", snapshot, base / "refs"):
        d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (base / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (base / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub reads it (its constants are read at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


# --------------------------------------------------------------------------------------------
# the folder


def test_hf_is_a_registered_export_format_and_weights_source():
    assert "hf" in EXPORT_FORMATS.names() and "hf" in WEIGHT_SOURCES.names()


def test_timm_layout_folder_loads_in_plain_timm_with_the_same_logits(study, exported, tmp_path):
    """A timm backbone + linear head is a plain timm model: a Python without transferlab loads the folder
    through both of timm's mechanisms (local-dir: and a file overlay) and gets the run's logits."""
    folder, run_dir = exported["res_linear"], study / "res_linear.seed0"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    run = load_run(run_dir)
    pre = run.load_model().preprocess()
    assert cfg["architecture"] == "test_resnet" and cfg["num_classes"] == 4 and cfg["label_names"] == run.class_names
    assert cfg["pretrained_cfg"]["input_size"] == [3, 16, 16]
    assert (cfg["pretrained_cfg"]["mean"], cfg["pretrained_cfg"]["std"]) == (list(pre.mean), list(pre.std))
    assert cfg["transferlab"]["layout"] == "timm" and cfg["transferlab"]["timm_loadable"] is True
    assert json.loads(parity_path(folder).read_text())["ok"] is True

    x, ref = _logits(run.load_model(), run_dir)
    save_file({"x": x.contiguous(), "ref": ref.contiguous()}, str(tmp_path / "io.safetensors"))
    child = f"""
import sys, timm, torch
from safetensors.torch import load_file
assert "transferlab" not in sys.modules
io = load_file({str(tmp_path / "io.safetensors")!r})
a = timm.create_model("local-dir:{folder}", pretrained=True).eval()
# the overlay must say num_classes too, or timm drops the classifier as one for other classes
b = timm.create_model("test_resnet", pretrained=True, num_classes=4,
                      pretrained_cfg_overlay=dict(file="{folder}/model.safetensors", num_classes=4)).eval()
with torch.inference_mode():
    for m in (a, b):
        torch.testing.assert_close(m(io["x"]), io["ref"], atol=1e-5, rtol=1e-5)
assert a.pretrained_cfg["label_names"] == {run.class_names!r}
assert "transferlab" not in sys.modules
print("plain timm ok")
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "plain timm ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("name, why", [("res_trunc_mlp", "truncated"), ("cnn", "transferlab's own architecture")])
def test_transferlab_layout_folder_loads_with_transferlab_and_plain_timm_refuses_it(study, exported, name, why):
    folder = exported[name]
    run_dir = study / name
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["transferlab"]["layout"] == "transferlab" and cfg["architecture"].startswith("transferlab:")
    assert why in cfg["transferlab"]["why_not_timm"]
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    loaded = load_hf_model(folder)
    assert loaded.class_names == load_run(run_dir).class_names and loaded.image_size == 16
    x, ref = _logits(load_run(run_dir).load_model(), run_dir)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), ref)
    card = (folder / "README.md").read_text()
    assert "Plain `timm.create_model` cannot build it" in card and "library_name: transferlab" in card


def test_model_card_has_data_training_seed_statistics_comparison_row_and_limits(study, exported):
    card = (exported["res_linear"] / "README.md").read_text()
    accs = [json.loads((study / f"res_linear.seed{s}" / "metrics.json").read_text())["test_acc"] for s in (0, 1)]
    mean, std = statistics.fmean(accs), statistics.stdev(accs)
    assert f"Over the study's 2 seeds: **{100 * mean:.2f}% ± {100 * std:.2f}**" in card
    assert card.startswith("---\n") and "library_name: timm" in card
    for text in ("## Data", "`synthetic`", "## Training", "name: finetune", "epochs: 1", "optimizer: adamw",
                 "| res\\_linear | finetune | test\\_resnet | scratch |", "## Intended use and limits", "## Export check",
                 'timm.create_model("local-dir:'):
        assert text in card, text
    metrics = json.loads((study / "res_linear.seed0" / "metrics.json").read_text())
    assert f"**{100 * metrics['test_acc']:.2f}%**" in card


def test_cli_export_format_hf_writes_the_checked_folder(study, tmp_path, capsys):
    out = tmp_path / "hf_cnn"
    assert main(["export", str(study / "cnn"), "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity hf" in printed and "— ok" in printed
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "modeling_transferlab_cnn.py"]
    assert json.loads(parity_path(out).read_text())["ok"] is True


def test_cli_export_hf_into_an_existing_folder_writes_into_it_not_below_it(study, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()  # an empty folder, then the same folder again (a re-export replaces its files)
    for _ in range(2):
        assert main(["export", str(study / "cnn"), "--format", "hf", "--out", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "modeling_transferlab_cnn.py"]
        assert json.loads(parity_path(out).read_text())["ok"] is True
    assert EXPORT_FORMATS.get("hf").folder and not EXPORT_FORMATS.get("onnx").folder
    capsys.readouterr()


def test_export_checkpoint_from_the_engine_matches_run_export(study, tmp_path):
    """``engine.export.export_checkpoint`` (what the MLflow tracker's ``log_model`` uses, below ``rundir``) = ``Run.export``."""
    run = load_run(study / "res_trunc_mlp")
    below = export_checkpoint(run.path, run.config, run.metrics, "safetensors", tmp_path / "a" / "model.safetensors")
    above = run.export("safetensors", tmp_path / "b" / "model.safetensors")
    assert below.parity.ok and below.parity.samples == above.parity.samples and below.parity.n == above.parity.n > 0
    a, b = load_file(str(below.path)), load_file(str(above.path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "model.json").read_text()) == json.loads((tmp_path / "b" / "model.json").read_text())


def test_import_transferlab_alone_registers_the_hf_format(study, tmp_path):
    """``load_run(...).export("hf")`` from a Python that imported nothing but ``transferlab``."""
    child = f"""
import sys, transferlab
result = transferlab.load_run({str(study / "cnn")!r}).export("hf", {str(tmp_path / "out")!r})
assert result.parity.ok, result.parity.describe()
print("OK", sorted(p.name for p in result.files))
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK ['README.md', 'config.json', 'model.safetensors', 'modeling_transferlab_cnn.py']" in proc.stdout


def test_export_refuses_a_foreign_non_empty_folder_and_a_run_without_a_model(study, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(HubError, match="not a transferlab hf export"):
        export_hf(study / "cnn", tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        export_hf(study / "cnn", tmp_path / "new", checkpoint="nope")


# --------------------------------------------------------------------------------------------
# weights: hf:


def test_weights_hf_loads_both_layouts_strictly_as_a_backbone(study, exported):
    timm_folder, trunc_folder = exported["res_linear"], exported["res_trunc_mlp"]
    backbone, report = create_backbone("test_resnet", f"hf:{timm_folder}")
    saved = load_file(str(timm_folder / "model.safetensors"))
    assert report.dropped == ["fc.bias", "fc.weight"] and "classifier" in report.describe()
    assert all(torch.equal(v, saved[k]) for k, v in backbone.state_dict().items())

    backbone, report = create_backbone("test_resnet", f"hf:{trunc_folder}", truncate=TruncateConfig(stages=2))
    source = load_run(study / "res_trunc_mlp").load_model().backbone.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in backbone.state_dict().items())
    assert report.dropped_what == "head of the exported model" and all(k.startswith("head.") for k in report.dropped)


def test_weights_hf_in_a_study_from_the_cli(exported, tmp_path):
    study = {
        "study": "reuse",
        "defaults": STUDY["defaults"],
        "experiments": [{"name": "probe", "model": {"backbone": "test_resnet", "weights": f"hf:{exported['res_linear']}"},
                         "strategy": {"name": "linear_probe"}}],
    }
    path = tmp_path / "reuse.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-report"]) == 0
    metrics = json.loads((tmp_path / "runs" / "reuse" / "probe" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and str(exported["res_linear"]) in metrics["weights_source"]


def test_weights_hf_errors_name_the_problem(exported, tmp_path, offline):
    with pytest.raises(WeightsError, match=r"expected backbone resnet18 .*found test_resnet"):
        create_backbone("resnet18", f"hf:{exported['res_linear']}")
    with pytest.raises(WeightsError, match="exported backbone was truncated"):
        create_backbone("test_resnet", f"hf:{exported['res_trunc_mlp']}")  # a deeper model than the export
    with pytest.raises(WeightsError, match="no such folder, and not a hub repo id"):
        create_backbone("test_resnet", f"hf:{tmp_path}/nope/deeper")
    with pytest.raises(WeightsError, match="name a folder"):
        create_backbone("test_resnet", "hf:")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        create_backbone("test_resnet", f"hf:{tmp_path / 'empty'}")
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=r"HF_HUB_OFFLINE.*weights: hf:DIR"):
        create_backbone("test_resnet", "hf:someone/not-cached")
    assert time.perf_counter() - start < 10


def test_weights_hf_repo_id_comes_from_the_hub_cache_offline(exported, tmp_path, offline, monkeypatch):
    folder = exported["res_linear"]
    files = {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors", "README.md")}
    _hub_cache(tmp_path / "hub", "someone/tiny-res", files)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    backbone, report = create_backbone("test_resnet", "hf:someone/tiny-res")
    assert "hub repo someone/tiny-res" in report.source
    saved = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in backbone.state_dict().items())
    assert load_hf_model("someone/tiny-res").class_names == json.loads(files["config.json"])["label_names"]


# --------------------------------------------------------------------------------------------
# weights: imagenet, for real, against a hub cache on disk


def test_imagenet_weights_come_from_the_hf_cache_that_HF_HOME_names(tmp_path):
    """The code path online users take (timm -> huggingface_hub -> cache), offline, on weights this test wrote;
    and the same repo as ``weights: hf:<repo>``."""
    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    model = timm.create_model("test_resnet", num_classes=1000)
    gen = torch.Generator().manual_seed(7)
    state = {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "written.safetensors"))
    config = {"architecture": "test_resnet", "num_classes": 1000, "pretrained_cfg": dict(model.pretrained_cfg, hf_hub_id=None)}
    _hub_cache(tmp_path / "hf_home" / "hub", repo, {
        "model.safetensors": (tmp_path / "written.safetensors").read_bytes(),
        "config.json": json.dumps(config, default=list).encode(),
    })
    child = f"""
import torch
from safetensors.torch import load_file
from transferlab.models import create_backbone
backbone, report = create_backbone("test_resnet", "imagenet")
written = load_file({str(tmp_path / "written.safetensors")!r})
state = backbone.state_dict()
assert set(written) - set(state) == {{"fc.weight", "fc.bias"}}, set(written) ^ set(state)
assert all(torch.equal(v, written[k]) for k, v in state.items())
print("SOURCE", report.source)
# the same timm repo as `weights: hf:<repo>` (timm's own config.json, classifier dropped)
backbone, report = create_backbone("test_resnet", "hf:{repo}")
assert report.dropped == ["fc.bias", "fc.weight"], report.dropped
assert all(torch.equal(v, written[k]) for k, v in backbone.state_dict().items())
print("HF", report.source)
# what `transferlab plan` says of them: in the cache -> local; a repo that is not -> download
from transferlab.models.backbones import weights_status
print("STATUS", weights_status("test_resnet", "hf:{repo}"), weights_status("test_resnet", "imagenet"))
print("UNCACHED", weights_status("test_resnet", "hf:someone/not-cached"))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"SOURCE timm hub ({repo})" in proc.stdout and f"HF hub repo {repo} (cached in" in proc.stdout
    assert f"STATUS ('local', 'Hugging Face cache ({repo}, {tmp_path / 'hf_home' / 'hub'}" in proc.stdout
    assert f"('local', 'Hugging Face cache ({repo})')" in proc.stdout
    assert "UNCACHED ('download', 'Hugging Face hub someone/not-cached')" in proc.stdout


# --------------------------------------------------------------------------------------------
# push


@pytest.fixture
def no_upload(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the hub was called")

    monkeypatch.setattr(hub.HfApi, "create_repo", refuse)
    monkeypatch.setattr(hub.HfApi, "upload_folder", refuse)


def test_push_offline_fails_fast_naming_the_folder_export(study, offline, no_upload, capsys):
    start = time.perf_counter()
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE.*transferlab export .*--format hf --out DIR"):
        push_hf(study / "cnn", "me/tiny")
    assert main(["push", str(study / "cnn"), "--repo", "me/tiny"]) == 2
    assert "--format hf --out DIR" in capsys.readouterr().out
    assert time.perf_counter() - start < 10


def test_push_with_an_unreachable_endpoint_fails_fast(study, monkeypatch, no_upload):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(HubError, match=r"not reachable.*--format hf"):
        push_hf(study / "cnn", "me/tiny")
    assert time.perf_counter() - start < 10
    with pytest.raises(HubError, match="expected a hub repo id"):
        push_hf(study / "cnn", "not a repo")


def test_push_uploads_the_checked_folder_when_online(study, monkeypatch):
    """The online path with the hub's two calls replaced: what would be uploaded is the checked folder."""
    seen: dict[str, object] = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **k):
        seen["repo"], seen["private"] = repo_id, private
        return RepoUrl(f"{hub_constants.ENDPOINT}/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message=None, **k):
        seen["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        seen["parity"] = json.loads((Path(folder_path) / PARITY_FILE).read_text())

    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    monkeypatch.setattr(hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hub.HfApi, "upload_folder", upload_folder)
    url = push_hf(study / "res_linear.seed0", "me/tiny", private=True)
    assert url.endswith("me/tiny") and seen["repo"] == "me/tiny" and seen["private"] is True
    assert seen["files"] == ["README.md", "config.json", "model.safetensors", PARITY_FILE]
    assert seen["parity"]["ok"] is True
