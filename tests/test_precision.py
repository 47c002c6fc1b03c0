"""``train.precision: auto``: detection (mocked CPU flags, both branches), resolution before config.yaml, resume, the table."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from rich.console import Console

from transferlab.config import TrainConfig
from transferlab.engine import precision as prec
from transferlab.engine.features.cached import extraction_batch_size
from transferlab.kinds.base import resolve_run_config, run_experiment
from transferlab.results.compare import collect
from transferlab.rundir import load_run

QUIET = Console(quiet=True)
X86_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sse sse2 avx avx2 avx512f avx512bw avx512vl"


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\nbogomips\t: 4000\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return path


@pytest.mark.parametrize("extra, native", [(" avx512_bf16", True), (" amx_bf16 amx_tile", True), ("", False)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, extra, native):
    flags = prec.cpu_flags(_cpuinfo(tmp_path, X86_FLAGS + extra))
    assert "avx512f" in flags  # AVX-512 alone is not native bf16 (oneDNN emulates it, slower than fp32)
    assert prec.cpu_has_native_bf16(flags) is native
    assert prec.auto_precision("cpu", flags)[0] == ("bf16-mixed" if native else "32-true")


def test_no_cpuinfo_falls_back_to_torch_probes(tmp_path, monkeypatch):
    assert prec.cpu_flags(tmp_path / "missing") is None
    monkeypatch.setattr(prec, "cpu_flags", lambda: None)
    for answer in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda a=answer: a, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert prec.cpu_has_native_bf16() is answer


@pytest.mark.parametrize("native", [True, False])
def test_auto_resolves_per_device_and_explicit_values_stay(monkeypatch, native):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda flags=None: native)
    assert prec.resolve_precision("auto", "cpu") == ("bf16-mixed" if native else "32-true")
    assert prec.resolve_precision("32-true", "cpu") == "32-true"
    assert prec.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    assert prec.auto_precision("cuda")[0] == ("bf16-mixed" if native else "32-true")
    # the feature pass batch follows the resolved precision on the CPU
    assert extraction_batch_size(SimpleNamespace(train=TrainConfig(precision="auto")), torch.device("cpu")) == (128 if native else 64)
    assert extraction_batch_size(SimpleNamespace(train=TrainConfig(precision="32-true")), torch.device("cpu")) == 64


def test_the_default_is_full_precision_and_unknown_values_are_rejected(make_cfg):
    assert TrainConfig().precision == "32-true"  # auto is opt-in until every bf16 path passes its parity checks
    with pytest.raises(Exception, match="precision"):
        make_cfg(train={"precision": "bf16-mixd"})


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_recorded_resolved_and_shown_in_the_table(make_cfg, tmp_path, monkeypatch, native):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda flags=None: native)
    want = "bf16-mixed" if native else "32-true"
    cfg = make_cfg(train={"precision": "auto", "epochs": 1})
    m = run_experiment(cfg, tmp_path / "s" / "t", console=QUIET)
    assert m["status"] == "ok"
    recorded = yaml.safe_load((tmp_path / "s" / "t" / "config.yaml").read_text())
    assert recorded["train"]["precision"] == want
    assert load_run(tmp_path / "s" / "t").config.train.precision == want
    ckpt_meta = json.loads((tmp_path / "s" / "t" / "checkpoints" / "best.json").read_text())
    assert ckpt_meta["config"]["train"]["precision"] == want
    (row,) = collect(tmp_path / "s")
    assert row["precision"] == want


def test_resume_keeps_the_recorded_precision(make_cfg, tmp_path, monkeypatch):
    """A run recorded with 32-true (the old default) resumes as 32-true on a bf16 machine, and is reused unchanged."""
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda flags=None: False)
    run_dir = tmp_path / "s" / "t"
    first = run_experiment(make_cfg(train={"precision": "auto", "epochs": 1}), run_dir, console=QUIET)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["precision"] == "32-true"
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda flags=None: True)
    cfg = make_cfg(train={"precision": "auto", "epochs": 1})
    assert resolve_run_config(cfg, run_dir, resume=True)[0].train.precision == "32-true"
    assert resolve_run_config(cfg, run_dir, resume=False)[0].train.precision == "bf16-mixed"  # a new or replaced run
    again = run_experiment(cfg, run_dir, resume=True, console=QUIET)  # finished: reused, not refused as a config change
    assert again["test_acc"] == first["test_acc"]
    (run_dir / "metrics.json").unlink()  # as if interrupted: continued from its checkpoint in its own precision
    cont = run_experiment(cfg, run_dir, resume=True, console=QUIET)
    assert cont["status"] == "ok"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["precision"] == "32-true"


def test_a_config_without_the_key_is_from_the_32_true_days(tmp_path):
    from transferlab.kinds.base import recorded_precision

    (tmp_path / "config.yaml").write_text("name: old\ntrain: {epochs: 1}\n")
    assert recorded_precision(tmp_path) == "32-true"
    (tmp_path / "config.yaml").write_text("name: new\ntrain: {precision: bf16-mixed}\n")
    assert recorded_precision(tmp_path) == "bf16-mixed"
    assert recorded_precision(tmp_path / "none") is None
