"""Adapter-only checkpoints (issue 22 §2): a parameter-efficient run's checkpoints hold what trained (adapters, biases,
norms, head) and every buffer; the frozen weights are its base's, recorded by fingerprint. Every reader — ``load_run``,
exports, a resume, soups, ``run:`` starts — gets the complete (LoRA: merged) model, and a changed base is an error
naming the file. Tiny synthetic runs on ``transferlab_cnn`` whose "pretrained" base is a local file of random weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import timm
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

import transferlab  # noqa: F401 - registers transferlab_cnn, the kinds and the exporters
from transferlab.config import ExperimentConfig, HeadConfig, ModelConfig, from_dict
from transferlab.data import TensorBatches, prepare_splits
from transferlab.engine.checkpointing import weights_scope
from transferlab.files import CheckpointError, read_checkpoint_metadata, save_checkpoint
from transferlab.kinds import run_experiment
from transferlab.kinds.soup import average_states
from transferlab.models import build_model
from transferlab.models.weights import FrozenPart, frozen_fingerprint, load_model_weights
from transferlab.results.compare import collect
from transferlab.rundir import load_run, load_test_predictions
from transferlab.strategies import apply_strategy

QUIET = Console(quiet=True)
LORA = {"name": "lora", "rank": 2, "alpha": 4}


def _random_backbone(path, seed):
    torch.manual_seed(seed)
    backbone = timm.create_model("transferlab_cnn", num_classes=0)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    """The "pretrained" weights every run here starts from: a local file (``weights: file:…``) of random weights."""
    return _random_backbone(tmp_path_factory.mktemp("base") / "base.safetensors", 123)


@pytest.fixture
def cfg_on(make_cfg, base_file):
    def make(strategy=LORA, base=None, **over):
        return make_cfg(model={"weights": f"file:{base or base_file}"}, strategy=strategy, **over)
    return make


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, base_file):
    """Two finished LoRA runs and a fine-tune on the same base, set up as ``make_cfg`` (tests/conftest.py) sets runs up."""
    root = tmp_path_factory.mktemp("runs")
    for name, strategy, lr in (("a", LORA, 0.01), ("b", LORA, 0.03), ("ft", {"name": "finetune"}, 0.01)):
        cfg = from_dict(ExperimentConfig, {
            "name": name, "data": {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 128, "val_fraction": 0.25},
            "model": {"backbone": "transferlab_cnn", "weights": f"file:{base_file}"}, "strategy": strategy,
            "train": {"epochs": 2, "batch_size": 32, "lr": lr, "progress": False, "accelerator": "cpu", "precision": "32-true"}})
        cfg.validate()
        run_experiment(cfg, root / name, console=QUIET)
    return root


def _best(run_dir):
    return run_dir / "checkpoints" / "best.safetensors"


def _outputs(model, cfg):
    """The model's probabilities on the run's whole test split."""
    splits = prepare_splits(cfg.data, cfg.seed)
    x = next(iter(TensorBatches(splits.test_x, splits.test_y, 10_000, model.preprocess())))[0]
    with torch.no_grad():
        return model.eval()(x).softmax(1)


# --------------------------------------------------------------------------------------------
# what is written


def test_which_runs_write_adapter_only_checkpoints(make_cfg, cfg_on):
    for name in ("lora", "bitfit", "norm_only", "bn_only", "linear_probe"):
        assert weights_scope(cfg_on({"name": name} if name != "lora" else LORA)) == "trainable", name
    assert weights_scope(cfg_on({"name": "finetune"})) == "full"
    assert weights_scope(cfg_on({"name": "lp_ft", "probe_epochs": 1})) == "full"
    assert weights_scope(make_cfg(strategy=LORA)) == "full"  # scratch: a random start cannot be rebuilt
    assert weights_scope(cfg_on({"name": "linear_probe", "freeze_epochs": 1})) == "full"  # a schedule trains the frozen part
    assert weights_scope(cfg_on(train={"ema": {}})) == "full"
    assert weights_scope(cfg_on(train={"precision": "bf16-true"})) == "full"


def test_a_lora_checkpoint_holds_only_what_trained_and_is_much_smaller(lora_runs, base_file):
    lora, ft = _best(lora_runs / "a"), _best(lora_runs / "ft")
    assert lora.stat().st_size * 4 < ft.stat().st_size, (lora.stat().st_size, ft.stat().st_size)
    meta = read_checkpoint_metadata(lora)
    assert meta["weights_scope"] == "trainable" and read_checkpoint_metadata(ft).get("weights_scope", "full") == "full"
    frozen = meta["frozen"]
    assert frozen["base"] == f"file:{base_file}" and len(frozen["fingerprint"]) == 64 and frozen["count"] == len(frozen["keys"]) > 0
    stored = {k[len("model."):] for k in load_file(str(lora)) if k.startswith("model.")}
    assert not stored & set(frozen["keys"])  # no frozen backbone tensor
    assert all(k.startswith("backbone.") and ".lora_" not in k for k in frozen["keys"])
    assert any(".lora_A." in k for k in stored) and any(k.startswith("head.") for k in stored)
    assert any(k.endswith("running_mean") for k in stored)  # every buffer is kept
    run = load_run(lora_runs / "a")
    assert run.metrics["checkpoint_bytes"] == lora.stat().st_size
    shown = sorted(r["checkpoint_mb"] for r in collect(lora_runs))  # compare's "checkpoint (MB)"
    assert shown == pytest.approx(sorted(_best(lora_runs / n).stat().st_size / 1e6 for n in ("a", "b", "ft")))


def test_load_run_completes_and_merges_with_the_in_memory_models_predictions(lora_runs):
    run = load_run(lora_runs / "a")
    model = run.load_model()
    assert not any("lora_" in k for k in model.state_dict())
    probs = _outputs(model, run.config)
    recorded = load_test_predictions(run.path)  # what the run's own (unmerged, in-memory) model predicted on test
    assert np.array_equal(probs.argmax(1).numpy(), recorded.pred)
    assert np.allclose(probs.max(1).values.numpy(), recorded.prob, atol=1e-4)
    # the same as the model built on the base with the adapters, loaded through the one loader
    ref, _ = build_model(run.config.model, run.config.head, 4)
    apply_strategy(ref, run.config.strategy)
    load_model_weights(ref, _best(run.path))
    assert torch.allclose(_outputs(ref, run.config), probs, atol=1e-5)


def test_exports_of_an_adapter_only_run_pass_their_parity_checks(lora_runs, tmp_path):
    run = load_run(lora_runs / "a")
    for fmt, out in (("safetensors", tmp_path / "st"), ("torchscript", tmp_path / "m.pt"), ("hf", tmp_path / "hf")):
        assert run.export(fmt, out).parity.ok, fmt  # a failed check raises ExportParityError


@pytest.mark.parametrize("strategy", [LORA, {"name": "bitfit"}], ids=["lora", "bitfit"])
def test_a_killed_adapter_only_run_resumes_bit_identically(cfg_on, tmp_path, interrupt_and_resume, strategy):
    cfg = cfg_on(strategy, train={"epochs": 3}, data={"augment": ["flip"]})
    full, resumed, _, _ = interrupt_and_resume(cfg, tmp_path, die_at=0)
    assert resumed["resumed_from"].endswith("last.safetensors")
    a, b = (load_file(str(d / "checkpoints" / "last.safetensors")) for d in (tmp_path / "full", tmp_path / "cut"))
    assert read_checkpoint_metadata(tmp_path / "cut" / "checkpoints" / "last.safetensors")["weights_scope"] == "trainable"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_acc"] == full["test_acc"]


def test_swa_writes_its_average_adapter_only_too(cfg_on, tmp_path):
    run_experiment(cfg_on(train={"epochs": 2, "swa": {"start": 0.5}}), tmp_path / "swa", console=QUIET)
    assert read_checkpoint_metadata(_best(tmp_path / "swa"))["weights_scope"] == "trainable"
    run = load_run(tmp_path / "swa")
    assert run.export("torchscript", tmp_path / "swa.pt").parity.ok


# --------------------------------------------------------------------------------------------
# the base: changed, missing; old full checkpoints


def test_a_changed_base_is_a_fingerprint_error_naming_the_file(cfg_on, tmp_path):
    base = _random_backbone(tmp_path / "mine.safetensors", 7)
    run_experiment(cfg_on(base=base, train={"epochs": 1}), tmp_path / "run", console=QUIET)
    _random_backbone(base, 8)  # same architecture, other values
    best = _best(tmp_path / "run")
    with pytest.raises(CheckpointError, match=rf"{best}.*model.weights=file:{base}.*fingerprint [0-9a-f]{{16}}….*[0-9a-f]{{16}}…"):
        load_run(tmp_path / "run").load_model()
    base.unlink()
    with pytest.raises(CheckpointError, match=rf"{best}.*come from model.weights=file:{base}.*weights file not found: {base}"):
        load_run(tmp_path / "run").load_model()


def test_the_loader_checks_the_stored_and_left_out_keys(lora_runs, tmp_path):
    run = load_run(lora_runs / "a")
    model, _ = build_model(run.config.model, run.config.head, 4)
    assert FrozenPart.of(model, "x").keys == ()  # nothing frozen before a strategy
    apply_strategy(model, run.config.strategy)
    part = FrozenPart.of(model, run.config.model.weights)
    assert part.fingerprint == read_checkpoint_metadata(_best(run.path))["frozen"]["fingerprint"]
    assert part.fingerprint == frozen_fingerprint(dict(reversed(model.state_dict().items())), part.keys)  # sorted: order-free
    meta = {k: v for k, v in read_checkpoint_metadata(_best(run.path)).items() if k != "optimizer"}
    state = load_file(str(_best(run.path)))
    model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    damaged = tmp_path / "damaged.safetensors"
    save_checkpoint(damaged, {**model_state, part.keys[0]: model.state_dict()[part.keys[0]]}, meta)
    with pytest.raises(CheckpointError, match=rf"{damaged}: records {part.keys[0]} as left out, yet holds them"):
        load_model_weights(model, damaged)
    del model_state[next(k for k in model_state if ".lora_A." in k)]
    save_checkpoint(damaged, model_state, meta)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): .*lora_A"):
        load_model_weights(model, damaged)


def test_an_old_full_checkpoint_of_a_lora_run_still_loads_without_its_base(lora_runs, base_file, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(lora_runs / "a", old)
    run = load_run(old)
    model, _ = build_model(run.config.model, run.config.head, 4)
    apply_strategy(model, run.config.strategy)
    meta = load_model_weights(model, _best(old))
    meta = {k: v for k, v in meta.items() if k not in ("weights_scope", "frozen", "format", "optimizer")}
    save_checkpoint(_best(old), model.state_dict(), meta)  # every tensor, as checkpoints were written before scopes
    expected = _outputs(load_run(lora_runs / "a").load_model(), run.config)
    config = old / "config.yaml"  # the base gone: a full checkpoint is loaded into a random model, every tensor replaced
    config.write_text(config.read_text().replace(str(base_file), "/nonexistent/base.safetensors"))
    old_run = load_run(old)
    assert old_run.config.model.weights == "file:/nonexistent/base.safetensors"
    got = _outputs(old_run.load_model(), run.config)
    assert torch.allclose(got, expected, atol=1e-5)


# --------------------------------------------------------------------------------------------
# soups and run: starts read merged, complete weights


def test_a_soup_of_lora_runs_averages_their_merged_weights(make_cfg, lora_runs, tmp_path):
    a, b = lora_runs / "a", lora_runs / "b"
    run_experiment(make_cfg(name="soup", kind="soup", soup={"members": [str(a), str(b)], "method": "uniform"}), tmp_path / "soup",
                   console=QUIET)
    soup = load_run(tmp_path / "soup")
    expected = average_states([load_run(r).load_model().state_dict() for r in (a, b)])
    got = soup.load_model().state_dict()
    assert got.keys() == expected.keys() and not any("lora_" in k for k in got)
    assert all(torch.allclose(got[k].float(), expected[k].float(), atol=1e-6) for k in got)
    assert soup.metrics["soup"]["batchnorm_recomputed"] == 0  # LoRA froze every BatchNorm
    assert soup.export("torchscript", tmp_path / "soup.pt").parity.ok
    # WiSE-FT from an adapter-only base (run:b) toward a fine-tune
    run_experiment(make_cfg(name="wise", kind="soup", soup={"members": [str(lora_runs / "ft")],
                                                              "interpolate": {"base": f"run:{b}", "alphas": [0.0, 1.0]}}),
                   tmp_path / "wise", console=QUIET)
    wise = load_run(tmp_path / "wise")
    assert [r["alpha"] for r in wise.metrics["wise_ft"]["curve"]] == [0.0, 1.0]
    assert not any("lora_" in k for k in wise.load_model().state_dict())


def test_a_run_start_from_an_adapter_only_run_gets_its_merged_backbone(lora_runs, make_cfg, tmp_path):
    src = load_run(lora_runs / "a").load_model()
    model, report = build_model(ModelConfig(backbone="transferlab_cnn", weights=f"run:{lora_runs / 'a'}"), HeadConfig(), 4)
    a, b = src.backbone.state_dict(), model.backbone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "adapter-only, completed with its base file:" in report.describe()
    # LP-FT from it: a full run (everything trains after the probe)
    cfg = make_cfg(model={"weights": f"run:{lora_runs / 'a'}"}, strategy={"name": "lp_ft", "probe_epochs": 1})
    run_experiment(cfg, tmp_path / "lpft", console=QUIET)
    assert read_checkpoint_metadata(_best(tmp_path / "lpft")).get("weights_scope", "full") == "full"
    assert load_run(tmp_path / "lpft").load_model() is not None


def test_vpt_and_a_cached_linear_probe_write_adapter_only_checkpoints_that_export(cfg_on, make_cfg, tmp_path):
    torch.manual_seed(5)
    vit = timm.create_model("test_vit", num_classes=0, img_size=32)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    vpt = make_cfg(model={"backbone": "test_vit", "weights": f"file:{tmp_path / 'vit.safetensors'}"}, data={"image_size": 32},
                   strategy={"name": "vpt", "prompts": 2}, train={"epochs": 1})
    probe = cfg_on({"name": "linear_probe"}, train={"epochs": 1})  # trains the head on cached features (a wrapper model)
    for name, cfg, trained in (("vpt", vpt, "backbone.prompt_tokens"), ("probe", probe, "head.")):
        run_experiment(cfg, tmp_path / name, console=QUIET)
        meta = read_checkpoint_metadata(_best(tmp_path / name))
        stored = {k[len("model."):] for k in load_file(str(_best(tmp_path / name))) if k.startswith("model.")}
        assert meta["weights_scope"] == "trainable" and meta["frozen"]["count"] > 0 and not stored & set(meta["frozen"]["keys"]), name
        assert any(k.startswith(trained) for k in stored), name
        assert load_run(tmp_path / name).export("safetensors", tmp_path / f"{name}-export").parity.ok, name
