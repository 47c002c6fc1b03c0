"""Four user-facing defects, each a test that failed before the restructuring and passes now.

1. ``--resume`` after editing the study file refuses to reuse (or continue) runs made with another
   config, lists the changed keys as ``old → new`` and says how to proceed; harmless keys are allowed.
2. A duplicate key in a study file is a config error naming the dotted key and both lines.
3. Ctrl-C prints one line (experiment, checkpoint) and exits 130; ``--resume`` then finishes
   bit-identically to an uninterrupted run.
4. Error messages that name what is wrong: a folder class with one image, ``--runs-dir`` a file.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import transferlab
from data_fixtures import write_folder
from transferlab.cli import main
from transferlab.config import ConfigError, DataConfig
from transferlab.data import DatasetError, load_dataset
from transferlab.rundir import RunError

STUDY = {
    "study": "tiny",
    "defaults": {
        "data": {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 96, "val_fraction": 0.25},
        "model": {"backbone": "transferlab_cnn", "weights": "scratch"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu"},
    },
    "experiments": [{"name": "a"}],
}


def _write(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


def _edited(**train) -> dict:
    study = copy.deepcopy(STUDY)
    study["defaults"]["train"].update(train)
    return study


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time (so any write shows)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tmp_path, capsys):
    """A finished one-experiment study: (study file, runs dir, run dir)."""
    path = _write(tmp_path / "study.yaml", STUDY)
    runs = tmp_path / "runs"
    assert main(["run", str(path), "--runs-dir", str(runs), "--no-report"]) == 0
    capsys.readouterr()
    run_dir = runs / "tiny" / "a"
    assert (run_dir / "metrics.json").is_file() and (run_dir / "checkpoints" / "last.safetensors").is_file()
    return path, runs, run_dir


# --------------------------------------------------------------------------------------------
# defect 1: --resume after editing the study file


@pytest.mark.parametrize("interrupted", [False, True], ids=["finished", "interrupted"])
def test_resume_refuses_a_changed_batch_size_cli(finished, capsys, interrupted):
    """Defect 1 (CLI): a changed train.batch_size is refused with exit 2, old → new, and how to proceed; nothing changes."""
    path, runs, run_dir = finished
    if interrupted:  # a run that stopped after its last checkpoint but before metrics.json
        (run_dir / "metrics.json").unlink()
    old = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"]
    new = old // 2
    before = _snapshot(run_dir)
    recorded_study = (runs / "tiny" / "study.yaml").read_text()
    _write(path, _edited(batch_size=new))

    assert main(["run", str(path), "--runs-dir", str(runs), "--resume", "--no-report"]) == 2
    out = capsys.readouterr().out
    assert f"error: run directory {run_dir} " in out  # the refusal is the error, not one failed run among others
    assert f"train.batch_size: {old} → {new}" in out
    assert "--overwrite" in out and "new name" in out
    assert "train.lr" not in out  # only the changed key is listed
    assert "experiment(s) failed" not in out and "test acc" not in out  # no table of the old results under the new study
    assert _snapshot(run_dir) == before
    assert (runs / "tiny" / "study.yaml").read_text() == recorded_study  # still the study file the runs were made with


@pytest.mark.parametrize("interrupted", [False, True], ids=["finished", "interrupted"])
def test_resume_refuses_a_changed_batch_size_api(finished, interrupted):
    """Defect 1 (Python API): ``run_study(..., resume=True)`` raises RunError listing the change; nothing changes."""
    path, runs, run_dir = finished
    if interrupted:
        (run_dir / "metrics.json").unlink()
    before = _snapshot(run_dir)
    _write(path, _edited(batch_size=16))
    with pytest.raises(RunError, match=r"(?s)train\.batch_size: 32 → 16.*--overwrite"):
        transferlab.run_study(path, runs_dir=runs, resume=True)
    assert _snapshot(run_dir) == before


def test_resume_allows_and_lists_harmless_changes(finished, capsys):
    """Defect 1: changes that cannot affect results (train.progress, notes) are allowed on --resume and listed."""
    path, runs, run_dir = finished
    recorded = json.loads((run_dir / "metrics.json").read_text())
    study = _edited(progress=True)
    study["experiments"][0]["notes"] = "edited later"
    _write(path, study)

    assert main(["run", str(path), "--runs-dir", str(runs), "--resume", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out
    assert "train.progress: False → True" in out and "notes: '' → 'edited later'" in out
    assert json.loads((run_dir / "metrics.json").read_text()) == recorded  # reused, not redone


def test_interrupted_run_with_harmless_change_is_continued(finished, capsys):
    """Defect 1: an interrupted run (checkpoints, no metrics.json) with only a harmless change is continued to the same result."""
    path, runs, run_dir = finished
    recorded = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").unlink()
    study = copy.deepcopy(STUDY)
    study["experiments"][0]["notes"] = "continued"
    _write(path, study)

    assert main(["run", str(path), "--runs-dir", str(runs), "--resume", "--no-report"]) == 0
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["status"] == "ok" and again["notes"] == "continued"
    assert again["test_acc"] == recorded["test_acc"] and again["test_loss"] == recorded["test_loss"]


# --------------------------------------------------------------------------------------------
# defect 2: duplicate keys in a study file

BASE_TEXT = """\
defaults:
  data: {dataset: synthetic, synthetic_classes: 4, synthetic_size: 96, val_fraction: 0.25}
  train: {epochs: 1, batch_size: 32, progress: false, accelerator: cpu}
