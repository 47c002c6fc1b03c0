"""``bash benchmarks/gpu.sh --dry`` on this machine: every step of the GPU script is found and runnable (not gpu-marked:
it needs no GPU, and runs nothing heavy — one Python process for all the checks)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["env", "data", "gpu-tests", "study-fmnist-gpu", "bench1-train_step", "bench2-data_path", "bench7-eval_batch",
         "bench3-feature_cache"]


def test_gpu_script_dry_run_finds_every_step(tmp_path):
    out = tmp_path / "gpu_results.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    log = out.with_suffix(".log")
    detail = proc.stdout[-4000:] + proc.stderr[-2000:] + (log.read_text()[-4000:] if log.exists() else "")
    assert proc.returncode == 0, detail
    result = json.loads(out.read_text())
    assert result["dry"] is True and [s["step"] for s in result["steps"]] == STEPS, detail
    for s in result["steps"]:
        # dry-warn: only where Fashion-MNIST is not installed on this machine (the data step and the study's check)
        allowed = {"dry-ok", "dry-warn"} if s["step"] in ("data", "study-fmnist-gpu") else {"dry-ok"}
        assert s["status"] in allowed, (s, detail)
    table = proc.stdout[proc.stdout.index("| step | status | figure | seconds |"):]
    for name in STEPS:  # the printed table lists every step, as the JSON does
        assert f"| {name} | dry-" in table, (name, table)
    tests = next(s for s in result["steps"] if s["step"] == "gpu-tests")
    assert tests["figure"].endswith("gpu tests collected") and int(tests["figure"].split()[0]) >= 5, tests


def test_gpu_script_rejects_an_unknown_option():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dyr"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "unknown option --dyr" in proc.stderr
