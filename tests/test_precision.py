"""``train.precision: auto``: detection (mocked CPU flags, both branches), resolution before config.yaml, resume, the table."""

from __future__ import annotations

import json
import warnings
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


def test_the_default_is_auto_and_unknown_values_are_rejected(make_cfg):
    assert TrainConfig().precision == "auto"
    with pytest.raises(Exception, match="precision"):
        make_cfg(train={"precision": "bf16-mixd"})


@pytest.mark.parametrize("native", [True, False])
def test_a_study_without_the_key_resolves_auto_on_both_branches(tmp_path, monkeypatch, native):
    """The default itself (no ``precision`` key anywhere): bf16 where the CPU has it, fp32 where it has not."""
    from transferlab import run_study

    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda flags=None: native)
    study = {"study": "dflt", "defaults": {"data": {"dataset": "synthetic", "synthetic_size": 32, "val_fraction": 0.25},
                                           "train": {"epochs": 1, "batch_size": 16, "progress": False, "accelerator": "cpu"}},
             "experiments": [{"name": "cnn"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    result = run_study(tmp_path / "s.yaml", runs_dir=tmp_path / "runs", console=QUIET)
    assert result.finished == ["cnn"]
    recorded = yaml.safe_load((tmp_path / "runs" / "dflt" / "cnn" / "config.yaml").read_text())["train"]["precision"]
    assert recorded == ("bf16-mixed" if native else "32-true")


# ----------------------------------------------------------------------------------------------------
# the guard for oneDNN's bf16 weight-gradient bug on 1×1 inputs


def _bf16_weight_grad(conv: torch.nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    (out.float() * g).sum().backward()
    return conv.weight.grad.clone()


def test_the_guarded_strided_conv_on_a_1x1_input_gets_exact_finite_weight_gradients_under_bf16():
    """The guarded layer against fp32 autograd: exact, finite, nothing for the taps that only see padding. Unguarded,
    oneDNN's native bf16 kernel returns uninitialised memory there in some trials (4-23 of 50 measured, RESULTS.md
    §9c); that depends on what the memory holds, so its presence is reported as a warning, not asserted."""
    torch.manual_seed(0)
    bad_plain = 0
    for _ in range(60):
        conv = torch.nn.Conv2d(32, 16, 3, stride=2, padding=1, bias=False)
        x, g = torch.randn(32, 32, 1, 1), torch.randn(32, 16, 1, 1)
        plain = _bf16_weight_grad(conv, x, g)
        w = conv.weight.detach().bfloat16().float().requires_grad_()
        (torch.nn.functional.conv2d(x.bfloat16().float(), w, stride=2, padding=1) * g).sum().backward()
        bad_plain += int(not torch.isfinite(plain).all() or (plain - w.grad).abs().max() > 1e-2 * w.grad.abs().max())
        conv.__class__ = prec.Fp32Conv2d
        guarded = _bf16_weight_grad(conv, x, g)
        ref = torch.autograd.grad((torch.nn.functional.conv2d(x, conv.weight, stride=2, padding=1) * g).sum(), conv.weight)[0]
        assert torch.isfinite(guarded).all() and torch.allclose(guarded, ref, atol=1e-5)
        assert guarded[:, :, [0, 0, 2, 2], [0, 2, 0, 2]].abs().max() == 0  # taps that only see padding get nothing
    if prec.cpu_has_native_bf16() and bad_plain == 0:
        warnings.warn("oneDNN returned correct bf16 weight gradients in 60 of 60 trials: if a torch upgrade fixed the "
                      "bug, engine.precision.guard_bf16_convs may be dropped", stacklevel=1)


def test_the_guard_finds_strided_convs_on_1x1_inputs_only_under_bf16_on_the_cpu():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    x = torch.randn(2, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert prec.bf16_unsafe_convs(model, x) == ["layer4.0.conv1"]
    assert prec.bf16_unsafe_convs(model, torch.randn(2, 3, 32, 32)) == []  # 2×2 inputs there: not affected
    assert prec.guard_bf16_convs(model, x, "32-true", "cpu") == []
    assert prec.guard_bf16_convs(model, x, "bf16-mixed", "cuda") == []
    assert type(model.layer4[0].conv1) is torch.nn.Conv2d
    assert prec.guard_bf16_convs(model, x, "bf16-mixed", "cpu") == ["layer4.0.conv1"]
    assert type(model.layer4[0].conv1) is prec.Fp32Conv2d
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # same names and values, BN stats untouched
    model.eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16  # the rest of the network still computes in bf16
        assert model.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16  # bf16-true: the dtype is kept around it


def test_a_bf16_run_records_the_guarded_layers_and_trains_finite_weights(make_cfg, tmp_path):
    cfg = make_cfg(data={"image_size": 16}, model={"backbone": "test_resnet"}, train={"precision": "bf16-mixed", "epochs": 2})
    m = run_experiment(cfg, tmp_path / "s" / "t", console=QUIET)
    assert m["status"] == "ok" and m["bf16_fp32_convs"] == ["backbone.layer4.0.conv1"]
    model = load_run(tmp_path / "s" / "t").load_model()
    assert all(torch.isfinite(p).all() for p in model.parameters())


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
