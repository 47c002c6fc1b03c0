"""``transferlab auto``'s choices: the fine-tune method(s) from measured costs and the budget, LoRA left out without
``peft``, the soup as a final candidate only when it wins on validation — and, end to end, a LoRA model chosen and
written to ``auto_study.yaml``, a soup chosen and tested once.

The decision functions (``transferlab.tools.auto_plan``) are tested with given costs and scores; the end-to-end runs use
tiny PNG folders, timm's ``test_resnet`` / ``test_efficientnet`` (random weights) and short epoch lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import test_auto
from transferlab.cli import main
from transferlab.config import load_study
from transferlab.engine.costs import Cost
from transferlab.engine.features import STORE
from transferlab.results.report import build_report
from transferlab.tools import auto as auto_mod
from transferlab.tools import auto_plan
from transferlab.tools.auto import AUTO_STUDY, SOUP_NAME, Auto, AutoState, CandidateCost, Splits, auto, make_plan, print_plan
from transferlab.tools.auto_plan import ARMS_MIN_EPOCHS, FinalOption, choose_final, choose_finetune, soup_members
from transferlab.tools.rank import parse_candidates

CANDIDATES, OPTIONS = test_auto.CANDIDATES, test_auto.OPTIONS
images = test_auto.images  # the fixture: the tiny PNG class folders of test_auto
PEFT_MISSING = "HF peft is not installed (pip install 'transferlab[peft]')"


@pytest.fixture(autouse=True)
def _fresh_store():
    STORE.clear()
    yield
    STORE.clear()


# --------------------------------------------------------------------------------------------- the fine-tune method


def fake_run_s(method: str, epochs: int, final: bool) -> float:
    """Given costs: a full epoch 10 s, a LoRA epoch 4 s; LP-FT's first epoch is one backbone pass (3 s)."""
    return {"lp_ft": 3 + 10 * (epochs - 1), "finetune": 10 * epochs, "lora": 4 * epochs}[method]


ALL = ["lp_ft", "finetune", "lora"]


def test_every_method_as_an_arm_when_the_budget_fits_them():
    ft = choose_finetune(fake_run_s, ALL, 1, room=400, final_reserved=0)
    # 3 arms at 4 epochs (33 + 40 + 16), the better 2 at 8 (2 × 80), the final run at 8 (80): 329 s
    assert ft is not None and ft.methods == ALL and ft.rungs == [(3, 4), (2, 8)] and ft.seconds == 249 and ft.final_s == 80
    assert ft.epochs >= ARMS_MIN_EPOCHS and "arm" in ft.why


def test_lp_ft_alone_when_the_arms_do_not_fit():
    ft = choose_finetune(fake_run_s, ALL, 1, room=200, final_reserved=0)
    assert ft is not None and ft.methods == ["lp_ft"] and ft.rungs == [(1, 8)]  # 73 + 73 fits 200; 12 epochs (2 × 113) does not
    assert "LP-FT alone" in ft.why


def test_lora_when_not_even_a_short_lp_ft_run_fits():
    ft = choose_finetune(fake_run_s, ALL, 1, room=20, final_reserved=0)
    assert ft is not None and ft.methods == ["lora"] and ft.rungs == [(1, 2)]  # LP-FT 2 epochs: 2 × 13 = 26 > 20; LoRA: 2 × 8
    assert "LoRA alone" in ft.why
    assert choose_finetune(fake_run_s, ALL, 1, room=10, final_reserved=0) is None  # nothing fits: probes only


def test_without_lora_the_arms_are_lp_ft_and_full_and_nothing_replaces_lora():
    ft = choose_finetune(fake_run_s, ["lp_ft", "finetune"], 1, room=400, final_reserved=0)
    assert ft is not None and ft.methods == ["lp_ft", "finetune"] and ft.rungs == [(2, 12)]  # 113 + 120 + final 120 = 353
    assert choose_finetune(fake_run_s, ["lp_ft", "finetune"], 1, room=20, final_reserved=0) is None


def test_more_candidates_first_and_the_reserved_final_counts():
    ft = choose_finetune(fake_run_s, ALL, 3, room=400, final_reserved=0)
    assert ft is not None and ft.finetunes == 3 and ft.methods == ["lp_ft"]  # 9 arms do not fit 400 s; 3 LP-FT candidates do
    loose = choose_finetune(fake_run_s, ["lp_ft"], 1, room=140, final_reserved=0)
    reserved = choose_finetune(fake_run_s, ["lp_ft"], 1, room=140, final_reserved=60)  # a probe's final is kept already
    assert loose is not None and reserved is not None and reserved.epochs > loose.epochs