"""

DUPLICATE_TOP = "study: first\n" + BASE_TEXT + "study: second\nexperiments:\n  - name: a\n"
"""``study`` on line 1 and line 5."""

DUPLICATE_IN_ITEM = (
    "study: dup\n" + BASE_TEXT + "experiments:\n"
    "  - name: a\n"  # line 6
    "  - name: b\n"  # line 7
    "    train:\n"  # line 8
    "      lr: 0.1\n"  # line 9
    "      epochs: 1\n"  # line 10
    "      lr: 0.001\n"  # line 11
)

DUPLICATE_FLOW = "study: dup\n" + BASE_TEXT + "experiments:\n  - name: a\n    train: {lr: 0.1, lr: 0.001}\n"  # line 7


@pytest.mark.parametrize(
    "text, key, lines",
    [
        (DUPLICATE_TOP, "'study'", (1, 5)),
        (DUPLICATE_IN_ITEM, "'experiments[1].train.lr'", (9, 11)),
        (DUPLICATE_FLOW, "'experiments[0].train.lr'", (7, 7)),
    ],
    ids=["top-level", "list-item", "flow-mapping"],
)
def test_duplicate_key_is_a_config_error(tmp_path, capsys, text, key, lines):
    """Defect 2: a duplicate key names its dotted path and both lines, from load_study and from the CLI (exit 2, nothing run)."""
    path = tmp_path / "study.yaml"
    path.write_text(text, encoding="utf-8")
    expected = f"duplicate key {key} (line {lines[0]} and line {lines[1]})"
    with pytest.raises(ConfigError) as info:
        transferlab.load_study(path)
    assert expected in str(info.value) and str(path) in str(info.value)

    runs = tmp_path / "runs"
    assert main(["run", str(path), "--runs-dir", str(runs), "--no-report"]) == 2
    out = capsys.readouterr().out
    assert expected in out
    assert not runs.exists()


def test_yaml_merge_key_override_is_not_a_duplicate(tmp_path):
    """Defect 2: ``<<: *anchor`` followed by an override of one of its keys is the YAML way to share settings, not a duplicate."""
    path = tmp_path / "study.yaml"
    path.write_text(
        "study: merged\n" + BASE_TEXT + "experiments:\n"
        "  - &first\n"
        "    name: a\n"
        "    train: &train_a {lr: 0.1, epochs: 2}\n"
        "  - <<: *first\n"
        "    name: b\n"
        "    train:\n"
        "      <<: *train_a\n"
        "      lr: 0.001\n",
        encoding="utf-8",
    )
    study = transferlab.load_study(path)
    by_name = {c.name: c for c in study.experiments}
    assert by_name["a"].train.lr == 0.1 and by_name["b"].train.lr == 0.001
    assert by_name["a"].train.epochs == by_name["b"].train.epochs == 2


# --------------------------------------------------------------------------------------------
# defect 3: Ctrl-C

CTRL_C_STUDY = {
    "study": "ctrlc",
    "defaults": {
        # 288 training images: 9 steps of 32 per epoch, a checkpoint after every step; 6 epochs, so that even a bf16 run
        # (what precision auto picks on CPUs with native bf16) is still training when the signal comes
        "data": {"dataset": "synthetic", "synthetic_classes": 4, "synthetic_size": 384, "val_fraction": 0.25, "augment": ["flip", "crop"]},
        "model": {"backbone": "transferlab_cnn", "weights": "scratch"},
        "head": {"type": "mlp", "hidden": 32, "dropout": 0.3},
        "train": {
            "epochs": 6,
            "batch_size": 32,
            "lr": 0.01,
            "schedule": "onecycle",
            "progress": False,
            "accelerator": "cpu",
            "checkpoint_every_steps": 1,
        },
    },
    "experiments": [{"name": "long_run"}],
}


def _signal_masks(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "unknown"
    return " ".join(line.replace("\t", "") for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def _cli(study: Path, runs: Path, *extra: str) -> subprocess.Popen:
    # SIGINT back to its default in the child: a test session started in the background by a shell (`pytest &`)
    # ignores SIGINT, the child would inherit that, and Python installs no KeyboardInterrupt handler then
    return subprocess.Popen(
        [sys.executable, "-m", "transferlab.cli", "run", str(study), "--runs-dir", str(runs), "--no-report", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - no threads started by then
    )


def test_ctrl_c_prints_one_line_exits_130_and_resumes_bit_identically(tmp_path):
    """Defect 3: SIGINT mid-training: exit 130, no traceback, one line naming the experiment and checkpoint; --resume == uninterrupted run."""
    study = _write(tmp_path / "study.yaml", CTRL_C_STUDY)
    ref_runs = tmp_path / "ref"
    cut_runs = tmp_path / ("cut-" + "long-folder-" * 4)  # the message is wider than the console (200), each path is not
    ref = _cli(study, ref_runs)  # the uninterrupted run, alongside
    cut = _cli(study, cut_runs)
    run_dir = cut_runs / "ctrlc" / "long_run"
    last = run_dir / "checkpoints" / "last.safetensors"
    try:
        deadline = time.time() + 120
        while not last.is_file():
            assert cut.poll() is None, f"the run ended before it could be interrupted:\n{cut.communicate()}"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        sig = _signal_masks(cut.pid)  # for the message below: a child that ignores SIGINT cannot be interrupted
        os.kill(cut.pid, signal.SIGINT)
        out, err = cut.communicate(timeout=60)
    finally:
        cut.kill()
    assert cut.returncode == 130, f"exit {cut.returncode} (signal masks when interrupted: {sig})\n{out}\n{err}"
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    assert not (run_dir / "metrics.json").exists()  # interrupted, not finished or recorded as failed
    with safe_open(str(last), "pt") as f:  # the checkpoint's own header (its .json copy is written after it)
        position = json.loads(f.metadata()["transferlab"])["trainer"]
    assert (position["epoch"], position["step"]) < (CTRL_C_STUDY["defaults"]["train"]["epochs"], 0)
    print(f"interrupted at epoch {position['epoch'] + 1}, step {position['step']}")
    lines = [line for line in out.splitlines() if line.strip()]
    assert str(last) in lines[-1] and "long_run" in lines[-1].replace(str(last), ""), out  # one line: experiment and checkpoint
    assert last.is_file()

    resumed = _cli(study, cut_runs, "--resume")
    out2, err2 = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, f"{out2}\n{err2}"
    assert ref.wait(timeout=120) == 0, ref.communicate()
    ref_dir = ref_runs / "ctrlc" / "long_run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("last.safetensors")  # it continued, it did not start again
    a = load_file(str(ref_dir / "checkpoints" / "last.safetensors"))
    b = load_file(str(last))
    assert a.keys() == b.keys()
    for k in a:  # weights, BatchNorm statistics, optimizer and RNG state
        assert torch.equal(a[k], b[k]), f"{k} differs after Ctrl-C and --resume"
    ref_metrics = json.loads((ref_dir / "metrics.json").read_text())
    assert metrics["test_acc"] == ref_metrics["test_acc"] and metrics["test_loss"] == ref_metrics["test_loss"]


# --------------------------------------------------------------------------------------------
# defect 4: messages that name what is wrong


def test_folder_class_with_one_image_is_named(tmp_path, capsys):
    """Defect 4: ``dataset: folder`` with a one-image class names the class and its image count."""
    root = tmp_path / "images"
    write_folder(root, ["cat", "dog"], per_class=4)
    write_folder(root, ["zebra"], per_class=1, seed=1)  # root/zebra/0.png (other pixels than cat/0.png)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))[-1] == "zebra/0.png"
    with pytest.raises(DatasetError, match=r"at least 2 images") as info:
        load_dataset(DataConfig(dataset="folder", root=str(root)))
    message = str(info.value)
    assert "'zebra' has 1 image" in message
    assert "'cat'" not in message and "'dog'" not in message  # the classes that are fine are not blamed

    study = copy.deepcopy(STUDY)
    study["defaults"]["data"] = {"dataset": "folder", "root": str(root), "val_fraction": 0.25}
    path = _write(tmp_path / "study.yaml", study)
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-report"]) != 0
    assert "'zebra' has 1 image" in capsys.readouterr().out

    assert main(["check-data", str(root)]) == 1  # a problem in the report, not a crash of the check
    out = capsys.readouterr().out
    assert "1 error(s)" in out and "'zebra' has 1 image" in out


def test_runs_dir_that_is_a_file_is_explained(tmp_path, capsys):
    """Defect 4: ``--runs-dir`` naming a file exits 2 saying that path is a file, not a folder (no NotADirectoryError)."""
    path = _write(tmp_path / "study.yaml", STUDY)
    not_a_folder = tmp_path / "runs.txt"
    not_a_folder.write_text("notes\n")
    assert main(["run", str(path), "--runs-dir", str(not_a_folder), "--no-report"]) == 2
    out = capsys.readouterr().out
    assert str(not_a_folder) in out and "is a file, not a folder" in out
    assert "NotADirectoryError" not in out and "Errno" not in out
    assert not_a_folder.read_text() == "notes\n"
