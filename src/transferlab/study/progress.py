"""The live table of a study on a parallel executor: every run queued / running (where, which epoch) / done, with an ETA."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

__all__ = ["StudyProgress"]

_STYLE = {"queued": "dim", "running": "cyan", "ok": "green", "failed": "red", "skipped": "yellow", "pruned": "magenta"}


class StudyProgress:
    """Call ``update`` as runs change state; ``with StudyProgress(...)`` shows the table live (plain at the end off a terminal)."""

    def __init__(self, console: Console, names: list[str], study_dir: Path, epochs: dict[str, int], capacity: int) -> None:
        self.console, self.study_dir, self.epochs, self.capacity = console, study_dir, epochs, capacity
        self.status = dict.fromkeys(names, "queued")
        self.worker: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.live = Live(console=console, refresh_per_second=1, get_renderable=self.table, transient=False)

    def __enter__(self) -> StudyProgress:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def add(self, name: str) -> None:
        self.status.setdefault(name, "queued")

    def update(self, name: str, status: str, worker: str = "", seconds: float | None = None) -> None:
        self.status[name] = status
        if worker:
            self.worker[name] = worker
        if status == "running":
            self.started[name] = time.time()
        if seconds is not None:
            self.seconds[name] = seconds

    def _epoch(self, name: str) -> str:
        """``3/10`` from the rows of the run's history.csv (the loop writes one per epoch)."""
        total = self.epochs.get(name)
        path = self.study_dir / name / "history.csv"
        try:
            done = max(0, len(path.read_text(encoding="utf-8").splitlines()) - 1)
        except OSError:
            done = 0
        return f"{done}/{total}" if total else str(done or "")

    def eta(self) -> float | None:
        """Seconds until the study is done: mean finished run time × the runs left, over the workers."""
        if not self.seconds:
            return None
        mean = sum(self.seconds.values()) / len(self.seconds)
        left = sum(s == "queued" for s in self.status.values())
        running = [max(0.0, mean - (time.time() - self.started[n])) for n, s in self.status.items() if s == "running" and n in self.started]
        return (left * mean + sum(running)) / max(1, min(self.capacity, left + len(running)))

    def table(self) -> Table:
        counts = {s: sum(v == s for v in self.status.values()) for s in _STYLE}
        eta = self.eta()
        title = "  ".join(f"{k} {v}" for k, v in counts.items() if v) + (f"  ETA {eta / 60:.1f} min" if eta is not None else "")
        t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
        for col in ("run", "status", "worker", "epoch", "time"):
            t.add_column(col)
        for name, status in self.status.items():
            secs = self.seconds.get(name) if status != "running" else time.time() - self.started.get(name, time.time())
            t.add_row(escape(name), f"[{_STYLE.get(status, '')}]{status}[/]", escape(self.worker.get(name, "")),
                      self._epoch(name) if status in ("running", "ok", "pruned") else "", f"{secs:.0f}s" if secs else "")
        return t