def splits(tmp_path: Path, folds: int | None = None) -> Splits:
    return Splits(tmp_path / "dev.csv", tmp_path / "final.csv", n_pool=2000, n_test=500, n_classes=3, folds=folds)


def costs(lora: bool) -> dict:
    cands = parse_candidates(["test_resnet:scratch", "test_efficientnet:scratch"])
    return {c: CandidateCost(16, 1e-4, 2e-2, lora_step=1e-2 if lora else None, lora_why=None if lora else PEFT_MISSING) for c in cands}


def test_the_plan_uses_each_methods_measured_cost(tmp_path):
    cc = costs(lora=True)
    plan = make_plan(list(cc), cc, splits(tmp_path), 3600, "cpu")
    assert plan.methods == ALL and "finetune" in plan.stages and plan.stages["final"] > 0
    assert any("every method as an arm" in n for n in plan.notes) and "soup" in plan.stages
    tight = make_plan(list(cc), cc, splits(tmp_path), plan.minimum_s + 5, "cpu")  # little room: never more than fits
    assert tight.total_s <= plan.minimum_s + 5 + 1e-6 and "finetune" not in tight.stages
    folds = make_plan(list(cc), cc, splits(tmp_path, folds=5), 3600, "cpu")
    assert "soup" not in folds.stages and any("no ensemble or soup stage" in n for n in folds.notes)


def test_the_training_step_is_extrapolated_from_two_batches_not_scaled_from_one(tmp_path, monkeypatch):
    """A step has a fixed part (the optimiser step, per-layer overheads): timing batches 8 and 16 and following the line
    through both to the training batch of 32 keeps it once; scaling the batch-8 step by four counted it four times."""
    seen: list[int] = []

    def fake_measure_cost(model, cfg, side, classes, train):
        seen.append(cfg.train.batch_size)
        return Cost(0.1 + 0.01 * cfg.train.batch_size if train else None, 1e-3)

    monkeypatch.setattr(auto_mod, "measure_cost", fake_measure_cost)
    c = parse_candidates(["test_resnet:scratch"])[0]
    cost = auto_mod.measure(c, 16, splits(tmp_path), train=True)
    assert seen == [auto_mod.MEASURE_BATCH, 2 * auto_mod.MEASURE_BATCH] and cost.forward == 1e-3
    assert cost.step == pytest.approx(0.1 + 0.01 * auto_mod.TRAIN["batch_size"])  # not 4 x 0.18
    seen.clear()
    assert auto_mod.measure(c, 16, splits(tmp_path), train=False).step is None and seen == [auto_mod.MEASURE_BATCH]


def test_lp_ft_gives_its_head_many_cheap_probe_epochs_counted_as_one(tmp_path):
    """LP-FT's probe phase runs on cached features: its epochs cost one backbone pass together, so auto gives the head
    ``LP_FT_PROBE_EPOCHS`` of them (one gave a small folder's head 7 steps) and counts the phase as one epoch."""
    c = parse_candidates(["test_resnet:scratch"])[0]
    e = auto_mod.finetune_exp(c, 2, {}, "cpu", 0, "lp_ft")
    assert e["name"].endswith(".lp_ft.e2") and e["strategy"]["probe_epochs"] == auto_mod.LP_FT_PROBE_EPOCHS > 1
    assert e["train"]["epochs"] - e["strategy"]["probe_epochs"] == 1  # then one epoch of everything
    assert auto_mod.finetune_exp(c, 2, {}, "cpu", 0, "finetune")["train"]["epochs"] == 2
    cc, sizes = CandidateCost(16, 1e-4, 2e-2), (800, 200, 200)  # a pass: 0.1 s; a training epoch: 0.5 s
    lp_ft = auto_mod.estimate(e, cc, sizes)
    full = auto_mod.estimate(auto_mod.finetune_exp(c, 2, {}, "cpu", 0, "finetune"), cc, sizes)
    one_probe = auto_mod.estimate(e | {"strategy": {"name": "lp_ft", "probe_epochs": 1}, "train": e["train"] | {"epochs": 2}}, cc, sizes)
    assert lp_ft == pytest.approx(one_probe) and lp_ft < full  # 20 probe epochs cost what one did: one pass


