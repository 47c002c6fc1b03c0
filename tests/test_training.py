"""The training engine: real accuracy on real data, exact resume, early stopping, NaN, schedules."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from transferlab.engine import TrainingDiverged
from transferlab.files import CheckpointError
from transferlab.files import read_checkpoint_metadata as read_metadata
from transferlab.kinds import run_experiment
from transferlab.rundir import RunError, load_run

QUIET = Console(quiet=True)


def test_builtin_cnn_learns_digits_to_90_percent(make_cfg, tmp_path):
    """Real data (scikit-learn's digits), real loop, CPU. (How long it takes is a benchmark's business, not a test's.)"""
    cfg = make_cfg(
        data={"dataset": "digits", "image_size": 16, "val_fraction": 0.1},
        model={"backbone": "transferlab_cnn"},
        strategy={"name": "scratch"},
        train={"epochs": 12, "batch_size": 64, "lr": 0.003, "optimizer": "adamw", "schedule": "cosine"},
    )
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert m["test_acc"] >= 0.90, m["test_acc"]
    assert m["n_test"] == 450 and len(m["per_class_acc"]) == 10
    cm = torch.tensor(m["confusion_matrix"])
    assert cm.sum() == 450 and cm.trace() / 450 == pytest.approx(m["test_acc"], abs=1e-6)
    assert m["test_top5"] >= m["test_acc"]


def test_run_directory_contents_and_load_run_reproduces_the_model(make_cfg, tmp_path):
    cfg = make_cfg(train={"epochs": 2})
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    run_dir = tmp_path / "run"
    written = ("config.yaml", "metrics.json", "history.csv", "selection.json", "checkpoints/best.safetensors", "checkpoints/last.safetensors",
               "checkpoints/best.json")
    for name in written:
        assert (run_dir / name).is_file(), name
    meta = read_metadata(run_dir / "checkpoints" / "best.safetensors")
    assert meta["config"]["name"] == "t" and meta["class_names"] == [f"class_{i}" for i in range(4)]
    assert meta["code_version"]["transferlab"]
    assert json.loads((run_dir / "checkpoints" / "best.json").read_text())["epoch"] == meta["epoch"]

    run = load_run(run_dir)
    assert run.config == cfg
    assert [int(r["epoch"]) for r in run.history] == [1, 2]
    model = run.load_model()
    # evaluating the reloaded model on the test split gives the recorded accuracy
    from transferlab.data import TensorBatches, prepare_splits
    from transferlab.engine.evaluation import evaluate

    splits = prepare_splits(cfg.data, cfg.seed)
    test = TensorBatches(splits.test_x, splits.test_y, 64, model.preprocess())
    assert evaluate(model, test, 4).acc == pytest.approx(m["test_acc"], abs=1e-9)


def test_existing_run_dir_is_not_overwritten_without_permission(make_cfg, tmp_path):
    cfg = make_cfg(train={"epochs": 1})
    run_experiment(cfg, tmp_path / "run", console=QUIET)
    with pytest.raises(RunError, match="already exists.*--resume.*--overwrite"):
        run_experiment(cfg, tmp_path / "run", console=QUIET)
    again = run_experiment(cfg, tmp_path / "run", resume=True, console=QUIET)  # finished: skipped
    assert again["status"] == "ok"
    run_experiment(cfg, tmp_path / "run", overwrite=True, console=QUIET)


def _final_state(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last.safetensors"))


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_resume_after_interruption_is_bit_identical(make_cfg, tmp_path, interrupt_and_resume, schedule):
    cfg = make_cfg(
        train={"epochs": 3, "optimizer": "adamw", "schedule": schedule},
        head={"type": "mlp", "hidden": 16, "dropout": 0.3},  # dropout: the global RNG must be restored too
        data={"augment": ["flip", "crop"]},
    )
    full, resumed, _, _ = interrupt_and_resume(cfg, tmp_path, die_at=1)  # killed right after epoch 2

    assert resumed["resumed_from"].endswith("last.safetensors")
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"  # weights, optimizer state, RNG
    assert resumed["test_acc"] == full["test_acc"]
    ha, hb = load_run(tmp_path / "full").history, load_run(tmp_path / "cut").history
    assert [(r["train_loss"], r["val_acc"]) for r in ha] == [(r["train_loss"], r["val_acc"]) for r in hb]


def test_resume_skips_a_corrupt_last_checkpoint_and_says_so(make_cfg, tmp_path):
    cfg = make_cfg(train={"epochs": 2})
    run_experiment(cfg, tmp_path / "run", console=QUIET)
    (tmp_path / "run" / "metrics.json").unlink()  # pretend it was killed before finishing
    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="last.safetensors"):
        read_metadata(last)
    console = Console(record=True, width=200)
    m = run_experiment(cfg, tmp_path / "run", resume=True, console=console)
    text = console.export_text()
    assert "cannot resume from" in text and "last.safetensors" in text and "resumed from" in text
    assert m["status"] == "ok"


def test_early_stopping_with_patience(make_cfg, tmp_path):
    cfg = make_cfg(train={"epochs": 10, "lr": 1e-9, "schedule": "none", "early_stopping": {"monitor": "val_acc", "patience": 2}})
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert m["stopped_early"] and m["epochs_run"] == 3 and m["best_epoch"] == 1


def test_nan_loss_stops_naming_experiment_epoch_and_step_and_keeps_the_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    from transferlab.models.model import TransferModel

    cfg = make_cfg(name="explodes", train={"epochs": 3, "batch_size": 32})  # 96 train images: 3 steps per epoch
    real_forward, calls = TransferModel.forward, {"n": 0}

    def forward(self, x):  # the 6th training forward (epoch 2, step 2; the 1st is fit's untimed warm-up) produces NaN logits
        out = real_forward(self, x)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:
                out = out * float("nan")
        return out

    monkeypatch.setattr(TransferModel, "forward", forward)
    with pytest.raises(TrainingDiverged, match=r"'explodes'.*non-finite at epoch 2, step 2"):
        run_experiment(cfg, tmp_path / "run", console=QUIET)
    meta = read_metadata(tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert meta["epoch"] == 0 and meta["trainer"]["best"] == meta["history"][0]["val_acc"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle", "none"])
def test_optimizers_and_schedules(optimizer, schedule, make_cfg, tmp_path):
    cfg = make_cfg(
        train={"epochs": 4, "optimizer": optimizer, "schedule": schedule, "lr": 0.01, "step_size": 2, "gamma": 0.1, "label_smoothing": 0.1},
        data={"synthetic_size": 64},
    )
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    lrs = [r["lr"] for r in load_run(tmp_path / "run").history]
    assert m["status"] == "ok" and len(lrs) == 4
    if schedule == "none":
        assert lrs == pytest.approx([0.01] * 4)
    elif schedule == "step":  # decays by gamma every step_size (2) epochs; lr = the one used in each epoch's last step
        assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001])
    else:  # cosine and one-cycle anneal towards zero by the end
        assert lrs[-1] < 0.05 * 0.01 and max(lrs) <= 0.01 + 1e-12


def test_bf16_mixed_on_the_cpu_trains_in_bfloat16_and_saves_float32_weights(make_cfg, tmp_path):
    seen: list[torch.dtype] = []  # dtype of every Conv2d output in training mode

    def hook(module, args, output):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            seen.append(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        m = run_experiment(make_cfg(train={"precision": "bf16-mixed", "epochs": 3}), tmp_path / "run", console=QUIET)
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}  # autocast ran the convolutions in bfloat16
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "best.safetensors"))
    assert {t.dtype for k, t in weights.items() if k.startswith("model.")} <= {torch.float32, torch.int64}  # fp32 master weights
    assert m["test_acc"] > 0.5  # 4 separable synthetic classes: it learned


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compile_trains_the_same_model_through_torch_compile(make_cfg, tmp_path, monkeypatch):
    import torch._dynamo
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # dropout masks drawn as in eager mode

    run_experiment(make_cfg(train={"epochs": 1}), tmp_path / "plain", console=QUIET)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_experiment(make_cfg(train={"epochs": 1, "compile": True}), tmp_path / "compiled", console=QUIET)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the training forward went through dynamo
    # same seed, same batches: the compiled kernels reproduce the eager run up to float reassociation
    loss = [float(load_run(tmp_path / d).history[0]["train_loss"]) for d in ("plain", "compiled")]
    assert loss[1] == pytest.approx(loss[0], rel=1e-3)
    a = load_file(str(tmp_path / "plain" / "checkpoints" / "last.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys()  # plain module names, no '_orig_mod.' prefix: checkpoints stay interchangeable
    # Adam's normalised step can turn a rounding difference in a near-zero gradient into a full lr step,
    # so compare each tensor's bulk, not its worst element
    for k in a:
        if a[k].is_floating_point() and a[k].numel() > 1:
            assert (a[k] - b[k]).abs().mean() < 1e-3, k


def test_flip_tta_averages_the_softmax_of_image_and_mirror_everywhere_the_run_is_evaluated(make_cfg, tmp_path):
    from transferlab.config import ConfigError
    from transferlab.data import TensorBatches, prepare_splits
    from transferlab.engine.evaluation import TestTimeAugmentation, evaluate, with_tta
    from transferlab.kinds.ensemble import member_probabilities

    cfg = make_cfg(train={"tta": "flip", "epochs": 2}, data={"augment": ["flip"]})
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    run = load_run(tmp_path / "run")
    model = run.load_model()
    splits = prepare_splits(cfg.data, cfg.seed)
    x = model.preprocess()(splits.test_x[:8])
    with torch.inference_mode():
        expected = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
        assert torch.allclose(TestTimeAugmentation(model)(x).exp(), expected, atol=1e-6)
        assert not torch.allclose(model(x).softmax(1), expected, atol=1e-4)  # the mirror view changes the prediction
    assert with_tta(model, "none") is model
    # the recorded test accuracy is the TTA one, and the ensemble re-evaluates members the same way
    test = TensorBatches(splits.test_x, splits.test_y, 64, model.preprocess())
    assert evaluate(with_tta(model, "flip"), test, 4).acc == pytest.approx(m["test_acc"], abs=1e-9)
    probs, _, _ = member_probabilities(run, splits.test_x, splits.test_y, torch.device("cpu"))
    assert float((probs.argmax(1) == splits.test_y).float().mean()) == pytest.approx(m["test_acc"], abs=1e-6)
    with pytest.raises(ConfigError, match="train.tta.*kind: train only"):
        make_cfg(kind="logistic", train={"tta": "flip"})
    with pytest.raises(ConfigError, match="train.tta"):
        make_cfg(train={"tta": "rotate"})


def test_a_callback_sees_every_hook_in_order_and_the_loop_state(make_cfg, tmp_path):
    """``fit(..., callbacks=[...])``: Lightning-style hooks, after the built-in ones, with the whole loop."""
    from lightning.fabric import Fabric

    from transferlab.data import TensorBatches, prepare_splits
    from transferlab.engine import Callback, fit
    from transferlab.models import build_model

    cfg = make_cfg(train={"epochs": 2, "batch_size": 32})
    splits = prepare_splits(cfg.data, cfg.seed)
    model, _ = build_model(cfg.model, cfg.head, splits.num_classes)
    pre = model.preprocess()
    train = TensorBatches(splits.train_x, splits.train_y, cfg.train.batch_size, pre, shuffle=True, seed=0)
    val = TensorBatches(splits.val_x, splits.val_y, 64, pre)
    calls: list[tuple] = []

    class Record(Callback):
        def on_fit_start(self, loop):
            calls.append(("fit_start",))

        def on_train_epoch_start(self, loop):
            calls.append(("epoch_start", loop.state.epoch))

        def on_train_batch_end(self, loop):
            calls.append(("batch_end", loop.state.epoch, loop.state.step))

        def on_train_epoch_end(self, loop, row):
            calls.append(("epoch_end", row["epoch"], loop.state.best_epoch))

        def on_fit_end(self, loop):
            calls.append(("fit_end", len(loop.history)))

    result = fit(model, train, val, cfg, Fabric(accelerator="cpu", devices=1), tmp_path / "ck", {}, console=QUIET, callbacks=[Record()])
    steps = len(train)
    expected = [("fit_start",)]
    for epoch in range(2):
        expected += [("epoch_start", epoch)] + [("batch_end", epoch, s + 1) for s in range(steps)] + [("epoch_end", epoch + 1)]
    expected.append(("fit_end", 2))
    assert [c if c[0] != "epoch_end" else c[:2] for c in calls] == expected
    assert len(result.history) == 2
    assert (tmp_path / "ck" / "last.safetensors").is_file()  # the built-in checkpointing still ran
