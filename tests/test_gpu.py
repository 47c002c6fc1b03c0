"""On a CUDA GPU (``pytest -m gpu``; ``benchmarks/gpu.sh`` runs them): DDP over NCCL, bf16 from ``precision: auto``,
the feature cache on the GPU against the same run on the CPU, and the ``local`` executor on one GPU.

Every test here is marked ``gpu`` (``scripts/test.sh`` deselects them) and skips cleanly where torch sees no CUDA
device, so collecting this file on a CPU machine is cheap and safe. The runs are tiny (synthetic images, a few
epochs): they check that the CUDA paths work and agree with the CPU, not how fast they are.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]

# A tiny synthetic study: seconds per run, yet the whole path (data on the device, Fabric, checkpoints, test metrics)
TINY = {
    "data": {"dataset": "synthetic", "synthetic_size": 256, "val_fraction": 0.25},
    "model": {"backbone": "transferlab_cnn"},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cuda", "precision": "32-true"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "transferlab.cli", *args], env={**os.environ, **(env or {})},
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _study(tmp_path: Path, name: str, experiments: list[dict], **defaults: dict) -> Path:
    merged = {k: {**v, **defaults.get(k, {})} for k, v in TINY.items()}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"study": name, "defaults": merged, "experiments": experiments}))
    return path


def _metrics(runs: Path, study: str, name: str) -> dict:
    return json.loads((runs / study / name / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# DDP over NCCL


NCCL_ONE_RANK = r"""
import sys, tempfile
from pathlib import Path
import torch
from lightning.fabric import Fabric
from rich.console import Console
from transferlab.config import ExperimentConfig, from_dict
from transferlab.data.batches import TensorBatches
from transferlab.engine import fit
from transferlab.engine.distributed import all_reduce_sum
from transferlab.models import build_model
from transferlab.strategies import apply_strategy

precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
fabric = Fabric(accelerator="cuda", devices=1, strategy="ddp", precision=precision)
fabric.launch()
dist = torch.distributed
assert dist.is_initialized() and dist.get_backend() == "nccl", dist.get_backend()
t = all_reduce_sum(torch.ones(3, device=fabric.device))
assert t.tolist() == [1.0, 1.0, 1.0], t
cfg = from_dict(ExperimentConfig, {"name": "nccl", "model": {"backbone": "transferlab_cnn"},
                                   "train": {"epochs": 2, "batch_size": 32, "progress": False, "accelerator": "cuda",
                                             "precision": precision}})
torch.manual_seed(0)
model, _ = build_model(cfg.model, cfg.head, 10)
apply_strategy(model, cfg.strategy)
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=g)
y = torch.randint(0, 10, (256,), generator=g)
pre = model.preprocess()
train = TensorBatches(x, y, 32, pre, device=fabric.device, shuffle=True)
val = TensorBatches(x[:64], y[:64], 64, pre, device=fabric.device)
with tempfile.TemporaryDirectory() as d:
    result = fit(model, train, val, cfg, fabric, Path(d), {}, console=Console(quiet=True))
    assert any(Path(d).rglob("*.safetensors")), list(Path(d).rglob("*"))  # the checkpoints, written through DDP
assert len(result.history) == 2 and all(r["train_loss"] == r["train_loss"] for r in result.history), result.history
dist.destroy_process_group()
print("NCCL-ONE-RANK-OK")
"""


def test_a_one_rank_nccl_world_trains_through_fabric_ddp():
    """One GPU: a world of one process with Fabric's DDP strategy joins NCCL, all-reduces, and trains with ``fit``."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    out = subprocess.run([sys.executable, "-c", NCCL_ONE_RANK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "NCCL-ONE-RANK-OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank (2 ranks on one GPU: 'Duplicate GPU')")