def test_without_peft_lora_is_left_out_and_the_plan_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(auto_mod, "lora_unavailable", lambda: PEFT_MISSING)
    cands = parse_candidates(["test_resnet:scratch"])
    sp = splits(tmp_path)
    measured = auto_mod.measure_all(cands, {cands[0]: 16}, sp, Console(quiet=True))  # measures; no LoRA, no failure
    assert measured[cands[0]].lora_step is None and measured[cands[0]].lora_why == PEFT_MISSING
    plan = make_plan(cands, measured, sp, 3600, "cpu")
    assert "lora" not in plan.methods and plan.finetunes == 1
    assert f"LoRA left out: {PEFT_MISSING}" in plan.notes
    console = Console(record=True, width=250)
    a = Auto(tmp_path, 3600, cands, sp, AutoState(tmp_path, {}, False), console, "cpu", 0, 16, {}, costs=measured)
    print_plan(a, plan)
    out = console.export_text()
    assert "left out" in out and f"note: LoRA left out: {PEFT_MISSING}" in out


def test_after_the_probes_the_fine_tune_is_planned_at_the_chosen_candidates_costs(tmp_path):
    """The first plan must cost every fine-tune at the dearest candidate (the ranking is not known yet); once the probes
    have ranked the candidates, the fine-tune stage is sized again at the costs of those it will fine-tune."""
    cheap, dear = parse_candidates(["test_resnet:scratch", "test_efficientnet:scratch"])
    cc = {cheap: CandidateCost(16, 1e-4, 2e-2), dear: CandidateCost(16, 5e-3, 2.0)}  # the dear one: 100x the step
    sp, by_name = splits(tmp_path), {str(cheap): cheap, str(dear): dear}

    def replanned(budget: float, scored: list[str], folder: str) -> tuple[auto_mod.AutoPlan, Auto]:
        plan = make_plan([cheap, dear], cc, sp, budget, "cpu")
        assert plan.finetunes == 0 and any(n.startswith("no fine-tuning") for n in plan.notes)  # at the dear one's cost
        (tmp_path / folder).mkdir()
        left = budget - plan.stages["rank"] - plan.stages["probes"]  # as if the probes took their plan
        a = Auto(tmp_path / folder, left, [cheap, dear], sp, AutoState(tmp_path / folder, {}, False), Console(quiet=True), "cpu",
                 0, 16, {}, costs=cc)
        auto_mod.replan_finetune(a, plan, scored, by_name)
        return plan, a

    plan, a = replanned(200, [str(cheap), str(dear)], "cheap_first")  # the cheap one probed best: its fine-tune fits
    assert plan.finetunes == 1 and "finetune" in plan.stages and plan.methods
    assert plan.stages["finetune"] + plan.stages.get("ensemble", 0) + plan.stages.get("soup", 0) + plan.stages["final"] <= a.left()
    assert not any(n.startswith("no fine-tuning") for n in plan.notes)
    assert any(n.startswith(f"re-planned after the probes, at the costs of {cheap}") for n in plan.notes)
    assert json.loads((tmp_path / "cheap_first" / auto_mod.STATE_FILE).read_text())["plan"]["finetunes"] == 1  # what --resume reads
    plan, _ = replanned(200, [str(dear), str(cheap)], "dear_first")  # the dear one probed best: still nothing fits
    assert plan.finetunes == 0 and "finetune" not in plan.stages and "no fine-tune fits" in plan.notes[-1]
    (tmp_path / "started" / "finetune_r0").mkdir(parents=True)  # a fine-tune already started (resumed): its arms stay
    plan = make_plan([cheap, dear], cc, sp, 200, "cpu")
    a = Auto(tmp_path / "started", 150, [cheap, dear], sp, AutoState(tmp_path / "started", {}, False), Console(quiet=True), "cpu", 0,
             16, {}, costs=cc)
    auto_mod.replan_finetune(a, plan, [str(cheap), str(dear)], by_name)
    assert plan.finetunes == 0 and not any(n.startswith("re-planned") for n in plan.notes)


# --------------------------------------------------------------------------------------------- the final candidate


