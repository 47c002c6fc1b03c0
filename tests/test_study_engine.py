"""The study engine: the graph, the executors (sequential, local workers, Ray, Slurm via submitit), search, the plan."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from transferlab.config import ConfigError, ExecutorConfig, Resources, SlurmOptions, parse_study
from transferlab.rundir import RunError
from transferlab.study import EXECUTORS, dependency_levels, plan_study, run_study, slurm_parameters
from transferlab.study.dryrun import dry_run, print_plan

QUIET = Console(quiet=True)
REPO = Path(__file__).resolve().parents[1]
STUDY_FILES = sorted((REPO / "studies").glob("*.yaml")) + sorted((REPO / "src" / "transferlab" / "studies").glob("*.yaml"))

# Six runs: two seeds of a source, of a transfer from it (same seed), and of an ensemble of the two.
STUDY = {
    "study": "graph",
    "defaults": {
        "data": {"dataset": "synthetic", "synthetic_size": 96, "val_fraction": 0.25},
        "model": {"backbone": "transferlab_cnn"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "progress": False, "accelerator": "cpu", "checkpoint_every_minutes": None},
    },
    "seeds": [0, 1],
    "experiments": [
        {"name": "source"},
        {"name": "target", "model": {"weights": "run:source"}, "strategy": {"name": "finetune"}, "train": {"lr": 0.005}},
    ],
    "ensembles": [{"name": "vote", "members": ["source", "target"]}],
}


def _metrics(study_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(study_dir.glob("*/metrics.json")):
        m = json.loads(p.read_text())
        out[p.parent.name] = {k: m.get(k) for k in ("status", "test_acc", "test_loss", "best_epoch", "per_class_acc")}
    return out


# --------------------------------------------------------------------------------------------
# the graph


def test_the_plan_puts_dependencies_first_and_levels_them(tmp_path):
    raw = copy.deepcopy(STUDY)
    raw["experiments"] = [raw["experiments"][1], raw["experiments"][0]]  # the transfer listed first
    plan = plan_study(parse_study(raw), tmp_path / "graph")
    names = [r.name for r in plan]
    assert names.index("source.seed0") < names.index("target.seed0") and names.index("source.seed1") < names.index("target.seed1")
    levels = dependency_levels(plan)
    assert levels["source.seed0"] == 0 and levels["target.seed0"] == 1 and levels["vote.seed0"] == 2
    assert next(r for r in plan if r.name == "target.seed1").needs == ["source.seed1"]  # the same seed


def test_a_cycle_and_a_missing_dependency_are_config_errors_before_anything_runs(tmp_path):
    raw = copy.deepcopy(STUDY)
    raw["experiments"][0]["model"] = {"weights": "run:target"}
    with pytest.raises(ConfigError, match=r"cycle: .*source.seed0 -> target.seed0 -> source.seed0"):
        run_study(parse_study(raw), tmp_path / "runs", console=QUIET)
    raw = copy.deepcopy(STUDY)
    raw["experiments"][1]["model"]["weights"] = "run:sorce"
    with pytest.raises(ConfigError, match=r"run:sorce.*no experiment of this study \(did you mean 'source'\?\)"):
        run_study(parse_study(raw), tmp_path / "runs", console=QUIET)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# local workers


def test_two_local_workers_give_the_sequential_results_in_dependency_order(tmp_path):
    seq = run_study(parse_study(STUDY), tmp_path / "seq", console=QUIET, threads=1)
    par = run_study(parse_study(STUDY), tmp_path / "par", console=QUIET, executor="local", workers=2)
    assert seq.ok and par.ok and len(par.finished) == 6
    assert _metrics(tmp_path / "seq" / "graph") == _metrics(tmp_path / "par" / "graph")
    o = par.outcomes
    for seed in (0, 1):  # a run starts only after what it needs has finished
        assert o[f"target.seed{seed}"].started >= o[f"source.seed{seed}"].ended
        assert o[f"vote.seed{seed}"].started >= o[f"target.seed{seed}"].ended
    assert len({o[n].worker for n in o}) > 1  # the runs are spread over the workers
    assert (tmp_path / "par" / "graph" / "logs" / "source.seed0.log").is_file()


def _kill_when_checkpointed(study_dir: Path, run: str, killed: list[int]) -> None:
    """Watch ``run``; once it wrote a mid-run checkpoint, SIGKILL the process that runs it (once)."""
    deadline = time.time() + 120
    ckpt = study_dir / run / "checkpoints" / "last.safetensors"
    attempt = study_dir / ".attempts" / f"{run}.json"
    while time.time() < deadline and not killed:
        if ckpt.is_file() and attempt.is_file():
            pid = json.loads(attempt.read_text())["pid"]
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.05)


def _long_study(name: str) -> dict:
    return {
        "study": name,
        "defaults": {"data": {"dataset": "synthetic", "synthetic_size": 128, "val_fraction": 0.25}, "model": {"backbone": "transferlab_cnn"},
                     "train": {"epochs": 3, "batch_size": 8, "lr": 0.01, "progress": False, "accelerator": "cpu",
                               "checkpoint_every_steps": 5, "checkpoint_every_minutes": None}},
        "experiments": [{"name": "long"}, {"name": "short", "train": {"epochs": 1}}],
    }


def test_a_killed_local_worker_is_retried_from_its_checkpoint_and_gives_the_same_result(tmp_path):
    ref = run_study(parse_study(_long_study("kill")), tmp_path / "ref", console=QUIET, threads=1)
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_when_checkpointed, args=(tmp_path / "runs" / "kill", "long", killed))
    watcher.start()
    res = run_study(parse_study(_long_study("kill")), tmp_path / "runs", console=QUIET, executor="local", workers=2)
    watcher.join()
    assert killed, "the run finished before it could be killed"
    assert ref.ok and res.ok and res.outcomes["long"].attempts == 2
    assert _metrics(tmp_path / "ref" / "kill") == _metrics(tmp_path / "runs" / "kill")
    assert json.loads((tmp_path / "runs" / "kill" / "long" / "metrics.json").read_text())["resumed_from"]


def _kill_every_attempt(study_dir: Path, run: str, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL every new process that starts ``run`` (as a node that keeps failing would)."""
    attempt = study_dir / ".attempts" / f"{run}.json"
    while not stop.is_set():
        try:
            pid = json.loads(attempt.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            pid = None
        if pid and pid not in killed and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def test_a_worker_that_always_dies_ends_failed_after_the_retries(tmp_path):
    raw = _long_study("doomed")
    raw["executor"] = {"name": "local", "workers": 1, "retries": 1}
    raw["experiments"] = [{"name": "long"}]
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_every_attempt, args=(tmp_path / "runs" / "doomed", "long", killed, stop))
    watcher.start()
    try:
        res = run_study(parse_study(raw), tmp_path / "runs", console=QUIET)
    finally:
        stop.set()
        watcher.join()
    assert len(killed) == 2
    assert res.failed["long"].startswith("WorkerDied: the worker process died (killed by signal 9 (SIGKILL)) on all 2 attempts")
    assert json.loads((tmp_path / "runs" / "doomed" / "long" / "metrics.json").read_text())["status"] == "failed"


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "search, message",
    [
        ({"space": {"train.lr": {"loguniform": [1e-4, 1e-1]}}}, r"unknown distribution 'loguniform' \(did you mean 'log_uniform'\?\)"),
        ({"space": {"train.optimizer": {"choice": []}}}, r"train.optimizer.choice: expected a non-empty list"),
        ({"space": {"train.lrr": {"uniform": [0, 1]}}}, r"unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"),
        ({"space": {"train.lr": {"uniform": [0.1, 0.01]}}}, r"need low < high"),
        ({"space": {"train.lr": {"log_uniform": [0, 0.1]}}}, r"bounds must be > 0"),
        ({"space": {"train.lr": {"uniform": [1e-4, 1e-1]}}, "metric": "test_acc"}, r"never chooses on the test split"),
        ({"space": {"head.dropout": {"uniform": [0, 1.5]}}}, r"head.dropout: the value 1.5 gives an invalid experiment"),
        ({"space": {"train.optimizer": {"choice": ["adamw", "sgdd"]}}}, r"'sgdd' is not one of .*did you mean 'sgd'"),
        ({"space": {"train.lr": {"uniform": [1e-4, 1e-1]}}, "sampler": "grid"}, r"sampler=grid: every dimension must be a 'choice'"),
    ],
)
def test_bad_searches_are_config_errors_naming_the_key(search, message):
    raw = {"study": "s", "experiments": [{"name": "a", "data": {"dataset": "digits"}, "search": search}]}
    with pytest.raises(ConfigError, match=message):
        parse_study(raw)