def test_two_nccl_ranks_match_one_process(tmp_path):
    """As tests/test_distributed.py does on gloo, on NCCL: torchrun with 2 ranks follows the one-process run."""
    exps = [{"name": "probe", "model": {"backbone": "resnet18"}, "strategy": {"name": "linear_probe"}}]
    study = _study(tmp_path, "ddp", exps)
    _cli(["run", str(study), "--runs-dir", str(tmp_path / "single"), "--no-report"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "transferlab.cli", "run", str(study), "--runs-dir", str(tmp_path / "ddp"),
           "--no-report"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m, s = _metrics(tmp_path / "ddp", "ddp", "probe"), _metrics(tmp_path / "single", "ddp", "probe")
    assert m["world_size"] == 2 and s["world_size"] == 1 and m["device"].startswith("cuda")
    assert int(torch.tensor(m["confusion_matrix"]).sum()) == m["n_test"] == s["n_test"]
    assert abs(m["test_acc"] - s["test_acc"]) <= 0.05, (m["test_acc"], s["test_acc"])


# ---------------------------------------------------------------------------------------------------------------
# bf16 on CUDA


def test_precision_auto_is_bf16_mixed_on_a_cuda_card_with_bf16(tmp_path):
    from transferlab.engine.precision import auto_precision, resolve_precision

    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    assert resolve_precision("auto", "cuda") == expected
    assert resolve_precision("auto", "auto") == expected  # auto picks CUDA first
    assert auto_precision("cuda")[0] == expected
    study = _study(tmp_path, "bf16", [{"name": "auto"}], train={"precision": "auto"})
    _cli(["run", str(study), "--runs-dir", str(tmp_path / "runs"), "--no-report"])
    run = tmp_path / "runs" / "bf16" / "auto"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == expected  # recorded concretely
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["device"].startswith("cuda") and 0.0 <= m["test_acc"] <= 1.0
    assert m["test_loss"] == m["test_loss"]  # not NaN under autocast


def test_bf16_autocast_trains_the_same_model_as_fp32_within_tolerance(tmp_path):
    """bf16 rounds activations, so the numbers differ; on a learnable synthetic task both reach a similar accuracy."""
    exps = [{"name": "fp32", "train": {"precision": "32-true"}}, {"name": "bf16", "train": {"precision": "bf16-mixed"}}]
    study = _study(tmp_path, "prec", exps, train={"epochs": 4})
    _cli(["run", str(study), "--runs-dir", str(tmp_path / "runs"), "--no-report"])
    a, b = _metrics(tmp_path / "runs", "prec", "fp32"), _metrics(tmp_path / "runs", "prec", "bf16")
    assert abs(a["test_acc"] - b["test_acc"]) <= 0.1, (a["test_acc"], b["test_acc"])


# ---------------------------------------------------------------------------------------------------------------
# the feature cache on CUDA


def test_feature_cache_on_cuda_matches_the_same_run_on_the_cpu(tmp_path):
    """A linear probe trained on cached features on the GPU: the cache is used there, and the accuracy equals the
    CPU run's within a few test images (fp32 on both: same data, seed and init; only the arithmetic differs)."""
    from rich.console import Console

    from transferlab.config import ExperimentConfig, from_dict
    from transferlab.engine.features import STORE
    from transferlab.kinds import run_experiment

    quiet = Console(quiet=True)
    results = {}
    for accel in ("cpu", "cuda"):
        STORE.clear()
        cfg = from_dict(ExperimentConfig, {
            "name": f"probe_{accel}",
            "data": {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 256, "val_fraction": 0.25, "image_size": 32},
            "model": {"backbone": "test_efficientnet"},
            "strategy": {"name": "linear_probe"},
            "train": {"epochs": 5, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": accel,
                      "precision": "32-true", "cache": "on"},
        })
        cfg.validate()
        results[accel] = run_experiment(cfg, tmp_path / accel, console=quiet)
    STORE.clear()
    cpu, gpu = results["cpu"], results["cuda"]
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert gpu["feature_cache"]["used"] and cpu["feature_cache"]["used"]
    assert gpu["feature_cache"]["cut"] == cpu["feature_cache"]["cut"]
    assert gpu["n_test"] == cpu["n_test"]
    assert abs(gpu["test_acc"] - cpu["test_acc"]) <= 3 / gpu["n_test"] + 1e-9, (gpu["test_acc"], cpu["test_acc"])


# ---------------------------------------------------------------------------------------------------------------
# the local executor with one GPU


def test_local_executor_with_one_gpu_runs_every_experiment_on_it(tmp_path):
    """``--executor local --workers 1`` with ``CUDA_VISIBLE_DEVICES`` naming one card: both runs train on CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    study = _study(tmp_path, "local", [{"name": "a"}, {"name": "b", "train": {"lr": 0.02}}], train={"accelerator": "auto"})
    _cli(["run", str(study), "--runs-dir", str(tmp_path / "runs"), "--executor", "local", "--workers", "1", "--no-report"],
         env={"CUDA_VISIBLE_DEVICES": visible})
    for name in ("a", "b"):
        m = _metrics(tmp_path / "runs", "local", name)
        assert m["status"] == "ok" and m["device"].startswith("cuda"), (name, m["status"], m["device"], m.get("error"))