def test_a_soup_is_chosen_only_when_it_beats_the_others_on_validation():
    single = FinalOption("a.lp_ft.e8", 0.80, 10)
    soup = FinalOption(SOUP_NAME, 0.85, 30, "soup", {"members": ["a.lp_ft.e8", "a.finetune.e4"]})
    vote = FinalOption("soft_vote", 0.82, 20, "ensemble", {"members": ["a.lp_ft.e8", "b.logistic"]})
    pick, why = choose_final(single, [vote, soup], left=100)
    assert pick is soup and "below greedy_soup" in why["soft_vote"] and "below greedy_soup" in why["a.lp_ft.e8"]
    tie = FinalOption(SOUP_NAME, 0.80, 30, "soup")
    pick, why = choose_final(single, [tie], left=100)
    assert pick is single and "does not beat the best single model" in why[SOUP_NAME]
    pick, why = choose_final(single, [vote, soup], left=25)  # the soup's final runs do not fit: the vote's do
    assert pick is vote and "need ~30s, 25s left" in why[SOUP_NAME]
    pick, why = choose_final(single, [FinalOption(SOUP_NAME, None, 30, "soup")], left=100)
    assert pick is single and why[SOUP_NAME] == "did not run or failed"
    better_vote = FinalOption("soft_vote", 0.86, 20, "ensemble")
    assert choose_final(single, [better_vote, soup], left=100)[0] is better_vote


def test_soup_members_are_one_candidates_lp_ft_and_full_fine_tunes():
    models = {
        "a.logistic": {"candidate": "a", "kind": "logistic", "val_acc": 0.95},
        "a.lp_ft.e4": {"candidate": "a", "kind": "lp_ft", "val_acc": 0.80},
        "a.finetune.e4": {"candidate": "a", "kind": "finetune", "val_acc": 0.82},
        "a.lora.e4": {"candidate": "a", "kind": "lora", "val_acc": 0.99},
        "b.lp_ft.e4": {"candidate": "b", "kind": "lp_ft", "val_acc": 0.90},  # the best fine-tune, but alone
    }
    assert soup_members(models) == ["a.finetune.e4", "a.lp_ft.e4"]
    models["b.finetune.e8"] = {"candidate": "b", "kind": "finetune", "val_acc": 0.70}
    assert soup_members(models) == ["b.lp_ft.e4", "b.finetune.e8"]
    assert soup_members({"a.lora.e4": models["a.lora.e4"], "a.lora.e8": {**models["a.lora.e4"], "val_acc": 0.5}}) == []


# --------------------------------------------------------------------------------------------- end to end


def final_readers(folder: Path) -> set[str]:
    """The experiments whose runs read ``final.csv`` (the test split), each checked to be in the final study."""
    readers = set()
    for run in (p.parent for p in folder.rglob("config.yaml")):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        if "data" not in cfg:  # an ensemble: it reads its members' predictions, not images
            continue
        root = cfg["data"]["root"]
        assert root in (str(folder / "data" / "dev.csv"), str(folder / "data" / "final.csv")), run
        if root.endswith("final.csv"):
            assert run.parent.name == "final", run
            readers.add(run.name.split(".seed")[0])
    return readers


def winning(monkeypatch: pytest.MonkeyPatch, wins) -> None:
    """Dev runs whose experiment name ``wins`` get validation accuracy 1.0 (what auto reads back), the rest their own."""
    real = auto_mod.Auto.run

    def run(self, name, experiments, required=0):
        accs, skipped = real(self, name, experiments, required)
        return {k: (1.0 if wins(k) else v) for k, v in accs.items()}, skipped

    monkeypatch.setattr(auto_mod.Auto, "run", run)
    monkeypatch.setattr(auto_mod, "KFOLD_BELOW", 10)  # one holdout: the ensemble and soup stages run
    monkeypatch.setattr(auto_plan, "FT_EPOCHS", (4, 2))  # short rungs: 4, 8, 16 epochs
    monkeypatch.setattr(auto_mod, "MAX_FINAL_SEEDS", 1)


