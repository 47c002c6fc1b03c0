"""Faults: SIGKILL mid-epoch and resume bit-identically, atomic checkpoints, run-directory locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from transferlab import files as ckpt
from transferlab.kinds import run_experiment
from transferlab.rundir import RunError, run_lock

QUIET = Console(quiet=True)

RUNNER = textwrap.dedent(
    """
    import sys, yaml
    from rich.console import Console
    from transferlab.config import ExperimentConfig, from_dict
    from transferlab.kinds import run_experiment
    cfg = from_dict(ExperimentConfig, yaml.safe_load(open(sys.argv[1])))
    run_experiment(cfg, sys.argv[2], resume=sys.argv[3] == "resume", console=Console(quiet=True))
    """
)


def _cfg(make_cfg, variant: str = "plain"):
    extra = {"strategy": {"name": "linear_probe", "unfreeze": {"at_epochs": [1, 2], "stages_per_step": 1}}} if variant == "gradual" else {}
    data = {"synthetic_size": 512, "augment": ["flip", "crop"]}  # 384 train images, 24 steps of 16 per epoch
    train = {"epochs": 3, "batch_size": 16, "schedule": "onecycle", "checkpoint_every_steps": 1}
    if variant == "recipes":  # their state (mixup's generator, the EMA, per-image policy seeds) must resume too
        data = {**data, "sampler": "balanced", "augment": ["flip", "crop", {"randaugment": 5}]}
        train = {**train, "mixup": {"alpha": 0.4, "cutmix_alpha": 1.0}, "ema": {"decay": 0.9, "evaluate": "both"}}
    return make_cfg(data=data, head={"type": "mlp", "hidden": 32, "dropout": 0.3}, train=train, **extra)


def _start(tmp_path: Path, cfg, run_dir: Path, mode: str) -> subprocess.Popen:
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    return subprocess.Popen([sys.executable, str(script), str(cfg_path), str(run_dir), mode])


def _trainer_position(run_dir: Path) -> tuple[int, int] | None:
    try:
        t = json.loads((run_dir / "checkpoints" / "last.json").read_text())["trainer"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
    return t["epoch"], t["step"]


@pytest.mark.parametrize(
    "kill_at, variant",
    [((0, 7), "plain"), ((1, 13), "plain"), ((1, 5), "gradual"), ((1, 9), "recipes")],
    ids=["epoch1", "epoch2", "gradual-unfreezing", "mixup-ema-balanced-sampler"],
)
def test_sigkill_mid_epoch_then_resume_is_bit_identical(make_cfg, tmp_path, kill_at, variant):
    cfg = _cfg(make_cfg, variant)
    ref = tmp_path / "ref"
    assert _start(tmp_path, cfg, ref, "fresh").wait(timeout=300) == 0

    cut = tmp_path / "cut"
    proc = _start(tmp_path, cfg, cut, "fresh")
    deadline = time.time() + 300
    while (pos := _trainer_position(cut)) is None or pos < kill_at:
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _trainer_position(cut)
    assert killed_at < (3, 0) and not (cut / "metrics.json").exists()
    print(f"killed at epoch {killed_at[0] + 1}, step {killed_at[1]}")
    ckpt.load_checkpoint(cut / "checkpoints" / "last.safetensors")  # the surviving checkpoint is complete

    assert _start(tmp_path, cfg, cut, "resume").wait(timeout=300) == 0
    assert not list((cut / "checkpoints").glob(".*.tmp"))  # a temp file left by the kill is cleaned up
    a = load_file(str(ref / "checkpoints" / "last.safetensors"))
    b = load_file(str(cut / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # model weights, BatchNorm stats, optimizer state, RNG state
        assert torch.equal(a[k], b[k]), f"{k} differs after SIGKILL at {killed_at} and resume"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, cut))
    assert ma["test_acc"] == mb["test_acc"] and ma["confusion_matrix"] == mb["confusion_matrix"]
    assert mb["resumed_from"].endswith("last.safetensors")
    ha = (ref / "history.csv").read_text().splitlines()
    hb = (cut / "history.csv").read_text().splitlines()
    strip = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # drop the wall-clock seconds column
    assert strip(ha) == strip(hb)


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    ckpt.save_checkpoint(path, {"w": torch.ones(3)}, {"epoch": 0})
    real = ckpt.save_file

    def half_write_then_crash(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # leave a truncated file behind, as a crash would
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "save_file", half_write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"w": torch.zeros(3)}, {"epoch": 1})
    state, meta, _, _ = ckpt.load_checkpoint(path)
    assert torch.equal(state["w"], torch.ones(3)) and meta["epoch"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]  # no partial or temp file


def test_truncated_checkpoint_error_names_the_file(tmp_path):
    path = tmp_path / "best.safetensors"
    ckpt.save_checkpoint(path, {"w": torch.ones(1000)}, {"epoch": 0})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ckpt.CheckpointError, match="best.safetensors"):
        ckpt.load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="best.safetensors"):
        ckpt.load_checkpoint(path)


def test_second_writer_of_a_run_directory_is_refused(tmp_path, make_cfg):
    run_dir = tmp_path / "study" / "exp"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from transferlab.rundir import run_lock\n"
         "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)", str(run_dir)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"{run_dir} is being written by another process \(pid {holder.pid}"):
            run_experiment(make_cfg(train={"epochs": 1}), run_dir, console=QUIET)
    finally:
        holder.kill()
        holder.wait()
    run_experiment(make_cfg(train={"epochs": 1}), run_dir, console=QUIET)  # the lock died with its holder
    with run_lock(run_dir):  # and is free again after a run
        pass


def test_resume_after_early_stop_does_not_train_further(make_cfg, tmp_path):
    cfg = make_cfg(train={"epochs": 10, "lr": 1e-9, "schedule": "none", "early_stopping": {"patience": 2}})
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert m["stopped_early"] and m["epochs_run"] == 3
    (tmp_path / "run" / "metrics.json").unlink()
    again = run_experiment(cfg, tmp_path / "run", resume=True, console=QUIET)
    assert again["epochs_run"] == 3 and again["stopped_early"] and again["test_acc"] == m["test_acc"]