def test_bad_executor_settings_are_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"--workers 0: must be at least 1"):
        run_study(parse_study(STUDY), tmp_path / "runs", console=QUIET, executor="local", workers=0)
    with pytest.raises(ConfigError, match=r"executor.name: 'lokal' is not one of .*did you mean 'local'"):
        parse_study({**STUDY, "executor": "lokal"})
    with pytest.raises(ConfigError, match=r"resources.cpus=0"):
        parse_study({**STUDY, "resources": {"cpus": 0}})
    import builtins

    real_import = builtins.__import__

    def no_extras(name, *args, **kwargs):
        if name.split(".")[0] in ("ray", "submitit", "optuna"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_extras)
    with pytest.raises(RunError, match=r"Ray is not installed: pip install 'transferlab\[ray\]'"):
        run_study(parse_study(STUDY), tmp_path / "runs", console=QUIET, executor="ray")
    with pytest.raises(RunError, match=r"submitit is not installed: pip install 'transferlab\[slurm\]'"):
        run_study(parse_study(STUDY), tmp_path / "runs", console=QUIET, executor="slurm")
    space = {"space": {"train.lr": {"uniform": [0.001, 0.1]}}}
    searched = {"study": "s", "experiments": [{"name": "a", "data": {"dataset": "digits"}, "search": space}]}
    with pytest.raises(RunError, match=r"needs Optuna, which is not installed: pip install 'transferlab\[search\]'"):
        run_study(parse_study(searched), tmp_path / "runs", console=QUIET)
    assert not list((tmp_path / "runs").glob("*/*/metrics.json"))  # nothing ran


