"""Issue 27 §3: the eight reliability defects found by a careless or unlucky user, each reproduced here.

1. a killed driver's local workers die with it; a lock whose holder died is stale, a live holder's is not;
2. one driver per study folder; a run refused by its lock gets no failure record;
3. search distributions checked against the key's type; a changed search space refused; ``trials:`` kept with two drivers;
4. ``data.folds`` above the smallest class: one config error, nothing written;
5. a YAML alias bomb refused at once;
6. symlink loops in folder datasets not followed, and said;
7. ``run`` refuses what ``check-data`` rejects, with the same message;
8. ``plan``: one probe per cost, unknown sizes for missing data; pickled weights refused without torch's advice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from data_fixtures import write_folder
from transferlab.config import ConfigError, ExperimentConfig, from_dict, load_study, parse_study
from transferlab.config.scaling import parse_search
from transferlab.config.study import sweep_keys
from transferlab.data.check import check_path
from transferlab.data.folder import scan_folder
from transferlab.data.sources import DatasetError, load_dataset
from transferlab.engine.costs import Cost
from transferlab.kinds import run_experiment
from transferlab.models.weights import WeightsError, read_state_file
from transferlab.rundir import RunError, run_lock
from transferlab.rundir.rundir import RunLocked, study_lock
from transferlab.study import dryrun, run_study
from transferlab.study.dryrun import dry_run, print_plan
from transferlab.study.search import SearchDriver

QUIET = Console(quiet=True)
HOST = socket.gethostname()

TINY = {
    "data": {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 64, "val_fraction": 0.25},
    "model": {"backbone": "transferlab_cnn"},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "progress": False, "accelerator": "cpu", "precision": "32-true",
              "checkpoint_every_minutes": None},
}


def _study(name: str, experiments: list[dict], **extra) -> dict:
    return {"study": name, "defaults": json.loads(json.dumps(TINY)), "experiments": experiments, **extra}


def _holder(code: str, *args: str) -> subprocess.Popen:
    """A Python process that runs ``code`` (with ``sys.argv[1:] == args``) and says 'ready' on stdout when it holds what it holds."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, text=True)


def _holding(lock: str, path: Path) -> subprocess.Popen:
    """Another process that holds ``lock`` (``run_lock`` or ``study_lock``) of ``path`` until killed; returns once it does."""
    proc = _holder(f"""
        import sys, time
        from transferlab.rundir.rundir import {lock}
        with {lock}(sys.argv[1]):
            print("ready", flush=True)
            time.sleep(120)
        """, str(path))
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))} if root.exists() else {}


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    alive = list(pids)
    while alive and time.time() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.2)
    return alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------------------------
# 1. a killed driver leaves no live workers; stale locks


