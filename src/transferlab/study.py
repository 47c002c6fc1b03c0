"""Run every experiment of a study file; one failing experiment never stops the others."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from transferlab.config import Study, load_study, run_name
from transferlab.runs import run_experiment, write_failure


@dataclass
class StudyResult:
    """Where the runs went, and which experiments finished or failed."""

    study: str
    runs_dir: Path
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def run_study(
    study: str | Path | Study,
    runs_dir: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
    only: list[str] | None = None,
    console: Console | None = None,
) -> StudyResult:
    """Run a study (a YAML path or a parsed ``Study``) into ``runs_dir/<study>/``.

    ``only`` restricts to the named experiments. A failure is recorded in that run's
    ``metrics.json`` (status ``failed``), the study goes on, and ``StudyResult.failed`` lists it.
    """
    console = console or Console()
    study = study if isinstance(study, Study) else load_study(study)
    out = Path(runs_dir) / study.name
    n_seeds = len({c.seed for c in study.experiments if c.name == study.experiments[0].name})
    result = StudyResult(study.name, out)
    out.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(c.name for c in study.experiments))
    (out / "study.json").write_text(json.dumps({"study": study.name, "source": study.source, "experiments": order}, indent=2))
    if study.source and Path(study.source).is_file():
        shutil.copyfile(study.source, out / "study.yaml")  # the study file as it was when run
    names = {c.name for c in study.experiments}
    for name in only or []:
        if name not in names:
            raise ValueError(f"--only {name!r}: no such experiment in {study.source}; have {', '.join(sorted(names))}")
    for cfg in study.experiments:
        if only and cfg.name not in only:
            continue
        run = run_name(cfg, n_seeds)
        try:
            run_experiment(cfg, out / run, resume=resume, overwrite=overwrite, console=console)
            result.finished.append(run)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - record and continue with the next experiment
            from transferlab.runs import RunError

            console.print(f"[red]{run} failed: {type(e).__name__}: {e}[/]")
            if not isinstance(e, RunError):  # never overwrite somebody else's run directory
                write_failure(out / run, cfg, e)
            result.failed[run] = f"{type(e).__name__}: {e}"
    return result


def summarize(result: StudyResult) -> dict[str, Any]:
    return {"study": result.study, "runs_dir": str(result.runs_dir), "finished": result.finished, "failed": result.failed}