def test_a_lora_model_is_chosen_and_written_to_the_study_file(images, tmp_path, monkeypatch):
    winning(monkeypatch, lambda name: ".lora." in name)
    console = Console(record=True, width=250)
    doc = auto(images, "10m", CANDIDATES, runs_dir=tmp_path, options=OPTIONS, accelerator="cpu", console=console)
    out = console.export_text()
    assert out.index("budget plan") < out.index("LP-FT / full fine-tune / LoRA as arms") < out.index("stage finetune")
    assert doc["finetune_methods"] == ["lp_ft", "finetune", "lora"]
    assert {m["kind"] for m in doc["models"].values()} >= {"lp_ft", "finetune", "lora"}
    ch = doc["chosen"]
    assert ch["kind"] == "lora" and ".lora." in ch["model"] and ch["test_acc"] is not None
    assert any(d.get("method") in ("lp_ft", "finetune") and "arm" in d["why"] for d in doc["dropped"])  # the halving dropped arms
    assert doc["soup"].get("members") and doc["soup"].get("kept") is False  # a real soup ran, and lost to the 1.0
    folder = tmp_path / "auto_shapes"
    study = load_study(folder / AUTO_STUDY)
    lora = [e for e in study.experiments if e.strategy.name == "lora"]
    assert lora and len(ch["experiments"]) == 1 and ch["experiments"][0] in {e.name for e in lora}
    assert main(["plan", str(folder / AUTO_STUDY), "--runs-dir", str(folder / "replan")]) == 0
    assert final_readers(folder) == set(ch["experiments"])
    md = build_report(folder / "final").md_path.read_text()
    assert "lora.e" in md and "every method as an arm" in md and "soup of" in md


def test_a_soup_that_wins_on_validation_is_the_final_model_tested_once(images, tmp_path, monkeypatch):
    winning(monkeypatch, lambda name: name == SOUP_NAME)
    doc = auto(images, "10m", CANDIDATES, runs_dir=tmp_path, options=OPTIONS, accelerator="cpu")
    ch = doc["chosen"]
    assert ch["model"] == SOUP_NAME and ch["kind"] == "soup" and len(ch["members"]) >= 2 and ch["test_acc"] is not None
    assert doc["final_choice"]["chosen"] == SOUP_NAME and ch["experiments"][-1] == SOUP_NAME
    assert {doc["models"][k]["kind"] for k in ch["members"]} <= {"lp_ft", "finetune"}
    folder = tmp_path / "auto_shapes"
    raw = yaml.safe_load((folder / AUTO_STUDY).read_text())
    soup = next(e for e in raw["experiments"] if e["name"] == SOUP_NAME)
    assert soup["kind"] == "soup" and soup["soup"]["method"] == "greedy" and soup["soup"]["members"] == ch["experiments"][:-1]
    assert final_readers(folder) == set(ch["experiments"])  # the soup and its members only, in the final stage
    dev_soup = json.loads((folder / "soup" / SOUP_NAME / "metrics.json").read_text())
    assert dev_soup["status"] == "ok"
    assert any("soup" in n and "chosen" in n for n in doc["plan_notes"])


def test_a_resumed_fine_tune_goes_on_with_its_arms(images, tmp_path, monkeypatch):
    """Killed in the second rung: ``--resume`` keeps the first invocation's methods and rungs (not a new plan made with less
    time left), so the first rung's runs are reused, not trained again."""
    real = auto_mod.run_study
    calls: list[str] = []

    def killed_in_rung_1(study, *args, **kwargs):
        calls.append(study.name)
        if study.name == "finetune_r1" and calls.count("finetune_r1") == 1:
            raise KeyboardInterrupt
        return real(study, *args, **kwargs)

    monkeypatch.setattr(auto_mod, "run_study", killed_in_rung_1)
    winning(monkeypatch, lambda name: False)  # no forced winner: only the holdout, the short rungs and one final seed
    kw = dict(runs_dir=tmp_path, options=OPTIONS, accelerator="cpu", name="k")
    with pytest.raises(KeyboardInterrupt):
        auto(images, "10m", CANDIDATES, **kw)
    folder = tmp_path / "k"
    first = json.loads((folder / auto_mod.STATE_FILE).read_text())["plan"]
    rung0 = {p: p.stat().st_mtime_ns for p in (folder / "finetune_r0").glob("*/metrics.json")}
    assert len(rung0) == 6 and "finetune" not in json.loads((folder / auto_mod.STATE_FILE).read_text())["stages"]
    console = Console(record=True, width=250)
    doc = auto(images, "10m", CANDIDATES, resume=True, console=console, **kw)
    assert doc["finetune_methods"] == first["methods"] and "resumed with the arms it started" in console.export_text()
    assert {p: p.stat().st_mtime_ns for p in rung0} == rung0  # the first rung's runs were reused
    assert doc["chosen"]["test_acc"] is not None