def test_every_executor_is_registered_and_named_in_the_config():
    from transferlab.config.scaling import EXECUTOR_NAMES

    assert sorted(EXECUTORS.names()) == sorted(EXECUTOR_NAMES)


# --------------------------------------------------------------------------------------------
# slurm


def test_slurm_jobs_ask_for_the_resources_and_wait_on_their_dependencies(tmp_path, monkeypatch):
    """A fake ``sbatch`` on PATH records each submission script: the job's size, its afterok dependency, its command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\nn=$(($(ls " + str(tmp_path) + "/scripts 2>/dev/null | wc -l) + 100))\nmkdir -p " + str(tmp_path) + "/scripts\n"
        "cp \"$1\" " + str(tmp_path) + "/scripts/$n.sh\necho \"$@\" >> " + str(log) + "\necho \"Submitted batch job $n\"\n"
    )
    (bin_dir / "sbatch").chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for srun to know it is on a Slurm cluster
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    from transferlab.study.executors import SlurmExecutor
    from transferlab.study.worker import RunJob

    cfg = ExecutorConfig(name="slurm", slurm=SlurmOptions(partition="gpu", time_min=30, account="lab", additional={"exclude": "node3"}))
    ex = SlurmExecutor(cfg, tmp_path / "study")
    study = parse_study(STUDY)
    plan = {r.name: r for r in plan_study(study, tmp_path / "study")}
    for name in ("source.seed0", "target.seed0"):
        job = RunJob(name, plan[name].cfg, str(tmp_path / "study"), "tok")
        ex.submit(job, Resources(cpus=4, gpus=1, mem_gb=8), after=plan[name].needs)
    scripts = sorted((tmp_path / "scripts").glob("*.sh"))
    first, second = (s.read_text() for s in scripts)
    for text in (first, second):
        assert "#SBATCH --partition=gpu" in text and "#SBATCH --time=30" in text and "#SBATCH --cpus-per-task=4" in text
        assert "#SBATCH --gpus-per-node=1" in text and "#SBATCH --mem=8GB" in text and "#SBATCH --account=lab" in text
        assert "#SBATCH --exclude=node3" in text and "submitit.core._submit" in text
    assert "--dependency" not in first
    assert f"#SBATCH --dependency=afterok:{ex.job_ids['source.seed0']}" in second and "#SBATCH --kill-on-invalid-dep=yes" in second
    assert "#SBATCH --job-name=target.seed0" in second
    params = slurm_parameters(cfg, Resources(cpus=2), "x", after=["7", "8"])
    assert params["slurm_additional_parameters"]["dependency"] == "afterok:7:8" and "gpus_per_node" not in params


def test_the_slurm_executor_runs_a_study_through_submitits_local_backend(tmp_path):
    raw = copy.deepcopy(STUDY)
    raw["seeds"] = [0]
    raw["executor"] = {"name": "slurm", "slurm": {"cluster": "local", "time_min": 10}}
    res = run_study(parse_study(raw), tmp_path / "runs", console=QUIET)
    assert res.ok and sorted(res.finished) == ["source", "target", "vote"]
    seq = run_study(parse_study({**raw, "executor": "sequential"}), tmp_path / "seq", console=QUIET, threads=1)
    assert seq.ok and _metrics(tmp_path / "runs" / "graph") == _metrics(tmp_path / "seq" / "graph")


# --------------------------------------------------------------------------------------------
# the plan


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_the_plan_checks_every_gallery_study_without_the_missing_data(path, tmp_path):
    report = dry_run(path, tmp_path / "runs", probe=False)
    assert report.rows
    assert all(r.data.state in ("local", "download", "missing") for r in report.rows)
    for r in report.rows:
        if r.data.state == "download":
            assert "would download" in r.data.detail
    print_plan(report, QUIET)


def test_the_plan_estimates_time_from_a_measured_probe_and_schedules_the_workers(tmp_path):
    report = dry_run(parse_study(STUDY), tmp_path / "runs", executor="local", workers=2)
    rows = {r.name: r for r in report.rows}
    assert all(r.estimate_s is not None and r.estimate_s >= 0 for r in report.rows)
    assert rows["source.seed0"].estimate_s > 0 and rows["source.seed0"].data.n_train == 72 - 0  # 96 * 0.75 train images
    assert rows["target.seed0"].start_s >= rows["source.seed0"].start_s + rows["source.seed0"].estimate_s
    assert {r.slot for r in report.rows} == {0, 1}
    assert report.wall_s <= report.total_s
    assert not (tmp_path / "runs").exists()  # nothing written


def test_the_plan_warns_when_the_machine_was_busy_while_the_probes_timed(tmp_path, monkeypatch):
    from rich.console import Console

    import transferlab.study.dryrun as dryrun

    monkeypatch.setattr(dryrun.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(dryrun.os, "getloadavg", lambda: (2.9, 1.0, 1.0))
    assert dryrun.busy_note() == ""  # 1.45 per core: the probe's own threads and a little more
    monkeypatch.setattr(dryrun.os, "getloadavg", lambda: (4.2, 1.0, 1.0))
    report = dry_run(parse_study(STUDY), tmp_path / "runs")
    assert "load average 4.2 on 2 cores" in report.busy and report.to_dict()["busy"] == report.busy
    console = Console(record=True, width=200)
    print_plan(report, console)
    assert "the estimates may be high" in console.export_text()
    assert dry_run(parse_study(STUDY), tmp_path / "runs", probe=False).busy == ""  # nothing was timed


def test_run_dry_run_and_plan_print_the_table(tmp_path, capsys):
    from transferlab.cli import main

    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({**STUDY, "seeds": [0]}))
    assert main(["plan", str(study), "--runs-dir", str(tmp_path / "runs"), "--no-probe", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "target" in out and "source" in out and "estimated compute" in out
    assert json.loads((tmp_path / "plan.json").read_text())["rows"][0]["name"] == "source"
    assert main(["run", str(study), "--runs-dir", str(tmp_path / "runs"), "--dry-run", "--workers", "2", "--executor", "local"]) == 0
    assert "on local" in capsys.readouterr().out and not (tmp_path / "runs").exists()


def test_cli_runs_a_study_on_local_workers(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({**STUDY, "seeds": [0], "ensembles": []}))
    proc = subprocess.run([sys.executable, "-m", "transferlab.cli", "run", str(study), "--runs-dir", str(tmp_path / "runs"),
                           "--executor", "local", "--workers", "2", "--no-report"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.parent.name for p in (tmp_path / "runs" / "graph").glob("*/metrics.json")) == ["source", "target"]


# --------------------------------------------------------------------------------------------
# ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the [ray] extra is installed by scripts/setup.sh; CI runs this")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_runs_the_study_like_sequential_and_retries_a_killed_worker(ray_cluster, tmp_path):
    par = run_study(parse_study(STUDY), tmp_path / "ray", console=QUIET, executor="ray")
    seq = run_study(parse_study(STUDY), tmp_path / "seq", console=QUIET, threads=1)
    assert par.ok and seq.ok and _metrics(tmp_path / "ray" / "graph") == _metrics(tmp_path / "seq" / "graph")
    assert par.outcomes["target.seed0"].started >= par.outcomes["source.seed0"].ended

    run_study(parse_study(_long_study("kill")), tmp_path / "ref", console=QUIET, threads=1)
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_when_checkpointed, args=(tmp_path / "runs" / "kill", "long", killed))
    watcher.start()
    res = run_study(parse_study(_long_study("kill")), tmp_path / "runs", console=QUIET, executor="ray")
    watcher.join()
    assert killed and res.ok and res.outcomes["long"].attempts == 2
    assert _metrics(tmp_path / "ref" / "kill") == _metrics(tmp_path / "runs" / "kill")


def test_a_ray_worker_that_cannot_see_the_runs_folder_fails_clearly(ray_cluster, tmp_path):
    from transferlab.study.worker import RunJob, execute_run

    job = RunJob("source", parse_study(STUDY).experiments[0], str(tmp_path / "elsewhere"), "token-of-the-driver")
    outcome = ray_cluster.get(ray_cluster.remote(execute_run).remote(job))
    assert outcome.status == "failed" and "does not see the study folder" in outcome.error and "filesystem every node mounts" in outcome.error


# --------------------------------------------------------------------------------------------
# search


def _search_study(trials: int = 8) -> dict:
    return {
        "study": "search",
        "defaults": {"data": {"dataset": "digits", "image_size": 16, "val_fraction": 0.2, "train_subset": 400},
                     "model": {"backbone": "transferlab_cnn"},
                     "train": {"epochs": 4, "batch_size": 32, "progress": False, "accelerator": "cpu", "checkpoint_every_minutes": None}},
        "experiments": [{"name": "tune", "search": {
            "space": {"train.lr": {"log_uniform": [1e-5, 0.1]}, "head.dropout": {"choice": [0.0, 0.3]}},
            "trials": trials, "pruner": "median", "seed": 3}}],
    }


def test_a_search_runs_its_trials_prunes_and_resumes_without_repeating_finished_trials(tmp_path, monkeypatch):
    from transferlab.study import search

    calls = {"n": 0}
    real = search.PruningCallback.on_train_epoch_end

    def interrupt_in_trial_3(self, loop, row):
        real(self, loop, row)
        if loop.cfg.name == "tune@trial=3" and row["epoch"] == 2:
            calls["n"] += 1
            raise KeyboardInterrupt

    monkeypatch.setattr(search.PruningCallback, "on_train_epoch_end", interrupt_in_trial_3)
    from transferlab.study import Interrupted

    with pytest.raises(Interrupted, match=r"tune@trial=3"):
        run_study(parse_study(_search_study()), tmp_path / "runs", console=QUIET)
    study_dir = tmp_path / "runs" / "search"
    before = {p.parent.name: p.stat().st_mtime_ns for p in study_dir.glob("tune@trial=*/metrics.json")}
    assert sorted(before) == ["tune@trial=0", "tune@trial=1", "tune@trial=2"]
    monkeypatch.setattr(search.PruningCallback, "on_train_epoch_end", real)

    res = run_study(parse_study(_search_study()), tmp_path / "runs", console=QUIET, resume=True)
    assert not res.failed
    info = res.searches["tune"]
    assert len(info["trials"]) == 8 and all(t["state"] in ("complete", "pruned") for t in info["trials"])
    assert {p.parent.name: p.stat().st_mtime_ns for p in study_dir.glob("tune@trial=*/metrics.json") if p.parent.name in before} == before
    pruned = [t for t in info["trials"] if t["state"] == "pruned"]
    assert pruned, f"the median pruner stopped no trial of an lr range that reaches 1e-5: {info['trials']}"
    for t in pruned:
        m = json.loads((study_dir / t["run"] / "metrics.json").read_text())
        assert m["status"] == "pruned" and f"pruned at epoch {t['last_epoch']}" in m["error"]
    best = info["best"]
    complete = [t for t in info["trials"] if t["state"] == "complete"]
    assert best["value"] == max(t["value"] for t in complete)  # chosen on validation accuracy
    cfg3 = (study_dir / "tune@trial=3" / "config.yaml").read_text()
    assert f"lr: {info['trials'][3]['params']['train.lr']}" in cfg3  # the interrupted trial continued with its own settings
    assert len({json.dumps(t["params"], sort_keys=True) for t in info["trials"]}) > 4  # the resumed search asked new settings
    assert (study_dir / "search.db").is_file() and (study_dir / "search" / "tune" / "history.png").is_file()
    from transferlab.results.compare import collect

    rows = {r["experiment"]: r for r in collect(study_dir)}
    assert set(rows) == {f"tune@trial={k}" for k in range(8)}


def test_a_search_on_two_local_workers_shares_one_sqlite_storage(tmp_path):
    raw = _search_study(trials=4)
    raw["executor"] = {"name": "local", "workers": 2}
    res = run_study(parse_study(raw), tmp_path / "runs", console=QUIET)
    assert not res.failed and len(res.searches["tune"]["trials"]) == 4
    assert len({res.outcomes[t["run"]].worker for t in res.searches["tune"]["trials"]}) > 1
    import optuna

    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{tmp_path / 'runs' / 'search' / 'search.db'}")
    assert [t.state.is_finished() for t in study.trials] == [True] * 4
    assert all(t.intermediate_values for t in study.trials)  # the workers reported every epoch to the shared storage


def test_parallel_workers_share_one_backbone_pass_through_the_disk_store(tmp_path):
    raw = {
        "study": "cache",
        "executor": {"name": "local", "workers": 2},
        "defaults": {"data": {"dataset": "synthetic", "synthetic_size": 96, "val_fraction": 0.25},
                     "model": {"backbone": "test_efficientnet"}, "strategy": {"name": "linear_probe"},
                     "train": {"epochs": 2, "batch_size": 16, "progress": False, "accelerator": "cpu", "cache": "on"}},
        "experiments": [{"name": "a", "train": {"lr": 0.01}}, {"name": "b", "train": {"lr": 0.03}}],
    }
    res = run_study(parse_study(raw), tmp_path / "runs", console=QUIET)
    assert res.ok
    caches = [json.loads((tmp_path / "runs" / "cache" / n / "metrics.json").read_text())["feature_cache"] for n in ("a", "b")]
    assert caches[0]["keys"] == caches[1]["keys"]
    for i in range(len(caches[0]["keys"])):  # every set was computed by exactly one of the two workers
        assert sorted(c["sources"][i] for c in caches) == ["computed", "disk"]
    assert list((tmp_path / "runs" / "cache" / ".feature_cache").glob("*.safetensors"))


def test_compare_and_the_report_show_the_search_and_skipped_runs(tmp_path, capsys):
    from transferlab.results.compare import compare
    from transferlab.results.report import build_report

    raw = _search_study(trials=3)
    raw["experiments"].append({"name": "broken", "data": {"dataset": "folder", "root": str(tmp_path / "no_such_images")}})  # fails at run time
    raw["experiments"].append({"name": "after", "model": {"weights": "run:broken"}})
    res = run_study(parse_study(raw), tmp_path / "runs", console=QUIET)
    assert res.outcomes["after"].status == "skipped"
    study_dir = tmp_path / "runs" / "search"
    rows = {r["experiment"]: r for r in compare(study_dir, console=Console(file=open(tmp_path / "cmp.txt", "w"), width=300))}
    assert rows["after"]["status"].startswith("1 skipped: run:") and rows["broken"]["status"].startswith("1 failed")
    best = res.searches["tune"]["best"]
    assert f"best trial: {best['run']}" in (tmp_path / "cmp.txt").read_text()
    rep = build_report(study_dir)
    page, md = rep.html_path.read_text(), rep.md_path.read_text()
    assert 'id="search"' in page and f"best trial: {best['run']}" in page and "never used to choose" in page
    assert "## Search: tune" in md and "skipped" in md


def test_ctrl_c_stops_the_local_workers_and_resume_finishes_with_the_same_results(tmp_path, monkeypatch):
    from transferlab.study import Interrupted
    from transferlab.study.executors import LocalExecutor

    real_wait = LocalExecutor.wait
    study_dir = tmp_path / "runs" / "kill"

    def ctrl_c_once_checkpointed(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:  # look often: on a quiet machine the whole run takes about a second
            if (study_dir / "long" / "checkpoints" / "last.safetensors").is_file():
                raise KeyboardInterrupt
            if done := real_wait(self, 0.02):
                return done
        return []

    raw = _long_study("kill")
    raw["defaults"]["train"]["epochs"] = 6  # long enough that the interrupt lands mid-run
    raw["defaults"]["data"]["synthetic_size"] = 512
    monkeypatch.setattr(LocalExecutor, "wait", ctrl_c_once_checkpointed)
    with pytest.raises(Interrupted) as info:
        run_study(parse_study(raw), tmp_path / "runs", console=QUIET, executor="local", workers=2)
    assert "long" in [info.value.run, *info.value.others] and "--resume" in info.value.describe()
    assert not (study_dir / "long" / "metrics.json").is_file()  # stopped mid-run, not recorded as finished or failed
    monkeypatch.setattr(LocalExecutor, "wait", real_wait)
    res = run_study(parse_study(raw), tmp_path / "runs", console=QUIET, executor="local", workers=2, resume=True)
    ref = run_study(parse_study(raw), tmp_path / "ref", console=QUIET, threads=1)
    assert res.ok and ref.ok and _metrics(study_dir) == _metrics(tmp_path / "ref" / "kill")


def test_the_live_table_counts_the_runs_and_estimates_the_rest(tmp_path):
    from transferlab.study.progress import StudyProgress

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "history.csv").write_text("epoch,train_loss\n1,0.5\n2,0.4\n")
    p = StudyProgress(QUIET, ["a", "b", "c", "d"], tmp_path, {"a": 5, "b": 5}, capacity=2)
    p.update("b", "running", worker="worker 0")
    p.update("b", "ok", seconds=10.0)
    p.update("a", "running", worker="worker 1")
    p.update("c", "failed", seconds=4.0)
    console = Console(record=True, width=200, file=open(os.devnull, "w"))
    console.print(p.table())
    text = console.export_text()
    assert "queued 1" in text and "running 1" in text and "ok 1" in text and "failed 1" in text and "ETA" in text
    assert "2/5" in text and "worker 1" in text  # a's epoch from its history.csv, and where it runs
    assert p.eta() is not None and p.eta() > 0


def test_a_search_can_live_in_a_journal_file(tmp_path):
    raw = _search_study(trials=2)
    raw["defaults"]["train"]["epochs"] = 1
    journal = tmp_path / "search.journal"
    res = run_study(parse_study(raw), tmp_path / "runs", console=QUIET, search_storage=f"journal:{journal}")
    assert not res.failed and journal.is_file() and not (tmp_path / "runs" / "search" / "search.db").exists()
    assert [t["state"] for t in res.searches["tune"]["trials"]] == ["complete", "complete"]
