"""Issue 22 §3–§5: layer decay, L2-SP, LP-FT, soups and WiSE-FT, SWA, distillation — each on tiny synthetic data,
each bad input, bit-identical resumes, the greedy / uniform soup logic on hand-made members, WiSE-FT's alpha on val."""

from __future__ import annotations

import math

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import transferlab
from transferlab.config import ConfigError, parse_study
from transferlab.engine.distill import DistillLoss, teacher_inputs
from transferlab.engine.losses import L2SpLoss
from transferlab.engine.optim import SwaSchedule, layer_decay_groups, make_scheduler
from transferlab.engine.swa import recompute_batchnorm
from transferlab.kinds import run_experiment
from transferlab.kinds.phases import check_teacher
from transferlab.kinds.soup import SoupError, average_states, curve_choice, greedy_soup, interpolate_states
from transferlab.models.model import build_model
from transferlab.results.report import build_report
from transferlab.rundir import load_run
from transferlab.rundir.rundir import RunRefused
from transferlab.study import plan_study, run_study

QUIET = Console(quiet=True)
TINY = "test_efficientnet"  # timm's tiny EfficientNet: no dropout, so a frozen backbone can be cached


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """Finished runs to start from, distil from and average: two transferlab_cnn runs and a linear probe."""
    from transferlab.config import ExperimentConfig, from_dict

    root = tmp_path_factory.mktemp("base")

    def cfg(name, **train):
        c = from_dict(ExperimentConfig, {
            "name": name, "data": {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 128, "val_fraction": 0.25},
            "model": {"backbone": "transferlab_cnn", "weights": "scratch"},
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu", "precision": "32-true", **train}})
        c.validate()
        return c

    for name, lr in (("a", 0.01), ("b", 0.02)):
        run_experiment(cfg(name, lr=lr), root / name, console=QUIET)
    probe = cfg("probe")
    probe.strategy.name = "linear_probe"
    run_experiment(probe, root / "probe", console=QUIET)
    return root


def _last(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last.safetensors"))


def _assert_same(a_dir, b_dir, full, resumed):
    a, b = _last(a_dir), _last(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert resumed["test_acc"] == full["test_acc"]
    ha, hb = load_run(a_dir).history, load_run(b_dir).history
    assert [(r["train_loss"], r["val_acc"]) for r in ha] == [(r["train_loss"], r["val_acc"]) for r in hb]


# --------------------------------------------------------------------------------------------
# bad input: config errors naming the key, before any data loads


@pytest.mark.parametrize("over, message", [
    ({"train": {"layer_decay": 0.0}}, r"train.layer_decay=0.0 must be in \(0, 1\]"),
    ({"train": {"layer_decay": 1.5}}, r"train.layer_decay=1.5 must be in \(0, 1\]"),
    ({"train": {"l2_sp": {"alpha": 0.1}}}, r"model.weights='scratch' leaves train.l2_sp nothing to stay close to"),
    ({"strategy": {"name": "lp_ft", "probe_epochs": 2}}, r"strategy.probe_epochs=2 must be < train.epochs \(2\)"),
    ({"strategy": {"name": "lp_ft"}}, r"strategy.probe_epochs=None must be >= 1"),
    ({"strategy": {"name": "finetune", "probe_epochs": 1}}, r"strategy.probe_epochs=1 applies to strategy lp_ft only"),
    ({"train": {"swa": {"start": 1.0}}}, r"train.swa.start=1.0 must be in \(0, 1\)"),
    ({"train": {"swa": {}, "ema": {}}}, r"train.swa and train.ema both average"),
    ({"train": {"swa": {}, "early_stopping": {"patience": 2}}}, r"train.swa averages .* train.early_stopping.patience"),
    ({"train": {"layer_decay": 0.7, "lr_ratio": 0.5}}, r"train.layer_decay .* train.lr_ratio"),
    ({"train": {"distill": {"teacher": "t"}}}, r"train.distill.teacher='t' must be run:"),
    ({"train": {"distill": {"teacher": "run:t", "temperature": 0}}}, r"train.distill.temperature=0.0 must be > 0"),
    ({"train": {"distill": {"teacher": "run:t"}}}, r"train.distill.teacher='run:t' is the run itself"),
    ({"kind": "soup", "soup": {"members": ["x"]}}, r"soup.members=\['x'\] must list at least 2 runs"),
    ({"kind": "soup", "soup": {"members": ["x"], "interpolate": {"base": "run:y", "alphas": [1.5]}}}, r"soup.interpolate.alphas"),
    ({"kind": "logistic", "train": {"swa": {}}}, r"train.swa=.* applies to kind: train only"),
])
def test_bad_settings_are_config_errors_naming_the_key(make_cfg, over, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(**over)


def test_bad_teachers_and_soups_are_refused_before_any_data_loads(make_cfg, base_runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    load_run(base_runs / "a")  # (a finished run, for contrast)
    (unfinished / "config.yaml").write_text((base_runs / "a" / "config.yaml").read_text())
    with pytest.raises(ConfigError, match=r"train.distill.teacher=.*not a finished run.*run not finished"):
        make_cfg(train={"distill": {"teacher": f"run:{unfinished}"}})
    with pytest.raises(ConfigError, match=r"teacher learned other classes .*data.dataset 'synthetic', data.classes None"):
        make_cfg(data={"classes": [0, 1]}, train={"distill": {"teacher": f"run:{base_runs / 'a'}"}})
    with pytest.raises(ConfigError, match="is the run itself"):  # a run directory that is its own teacher
        check_teacher(make_cfg(name="a", train={"distill": {"teacher": f"run:{base_runs / 'a'}"}}), base_runs / "a")
    # a soup of different architectures names both runs
    run_experiment(make_cfg(name="r", model={"backbone": TINY}, train={"epochs": 1}), tmp_path / "r", console=QUIET)
    with pytest.raises(ConfigError, match=r"different architectures: .*/a is transferlab_cnn .*/r is test_efficientnet"):
        make_cfg(kind="soup", soup={"members": [str(base_runs / "a"), str(tmp_path / "r")]})
    run_experiment(make_cfg(name="c2", data={"classes": [0, 1]}, train={"epochs": 1}), tmp_path / "c2", console=QUIET)
    with pytest.raises(ConfigError, match=r"different classes: .*/a has .*/c2 has"):
        make_cfg(kind="soup", soup={"members": [str(base_runs / "a"), str(tmp_path / "c2")]})


# --------------------------------------------------------------------------------------------
# layer decay


def test_layer_decay_groups_are_timms_and_every_group_lr_is_in_the_history(make_cfg, tmp_path):
    cfg = make_cfg(train={"layer_decay": 0.5, "epochs": 1, "weight_decay": 0.01, "schedule": "none"})
    model, _ = build_model(cfg.model, cfg.head, 4)
    groups = layer_decay_groups(model, cfg.train)
    assert groups[0]["name"] == "head" and groups[0]["lr"] == cfg.train.lr
    scales = sorted({g["lr_scale"] for g in groups}, reverse=True)
    assert scales == [0.5 ** i for i in range(len(scales))] and len(scales) >= 3  # one scale per backbone layer group
    assert all(g["weight_decay"] == 0 for g in groups if all(p.ndim <= 1 for p in g["params"]))  # timm: no decay on 1-d
    covered = {id(p) for g in groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters() if p.requires_grad}
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    row = load_run(tmp_path / "run").history[0]
    lrs = [row[f"lr_group{i}"] for i in range(len(groups))]
    assert lrs == pytest.approx([cfg.train.lr * g["lr_scale"] for g in groups])
    assert [g["lr_scale"] for g in m["layer_decay"]["groups"]] == [g["lr_scale"] for g in groups]


# --------------------------------------------------------------------------------------------
# L2-SP


def test_l2_sp_penalty_is_the_closed_form_and_keeps_the_backbone_near_its_start(make_cfg, base_runs, tmp_path):
    cfg = make_cfg(model={"weights": f"run:{base_runs / 'a'}"})
    model, _ = build_model(cfg.model, cfg.head, 4)
    loss = L2SpLoss(torch.nn.CrossEntropyLoss(), model, alpha=0.3, beta=0.2)
    assert float(loss.penalty().detach()) == pytest.approx(0.2 / 2 * sum(float(p.detach().pow(2).sum()) for p in model.head.parameters()), rel=1e-5)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.1)
    n = sum(p.numel() for p in model.backbone.parameters())
    head = 0.2 / 2 * sum(float(p.detach().pow(2).sum()) for p in model.head.parameters())
    assert float(loss.penalty().detach()) == pytest.approx(0.3 / 2 * n * 0.01 + head, rel=1e-4)

    start = {k: v for k, v in build_model(cfg.model, cfg.head, 4)[0].backbone.state_dict().items() if v.is_floating_point()}
    drift = {}
    for alpha in (0.0, 50.0):
        c = make_cfg(name=f"l2sp{alpha}", model={"weights": f"run:{base_runs / 'a'}"},
                     train={"epochs": 2, "lr": 0.05, "l2_sp": {"alpha": alpha, "beta": 0.0}})
        m = run_experiment(c, tmp_path / f"l2sp{alpha}", console=QUIET)
        trained = load_run(tmp_path / f"l2sp{alpha}").load_model().backbone.state_dict()
        drift[alpha] = sum(float((trained[k] - v).pow(2).sum()) for k, v in start.items() if "running" not in k)
        assert m["l2_sp"] == {"alpha": alpha, "beta": 0.0, "start": f"run:{base_runs / 'a'}"}
    assert drift[50.0] < drift[0.0]


# --------------------------------------------------------------------------------------------
# LP-FT


def test_lp_ft_probes_on_cached_features_then_finetunes_and_both_phases_are_in_the_history(make_cfg, tmp_path):
    run_experiment(make_cfg(name="start", model={"backbone": TINY}, train={"epochs": 1}), tmp_path / "start", console=QUIET)
    start = load_run(tmp_path / "start").load_model().backbone.state_dict()
    cfg = make_cfg(model={"backbone": TINY, "weights": f"run:{tmp_path / 'start'}"}, strategy={"name": "lp_ft", "probe_epochs": 2},
                   train={"epochs": 3, "cache": "on"})  # on: the probe phase must cache; the fine-tuning phase has nothing to
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert rows[0].startswith("phase,epoch,") and [r.split(",")[:2] for r in rows[1:]] == [["probe", "1"], ["probe", "2"], ["finetune", "3"]]
    assert m["epochs_run"] == 3 and m["lp_ft"]["probe_epochs"] == 2 and m["lp_ft"]["finetune_epochs"] == 1
    # the probe phase left the backbone exactly at its start (only the head trained, on cached features)
    probe = load_file(str(tmp_path / "run" / "checkpoints" / "probe" / "best.safetensors"))
    assert all(torch.equal(probe[f"model.backbone.{k}"], v) for k, v in start.items())
    assert (tmp_path / "run" / "checkpoints" / "probe" / "last.safetensors").is_file()
    finetuned = load_run(tmp_path / "run").load_model().backbone.state_dict()
    assert any(not torch.equal(finetuned[k], v) for k, v in start.items() if v.is_floating_point())  # then everything trained
    assert m["lp_ft"]["probe_log"] == ["feature cache: cached at pooled"]  # the probe phase: one backbone pass


def test_lp_ft_resumes_bit_identically_in_either_phase(make_cfg, tmp_path, interrupt_and_resume):
    cfg = make_cfg(strategy={"name": "lp_ft", "probe_epochs": 1}, train={"epochs": 3}, head={"type": "mlp", "hidden": 16, "dropout": 0.3})
    full, resumed, a, b = interrupt_and_resume(cfg, tmp_path, die_at=0)  # killed after the first fine-tuning epoch
    _assert_same(a, b, full, resumed)
    full, resumed, a, b = interrupt_and_resume(cfg, tmp_path / "p", die_at=0, directory="probe")  # after the probe
    _assert_same(a, b, full, resumed)


# --------------------------------------------------------------------------------------------
# SWA


def test_swa_averages_the_last_epochs_recomputes_batchnorm_and_is_the_tested_model(make_cfg, tmp_path):
    cfg = make_cfg(train={"epochs": 4, "swa": {"start": 0.5, "lr": 0.005}})
    m = run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert m["swa"]["models"] == 2 and m["swa"]["first_epoch"] == 3 and m["swa"]["batchnorm_recomputed"] > 0
    hist = load_run(tmp_path / "run").history
    assert [r["swa_models"] for r in hist] == [0, 0, 1, 2]
    assert hist[3]["lr"] == pytest.approx(0.005) and hist[1]["lr"] > 0.005  # SWALR: annealed over epoch 3, then constant
    # the tested weights are the average of the epochs' weights with recomputed BatchNorm statistics
    best = load_file(str(tmp_path / "run" / "checkpoints" / "best.safetensors"))
    avg = load_file(str(tmp_path / "run" / "checkpoints" / "last.safetensors"))
    conv = next(k for k in best if k.startswith("model.") and k.endswith("weight") and best[k].ndim == 4)
    assert torch.equal(best[conv], avg["swa." + "module." + conv[len("model."):]])
    assert load_run(tmp_path / "run").export("torchscript", tmp_path / "m.pt").parity.ok


def test_swa_resumes_bit_identically(make_cfg, tmp_path, interrupt_and_resume):
    cfg = make_cfg(train={"epochs": 4, "swa": {"start": 0.5}}, data={"augment": ["flip"]})
    full, resumed, a, b = interrupt_and_resume(cfg, tmp_path, die_at=2)  # inside the averaging
    _assert_same(a, b, full, resumed)
    best_a, best_b = (load_file(str(d / "checkpoints" / "best.safetensors")) for d in (a, b))
    assert best_a.keys() == best_b.keys() and all(torch.equal(best_a[k], best_b[k]) for k in best_a)  # the SWA weights


def test_swa_schedule_state_round_trips_and_frozen_batchnorm_keeps_its_statistics(make_cfg):
    cfg = make_cfg(train={"epochs": 4, "swa": {"start": 0.5, "anneal_epochs": 0}})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = make_scheduler(opt, cfg.train, 3)
    assert isinstance(sched, SwaSchedule) and opt.param_groups[0]["lr"] == pytest.approx(cfg.train.lr)  # unchanged at start
    lrs = []
    for _ in range(12):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[6:] == pytest.approx([cfg.train.lr / 2] * 6)  # from epoch 2: swa lr (half of lr), anneal 0
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    again = make_scheduler(opt2, cfg.train, 3)
    again.load_state_dict(sched.state_dict())
    assert again.steps == 12 and again.get_last_lr() == sched.get_last_lr()

    model, _ = build_model(cfg.model, cfg.head, 4)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.set_frozen_bn([n for n, m in model.named_modules() if m is bns[0]])
    kept = bns[0].running_mean.clone()
    names = recompute_batchnorm(model, [(torch.randn(8, 3, 16, 16) + 3, None)], torch.device("cpu"))
    assert torch.equal(bns[0].running_mean, kept) and len(names) == len(bns) - 1
    assert float(bns[1].running_var.mean()) != 1.0 and not model.training


# --------------------------------------------------------------------------------------------
# distillation


def test_teacher_gets_its_own_size_and_normalisation_and_the_loss_mixes_kl_at_temperature(make_cfg):
    from transferlab.data.normalize import Preprocess

    student, teacher = Preprocess((0.5,), (0.25,), 1), Preprocess((0.1, 0.2, 0.3), (0.2, 0.2, 0.2), 3)
    pixels = torch.randint(0, 256, (2, 1, 8, 8)).float()
    x = student(pixels)
    t = teacher_inputs(x, student, teacher, 16)
    assert t.shape == (2, 3, 16, 16)
    same = teacher_inputs(x, student, teacher, None)
    assert torch.allclose(same, teacher(pixels), atol=1e-4)  # back to pixels, then the teacher's own normalisation

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[2.0, 0.0, -1.0]]).expand(x.shape[0], 3)

    loss = DistillLoss(torch.nn.CrossEntropyLoss(), Fixed(), student, teacher, 16, alpha=0.25, temperature=2.0)
    logits, target = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([1, 0])
    hard = torch.nn.functional.cross_entropy(logits, target)
    assert float(loss(logits, target)) == pytest.approx(float(hard))  # no batch handed over: the hard loss alone
    loss.inputs = x
    p_t = torch.softmax(torch.tensor([2.0, 0.0, -1.0]) / 2, 0)
    kl = sum(float((p_t * (p_t.log() - torch.log_softmax(row / 2, 0))).sum()) for row in logits) / 2
    assert float(loss(logits, target)) == pytest.approx(0.75 * float(hard) + 0.25 * 4 * kl, rel=1e-5)


def test_distillation_from_a_teacher_of_another_size_resumes_bit_identically(make_cfg, base_runs, tmp_path, interrupt_and_resume):
    cfg = make_cfg(data={"image_size": 16, "augment": ["flip"]}, train={"epochs": 3, "distill": {"teacher": f"run:{base_runs / 'a'}", "alpha": 0.7}})
    full, resumed, a, b = interrupt_and_resume(cfg, tmp_path, die_at=1)
    _assert_same(a, b, full, resumed)
    assert full["distill"] == {"teacher": f"run:{base_runs / 'a'}", "alpha": 0.7, "temperature": 4.0}
    assert full["feature_cache"]["used"] is False
    no_kd = run_experiment(make_cfg(data={"image_size": 16, "augment": ["flip"]}, train={"epochs": 3}), tmp_path / "plain", console=QUIET)
    assert load_run(a).history[0]["train_loss"] != load_run(tmp_path / "plain").history[0]["train_loss"]
    assert no_kd["status"] == "ok"


# --------------------------------------------------------------------------------------------
# soups and WiSE-FT


def _states(*values):
    return [{"w": torch.tensor([v]), "n": torch.tensor(7)} for v in values]


def test_uniform_and_greedy_soups_on_hand_made_members():
    states = _states(1.0, 3.0, 10.0)
    assert float(average_states(states)["w"]) == pytest.approx(14 / 3) and int(average_states(states)["n"]) == 7
    # validation accuracy of a candidate soup: best when its weight is near 2
    score = lambda s: 1 - abs(float(s["w"]) - 2) / 10  # noqa: E731
    accs = [score(s) for s in states]  # 0.9, 0.9, 0.2: member 0 first (ties keep the order)
    kept, state, tried = greedy_soup(states, accs, score)
    assert kept == [0, 1] and float(state["w"]) == pytest.approx(2.0)  # (1+3)/2 = 2 improves, adding 10 would not
    assert tried == {1: pytest.approx(1.0), 2: pytest.approx(1 - abs(14 / 3 - 2) / 10)}
    kept, _, _ = greedy_soup(states, [0.1, 0.5, 0.9], score)  # by val accuracy: member 2 (10) first
    assert kept[0] == 2
    w = interpolate_states(states[0], states[2], 0.25)
    assert float(w["w"]) == pytest.approx(0.75 * 1 + 0.25 * 10) and int(w["n"]) == 7


def test_wise_ft_alpha_is_chosen_on_validation_never_on_test():
    curve = [{"alpha": 0.0, "val_acc": 0.5, "test_acc": 0.9}, {"alpha": 0.5, "val_acc": 0.8, "test_acc": 0.6},
             {"alpha": 1.0, "val_acc": 0.8, "test_acc": 0.7}]
    assert curve_choice(curve)["alpha"] == 0.5  # best val (first of equals), although alpha 0 and 1 test better


def test_soups_in_a_study_run_after_their_members_and_are_runs_like_any_other(tmp_path):
    study = {
        "study": "soups",
        "defaults": {"data": {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 128, "val_fraction": 0.25},
                     "model": {"backbone": "transferlab_cnn", "weights": "scratch"},
                     "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu", "precision": "32-true"}},
        "experiments": [
            {"name": "greedy", "kind": "soup", "soup": {"members": ["ft_a", "ft_b"], "method": "greedy"}},
            {"name": "wise", "kind": "soup", "soup": {"members": ["ft_a"], "interpolate": {"base": "run:probe", "alphas": [0.0, 0.5, 1.0]}}},
            {"name": "student", "train": {"distill": {"teacher": "run:ft_a"}}},
            {"name": "ft_a"},
            {"name": "ft_b", "train": {"lr": 0.02}},
            {"name": "probe", "strategy": {"name": "linear_probe"}},
            {"name": "lpft", "strategy": {"name": "lp_ft", "probe_epochs": 1}, "train": {"epochs": 2}},
        ],
    }
    parsed = parse_study(study)
    order = [r.name for r in plan_study(parsed, tmp_path / "soups")]
    assert order.index("ft_a") < order.index("greedy") and order.index("ft_b") < order.index("greedy")
    assert order.index("probe") < order.index("wise") and order.index("ft_a") < order.index("student")
    result = run_study(parsed, tmp_path, console=QUIET)
    assert result.ok, result.failed
    runs = tmp_path / "soups"
    greedy, wise = load_run(runs / "greedy"), load_run(runs / "wise")
    assert greedy.config.model.backbone == "transferlab_cnn" and set(greedy.config.soup.fingerprints) == {str(runs / "ft_a"), str(runs / "ft_b")}
    assert greedy.metrics["checkpoint_bytes"] > 0 and load_run(runs / "ft_a").metrics["checkpoint_bytes"] > 0  # compare's size
    assert greedy.metrics["soup"]["chosen"][0] in (str(runs / "ft_a"), str(runs / "ft_b"))
    wf = wise.metrics["wise_ft"]
    assert wf["chosen_on"] == "val" and [r["alpha"] for r in wf["curve"]] == [0.0, 0.5, 1.0]
    assert wf["chosen_alpha"] == max(wf["curve"], key=lambda r: r["val_acc"])["alpha"]
    assert [r["alpha"] for r in wise.history] == [0.0, 0.5, 1.0]  # history.csv: a row per alpha
    assert not math.isnan(wise.history[0]["val_acc"])
    # BatchNorm statistics both ways per alpha, the better on val kept; interpolated, the curve's ends are the two models
    for row in wf["curve"]:
        assert row["bn"] in ("interpolated", "recomputed")
        assert row["val_acc"] == max(row["val_acc_interpolated_bn"], row["val_acc_recomputed_bn"])
    for alpha, end in ((0.0, load_run(runs / "probe")), (1.0, load_run(runs / "ft_a"))):
        row = next(r for r in wf["curve"] if r["alpha"] == alpha)
        assert row["val_acc_interpolated_bn"] == pytest.approx(end.metrics["best_val"], abs=1.01 / end.metrics["n_val"])
    # the soup's weights are its checkpoint: load_run, export (with parity) work on it
    model = greedy.load_model()
    assert type(model).__name__ == "TransferModel"
    assert greedy.export("torchscript", tmp_path / "soup.pt").parity.ok
    assert load_run(runs / "student").metrics["distill"]["teacher"] == f"run:{runs / 'ft_a'}"
    report = build_report(runs)  # the WiSE-FT curve over alpha, LP-FT's phases marked in its learning curves
    html = report.html_path.read_text()
    assert "learning curves of wise" in html and "learning curves of lpft" in html

    # a member changed after the soup ran is reported on --resume, a deleted one too; never silently reused
    ckpt = runs / "ft_b" / "checkpoints" / "best.safetensors"
    state = load_file(str(ckpt))
    head = next(k for k in state if k.startswith("model.head.") and state[k].is_floating_point())
    state[head] = state[head] + 1
    from transferlab.files import read_checkpoint_metadata, save_checkpoint

    save_checkpoint(ckpt, {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, read_checkpoint_metadata(ckpt))
    with pytest.raises(RunRefused, match=r"soup.fingerprints"):
        run_experiment(greedy.config, runs / "greedy", resume=True, console=QUIET)
    import shutil

    shutil.rmtree(runs / "ft_b")
    with pytest.raises(RunRefused, match=r"soup.fingerprints.*ft_b: '[0-9a-f]{64}' → 'missing'"):
        run_experiment(greedy.config, runs / "greedy", resume=True, console=QUIET)
    with pytest.raises(SoupError, match=r"soup member .*ft_b.*: no run directory"):
        run_experiment(greedy.config, tmp_path / "again", console=QUIET)
    assert run_study(parsed, tmp_path, resume=True, only=["wise"], console=QUIET).ok  # the others' resume check is lenient
    assert transferlab.load_run(runs / "wise").ok
