"""DDP through torchrun: 2 CPU processes (gloo) follow the single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

STUDY = {
    "study": "ddp",
    "defaults": {
        "data": {"dataset": "synthetic", "synthetic_size": 256, "val_fraction": 0.25},
        "model": {"backbone": "transferlab_cnn"},
        # fp32: the check is DDP's arithmetic against one process to 1e-5; under bf16 (what auto picks on CPUs with
        # native bf16) half batches and whole ones round differently
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu", "precision": "32-true"},
    },
    "experiments": [
        # frozen backbone without dropout (BatchNorm in eval mode): DDP's averaged gradient equals the
        # global-batch gradient. (Active dropout would draw per-rank masks: same distribution, other numbers.)
        {"name": "probe", "model": {"backbone": "resnet18"}, "strategy": {"name": "linear_probe"}},
        # BatchNorm in train mode sees per-rank statistics: same accuracy within tolerance
        {"name": "finetune", "strategy": {"name": "finetune"}},
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, runs_dir, nproc: int) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "transferlab.cli", "run", str(study), "--runs-dir", str(runs_dir)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "transferlab.cli", "run", str(study), "--runs-dir", str(runs_dir)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_two_gloo_processes_match_one_process_and_write_one_run_directory(tmp_path):
    _run(tmp_path, tmp_path / "single", 1)
    _run(tmp_path, tmp_path / "ddp", 2)

    study_dir = tmp_path / "ddp" / "ddp"
    runs = sorted(p.name for p in study_dir.iterdir() if p.is_dir())
    assert runs == ["finetune", "probe"]  # exactly one directory per experiment, written by rank 0
    for name in runs:
        m = json.loads((study_dir / name / "metrics.json").read_text())
        s = json.loads((tmp_path / "single" / "ddp" / name / "metrics.json").read_text())
        assert m["world_size"] == 2 and s["world_size"] == 1
        assert m["n_test"] == s["n_test"]
        cm = torch.tensor(m["confusion_matrix"])
        assert int(cm.sum()) == m["n_test"]  # test metrics reduced over both ranks, every image counted once
        assert abs(m["test_acc"] - s["test_acc"]) <= 0.05, (name, m["test_acc"], s["test_acc"])

    a = load_file(str(tmp_path / "single" / "ddp" / "probe" / "checkpoints" / "last.safetensors"))
    b = load_file(str(study_dir / "probe" / "checkpoints" / "last.safetensors"))
    for k in ("model.head.1.weight", "model.head.1.bias"):
        assert torch.allclose(a[k], b[k], atol=1e-5), f"{k}: DDP drifted from the single-process run"
    ha = (tmp_path / "single" / "ddp" / "probe" / "history.csv").read_text().splitlines()[1:]
    hb = (study_dir / "probe" / "history.csv").read_text().splitlines()[1:]
    for ra, rb in zip(ha, hb, strict=True):  # train loss/acc (summed over ranks) and val metrics agree
        va, vb = [float(v) for v in ra.split(",")[1:5]], [float(v) for v in rb.split(",")[1:5]]
        assert va == pytest.approx(vb, rel=1e-4, abs=1e-5)


def test_shutdown_leaves_the_process_group_and_is_a_no_op_without_one(tmp_path):
    from transferlab.engine.distributed import shutdown

    dist = torch.distributed
    shutdown()  # no process group: nothing to do, no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        shutdown()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