@pytest.mark.skipif(sys.platform != "linux", reason="kill -9 of a process group member and /proc are Linux's")
def test_a_killed_driver_takes_its_local_workers_with_it(tmp_path):
    raw = _study("orphans", [{"name": "a"}, {"name": "b"}])
    raw["defaults"]["train"].update(epochs=1000, batch_size=8, checkpoint_every_steps=2)  # still training long after the kill
    study_file = tmp_path / "orphans.yaml"
    study_file.write_text(json.dumps(raw))
    study_dir = tmp_path / "runs" / "orphans"
    driver = subprocess.Popen([sys.executable, "-m", "transferlab.cli", "run", str(study_file), "--runs-dir", str(tmp_path / "runs"),
                               "--executor", "local", "--workers", "2", "--no-report"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: dict[str, int] = {}
    try:
        deadline = time.time() + 240
        while len(workers) < 2 or not all((study_dir / n / "checkpoints" / "last.safetensors").is_file() for n in workers):
            assert driver.poll() is None, f"the study ended before it could be killed: {driver.stderr.read()[-2000:]}"
            assert time.time() < deadline, "the workers did not start"
            for n in ("a", "b"):
                try:
                    workers[n] = json.loads((study_dir / ".attempts" / f"{n}.json").read_text())["pid"]
                except (OSError, ValueError, KeyError):
                    pass
            time.sleep(0.1)
        assert all(_alive(p) for p in workers.values()), "a worker finished before the driver was killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        left = _wait_gone(list(workers.values()), timeout=30)
        assert not left, f"workers {left} outlived their driver (killed by SIGKILL)"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in workers.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    for n in ("a", "b"):  # nothing holds the runs any more: --resume may take them (it said "being written by another process")
        with run_lock(study_dir / n):
            pass
    with study_lock(study_dir):
        pass
    assert not any((study_dir / n / "metrics.json").exists() for n in ("a", "b"))  # killed mid-run: --resume continues them


def test_a_lock_whose_holder_died_is_stale_and_a_live_holders_is_refused(tmp_path):
    run_dir = tmp_path / "study" / "exp"
    # the holder takes the lock, forks a child that inherits the lock's descriptor (as a data-loader process would),
    # and dies: the flock stays held by the orphan, but the recorded holder is gone
    orphaning = _holder("""
        import os, sys, time
        from transferlab.rundir import run_lock
        held = run_lock(sys.argv[1])  # kept referenced: a collected context manager would release the lock
        held.__enter__()
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print(child, flush=True)
        os._exit(0)
        """, str(run_dir))
    orphan = int(orphaning.stdout.readline())
    orphaning.wait()
    try:
        assert _alive(orphan)
        assert f"pid {orphaning.pid} on {HOST}" in (run_dir.parent / ".exp.lock").read_text()
        with run_lock(run_dir):  # stale: taken over
            assert (run_dir.parent / ".exp.lock").read_text() == f"pid {os.getpid()} on {HOST}"
    finally:
        os.kill(orphan, signal.SIGKILL)
    live = _holding("run_lock", run_dir)
    try:
        with pytest.raises(RunLocked, match=rf"{run_dir} is being written by another process \(pid {live.pid} on {HOST}\)"):
            with run_lock(run_dir):
                pass
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------------------------
# 2. one driver per study folder; never write into a folder another process holds


def test_a_second_invocation_of_a_study_is_refused_at_once_and_writes_nothing(tmp_path):
    raw = _study("twice", [{"name": "a"}])
    runs = tmp_path / "runs"
    first = _holding("study_lock", runs / "twice")
    try:
        before = _files(runs)
        with pytest.raises(RunLocked, match=rf"study folder {runs / 'twice'} is being run by another process \(pid {first.pid} on {HOST}\)"):
            run_study(parse_study(raw), runs, console=QUIET, executor="local", workers=2)
        assert _files(runs) == before and not (runs / "twice").exists()
    finally:
        first.kill()
        first.wait()
    assert run_study(parse_study(raw), runs, console=QUIET).ok  # the lock died with its holder


def test_a_run_refused_by_its_lock_gets_no_failure_record_in_the_folder_it_does_not_hold(tmp_path):
    raw = _study("held", [{"name": "a"}, {"name": "b"}])
    run_dir = tmp_path / "runs" / "held" / "a"
    other = _holding("run_lock", run_dir)
    try:
        res = run_study(parse_study(raw), tmp_path / "runs", console=QUIET)
    finally:
        other.kill()
        other.wait()
    assert "is being written by another process" in res.failed["a"] and res.finished == ["b"]
    assert not (run_dir / "metrics.json").exists()


# --------------------------------------------------------------------------------------------
# 3. search: the key's type, a changed space, two drivers on one storage


def test_a_search_distribution_that_cannot_fit_its_key_is_a_config_error_before_anything_is_written(tmp_path):
    raw = _study("typed", [{"name": "tune", "search": {"space": {"train.batch_size": {"uniform": [16, 64]}}, "trials": 2}}])
    with pytest.raises(ConfigError, match=r"search\.space\.train\.batch_size: \{uniform: \[16, 64\]\} draws real numbers .* "
                                          r"but train\.batch_size expects an integer: use \{int: \[16, 64\]\}"):
        parse_study(raw)
    raw["experiments"][0]["search"]["space"] = {"train.optimizer": {"int": [0, 3]}}
    with pytest.raises(ConfigError, match=r"train\.optimizer: \{int: \[0, 3\]\} draws integers .* expects a string"):
        parse_study(raw)
    raw["experiments"][0]["search"]["space"] = {"train.batch_size": {"int": [16, 64]}, "train.lr": {"log_uniform": [1e-4, 0.1]}}
    assert parse_study(raw).searches["tune"].trials == 2


def _driver(make_cfg, study_dir: Path, space: dict, trials: int = 4, storage: str | None = None, overwrite: bool = False) -> SearchDriver:
    spec = parse_search({"space": space, "trials": trials, "sampler": "random"}, "search", sweep_keys())
    return SearchDriver("tune", spec, make_cfg(name="tune"), study_dir, storage, overwrite)


def test_a_changed_search_space_is_refused_naming_the_change(tmp_path, make_cfg):
    old = {"train.lr": {"log_uniform": [1e-4, 0.1]}}
    driver = _driver(make_cfg, tmp_path / "s", old)
    assert driver.next_trial(0) is not None  # left running, as by an interrupted study
    assert _driver(make_cfg, tmp_path / "s", old).next_trial(0).resume  # the same space: the trial continues
    new = {"train.lr": {"uniform": [1e-4, 0.1]}, "head.dropout": {"choice": [0.0, 0.5]}}
    with pytest.raises(RunError, match=r"(?s)search tune in .*search\.db was made with another search.*2 changes.*"
                                       r"space\.head\.dropout: \(none\) → \{choice: \[0\.0, 0\.5\]\}.*"
                                       r"space\.train\.lr: \{log_uniform: \[0\.0001, 0\.1\]\} → \{uniform: \[0\.0001, 0\.1\]\}.*--overwrite"):
        _driver(make_cfg, tmp_path / "s", new)
    fresh = _driver(make_cfg, tmp_path / "s", new, overwrite=True)  # --overwrite starts the search again
    slot = fresh.next_trial(0)
    assert slot.number == 0 and not slot.resume and set(slot.params) == {"train.lr", "head.dropout"}


def test_two_drivers_on_one_search_storage_ask_no_more_than_trials(tmp_path, make_cfg):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    space = {"train.lr": {"log_uniform": [1e-4, 0.1]}}
    a, b = (_driver(make_cfg, tmp_path / d, space, trials=4, storage=url) for d in ("a", "b"))
    got = {"a": [], "b": []}
    for k in range(4):  # both drivers have 4 slots and ask in turns, while the other's trials are running
        for name, d in (("a", a), ("b", b)):
            slot = d.next_trial(k)
            got[name].append(None if slot is None else slot.number)
    numbers = [n for ns in got.values() for n in ns if n is not None]
    assert sorted(numbers) == [0, 1, 2, 3], got  # each trial asked once, by one driver; no fifth trial
    assert len(a.study.get_trials()) == 4


# --------------------------------------------------------------------------------------------
# 4. data.folds too large for the data


def test_data_folds_above_the_smallest_class_is_one_config_error_before_anything_is_written(tmp_path):
    study_file = tmp_path / "folds.yaml"
    raw = _study("folds", [{"name": "cv", "data": {"dataset": "digits", "folds": 1000}}])
    study_file.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=rf"{study_file}: experiment 'cv': data\.folds=1000 but class '8' of digits has only 174 images "
                                          r"\(1797 images in all.*\): the largest data\.folds that works is 174"):
        run_study(load_study(study_file), tmp_path / "runs", console=QUIET)
    assert not (tmp_path / "runs").exists()
    report = dry_run(load_study(study_file), tmp_path / "runs", probe=False)
    assert any("the largest data.folds that works is 174" in p for p in report.problems)


# --------------------------------------------------------------------------------------------
# 5. a YAML alias bomb


BOMB = "\n".join(['lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
                 + [f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
                 + ["study: bomb", "experiments: [{name: a}]"])


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    code = ("import sys\nfrom transferlab.config import ConfigError, load_study\n"
            "try:\n    load_study(sys.argv[1])\nexcept ConfigError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)  # it hung before
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{path}: the aliases (*name) from line" in proc.stdout and "alias bomb" in proc.stdout
    ok = tmp_path / "anchors.yaml"  # ordinary anchors and merges still load
    ok.write_text("study: s\ndefaults: &d {data: {dataset: digits}}\nexperiments:\n  - {name: a, <<: *d}\n  - {name: b, <<: *d}\n")
    assert [c.data.dataset for c in load_study(ok).experiments] == ["digits", "digits"]
    loop = tmp_path / "loop.yaml"
    loop.write_text("study: s\nx: &x [1, *x]\nexperiments: [{name: a}]\n")
    with pytest.raises(ConfigError, match="refers to a value that contains it"):
        load_study(loop)


# --------------------------------------------------------------------------------------------
# 6. symlink loops in folder datasets


def test_a_symlink_loop_in_a_folder_dataset_is_not_followed_and_is_said(tmp_path):
    root = tmp_path / "ds"
    write_folder(root, ["x", "y"], 12)
    os.symlink("..", root / "y" / "loop")  # y/loop -> the dataset: every image again, labelled y
    os.symlink(root / "x", root / "y" / "also_x")  # a link back into the dataset: x's images counted again as y
    outside = tmp_path / "more_y"
    write_folder(outside, ["y"], 3, seed=7)
    os.symlink(outside / "y", root / "y" / "more")  # a link out of the dataset: followed (a dataset assembled from links)
    scan = scan_folder(root, probe=False)
    assert scan.n_images == 24 + 3
    skipped = sorted(Path(p.path).name for p in scan.problems if p.kind == "symlink")
    assert skipped == ["also_x", "loop"] and all(p.severity == "warning" for p in scan.problems if p.kind == "symlink")
    raw = load_dataset(from_dict(ExperimentConfig, {"data": {"dataset": "folder", "root": str(root), "test_fraction": 0.25}}).data)
    assert len(raw.train_y) + len(raw.test_y) == 27 and any("symbolic link not followed" in p.message for p in raw.warnings)
    report = check_path(root)[0]
    assert report.ok and sum(p.kind == "symlink" for p in report.warnings) == 2 and "a loop" in report.format()


# --------------------------------------------------------------------------------------------
# 7. run and check-data: one set of rules


def test_run_refuses_a_folder_that_check_data_rejects_with_the_same_message(tmp_path):
    root = tmp_path / "ds"
    write_folder(root, ["x", "y"], 8)
    shutil.copy(root / "x" / "0.png", root / "y" / "dup.png")  # the same image labelled x and y
    report = check_path(root)[0]
    errors = [str(p) for p in report.errors]
    assert len(errors) == 1 and "identical images under different classes ['x', 'y']" in errors[0]
    cfg = from_dict(ExperimentConfig, {**json.loads(json.dumps(TINY)), "name": "dup", "data": {"dataset": "folder", "root": str(root)}})
    cfg.validate()
    with pytest.raises(DatasetError) as e:
        run_experiment(cfg, tmp_path / "run", console=QUIET)
    assert errors[0] in str(e.value) and "check-data" in str(e.value)


# --------------------------------------------------------------------------------------------
# 8. plan, weights


def test_plan_of_a_dropout_sweep_probes_the_model_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dryrun, "_probe", lambda cfg, data: calls.append(cfg.name) or (Cost(0.01, 0.001), 0.0))
    raw = _study("sweep", [{"name": "drop", "head": {"type": "mlp"}, "sweep": {"head.dropout": [round(0.02 * k, 2) for k in range(20)]}}])
    report = dry_run(parse_study(raw), tmp_path / "runs")
    assert len(report.rows) == 20 and all(r.estimate_s for r in report.rows)
    assert len(calls) == 1, f"probed {len(calls)} times for one architecture"
    raw["experiments"][0]["sweep"] = {"train.batch_size": [8, 16]}  # what changes the cost is probed again
    calls.clear()
    dry_run(parse_study(raw), tmp_path / "runs")
    assert len(calls) == 2


def test_plan_on_missing_data_says_the_size_is_unknown_and_times_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dryrun, "_probe", lambda cfg, data: calls.append(cfg.name) or (Cost(0.01, 0.001), 0.0))
    raw = _study("gone", [{"name": "missing", "data": {"dataset": "folder", "root": str(tmp_path / "nowhere")}}])
    report = dry_run(parse_study(raw), tmp_path / "runs")
    row = report.rows[0]
    assert row.data.state == "missing" and row.data.n_train is None and row.estimate_s is None and not calls
    console = Console(record=True, width=200)
    print_plan(report, console)
    text = console.export_text()
    assert "missing: size unknown" in text and "1000/" not in text and "900/" not in text


def test_a_pickled_weights_file_is_refused_without_relaying_torchs_advice(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "cmd": Path("x")}, path)  # any object that is not a tensor needs code to unpickle
    with pytest.raises(WeightsError) as e:
        read_state_file(path)
    message = str(e.value)
    assert str(path) in message and "holds more than tensors" in message and "pathlib" in message.lower()
    assert "weights_only" not in message and "Re-running" not in message and "trusted source" not in message
