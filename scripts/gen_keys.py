"""Write docs/reference/keys.md, the config keys reference, from the schema's dataclasses.

    .venv/bin/python scripts/gen_keys.py           # rewrite docs/reference/keys.md
    .venv/bin/python scripts/gen_keys.py --check   # exit 1 if the file is not what the schema gives

Every key of an experiment (``transferlab.config.schema``), of a study file's top level and of its
``executor:`` / ``resources:`` / ``search:`` sections (``transferlab.config.scaling``) gets a row: its
dotted name, type, default and the field's docstring (the string literal after the field, read with
``ast``). A field without a docstring takes its text from ``FALLBACK_HELP`` below, and the generator
fails if neither has one, so a new key cannot go undocumented. ``tests/test_docs.py`` checks that the
committed file equals the output and that the keys the hand-written pages mention exist.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from transferlab.config import study as study_module
from transferlab.config.scaling import ExecutorConfig, Resources, SearchSpec
from transferlab.config.schema import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "reference" / "keys.md"

# Fields that have no docstring in the schema (short, obvious ones): their description here.
FALLBACK_HELP = {
    "name": "Experiment name: the run folder's name (``<name>.seed<k>`` with several seeds).",
    "seed": "Seeds the split, the initialisation, shuffling, augmentation and dropout.",
    "data": "Which images, how they are split and prepared (section below).",
    "model": "The backbone and its weights (section below).",
    "head": "The new classifier on the backbone (section below).",
    "strategy": "What trains (section below).",
    "train": "The optimisation loop (section below).",
    "probe": "``kind: logistic`` / ``kind: knn`` settings (section below).",
    "fewshot": "``kind: fewshot`` settings (section below).",
    "ensemble": "``kind: ensemble`` settings (section below); in a study file, use the top-level ``ensembles:``.",
    "train.epochs": "Training epochs (early stopping may end the run sooner).",
    "train.batch_size": "Training batch; under DDP the global batch, split over the ranks.",
    "train.weight_decay": "Weight decay of the optimizer (decoupled for ``adamw``).",
    "train.label_smoothing": "Label smoothing of the cross-entropy (with ``train.mixup``, use its own ``label_smoothing``).",
    "train.early_stopping": "Early stopping; its ``monitor`` also picks the ``best`` checkpoint (section below).",
    "train.max_grad_norm": "Clip the gradient norm to this value; ``null`` = no clipping.",
    "train.lr_find.start": "The sweep's first learning rate.",
    "train.early_stopping.min_delta": "An improvement smaller than this does not count.",
    "fewshot.ways": "Classes per episode (N-way).",
    "fewshot.shots": "Support images per class and episode (K-shot).",
    "fewshot.episodes": "Evaluation episodes (the accuracy is their mean, with a 95% confidence interval).",
    "executor.slurm": "Slurm job options (section below).",
    "executor.slurm.partition": "Slurm partition (``--partition``); ``null`` = the cluster's default.",
    "executor.slurm.mem_gb": "Memory per job, GB; ``null`` = the experiment's ``resources.mem_gb``.",
    "executor.slurm.account": "Slurm account (``--account``).",
    "executor.slurm.qos": "Slurm quality of service (``--qos``).",
    "executor.slurm.constraint": "Slurm node constraint (``--constraint``).",
    "resources.cpus": "CPU cores one run asks for (Ray task, Slurm job; ``local`` splits the cores itself).",
    "resources.gpus": "GPUs one run asks for: a whole number, or a fraction of one (Ray).",
    "resources.mem_gb": "Memory one run asks for, GB; ``null`` = no request.",
    "search.trials": "Trials (runs) of the search.",
    "search.sampler": "Optuna sampler: ``tpe``, ``random`` or ``grid`` (``grid``: every dimension a ``choice``).",
}

# The keys at the top of a study file (``transferlab.config.study``): what each one is.
STUDY_KEYS = {
    "study": "The study's name: runs go to ``runs/<study>/<experiment>/``. Required.",
    "description": "Free text about the study.",
    "seeds": "Run every experiment once per seed (``[0, 1, 2]``); tables show mean ± std.",
    "defaults": "An experiment mapping merged into every experiment (any key of the experiment tables below).",
    "experiments": "The experiments: a list of experiment mappings (keys below), each with a ``name``; an entry may also "
    "have ``sweep:``, ``search:`` and ``resources:``.",
    "sweep": "Dotted key -> list of values: every experiment becomes one experiment per value (several keys: a grid). "
    "Also per experiment.",
    "ensembles": "Votes over experiments of the study, run after them: ``{name, members, vote}`` (``vote``: ``hard`` or ``soft``).",
    "executor": "Where the runs execute: a name or a mapping (the ``executor`` table below).",
    "resources": "What one run asks of a worker (the ``resources`` table below); also per experiment.",
    "tracking": "Where every experiment is also logged (``tensorboard``, ``mlflow``): the default of each experiment's ``tracking``.",
}

# Keys an entry of ``experiments:`` may have besides the experiment's own (they shape the study, not one run).
ENTRY_KEYS = {
    "sweep": "Dotted key -> list of values: this experiment becomes one experiment per value (several keys: a grid).",
    "search": "An Optuna search over dotted keys; each trial is a run (the ``search`` table below).",
    "resources": "What one run of this experiment asks of a worker, over the study's ``resources`` (the ``resources`` table below).",
}

# Which page of the site explains each section.
SEE = {
    "": "configuration.md", "data": "datasets.md", "model": "strategies.md#weights", "model.truncate": "strategies.md#truncation",
    "head": "strategies.md#heads", "strategy": "strategies.md#strategies",
    "strategy.unfreeze": "strategies.md#trainability-schedules-and-discriminative-learning-rates", "train": "recipes.md",
    "train.lr_find": "recipes.md#lr-finder", "train.early_stopping": "runs.md", "train.mixup": "recipes.md",
    "train.ema": "recipes.md", "probe": "frozen-features.md", "fewshot": "frozen-features.md", "ensemble": "results.md#ensembles",
    "predict": "results.md#outside-images-in-a-study", "activations": "results.md#outside-images-in-a-study",
    "sweep": "configuration.md#sweeps", "executor": "scaling.md", "executor.slurm": "scaling.md", "resources": "scaling.md",
    "search": "scaling.md#search",
}


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after its annotation in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = after.value.value
    return docs


def nested_dataclass(tp: Any) -> type | None:
    """The dataclass of a field typed ``X`` or ``X | None``; None for anything else."""
    if dataclasses.is_dataclass(tp):
        return tp  # type: ignore[return-value]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None  # type: ignore[return-value]


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def show_default(value: Any) -> str:
    if value is MISSING:
        return "—"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{value!r}`"


def clean(text: str) -> str:
    """A docstring as one Markdown table cell: RST ``code`` -> `code`, one line, pipes escaped."""
    text = " ".join(inspect.cleandoc(text).split()).replace("``", "`")
    parts = text.split("`")  # odd parts are code spans, where a pipe needs no escape (and would show the backslash)
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def show_type(tp: str) -> str:
    """``float | None`` as `float` or `None`: a pipe would split the table cell on GitHub, even in a code span."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(tp):
        depth += ch in "[(" and 1 or (-1 if ch in "])" else 0)
        if ch == "|" and depth == 0:
            parts.append(tp[start:i].strip())
            start = i + 1
    parts.append(tp[start:].strip())
    return " or ".join(f"`{part.replace('|', 'or')}`" for part in parts)


@dataclasses.dataclass
class Row:
    key: str
    type: str
    default: str
    help: str


def section_rows(cls: type, prefix: str, sections: dict[str, tuple[type, list[Row]]]) -> None:
    """Fill ``sections[prefix]`` with the rows of ``cls``; nested dataclasses become sections of their own."""
    docs = attribute_docs(cls)
    hints = typing.get_type_hints(cls)
    rows: list[Row] = []
    sections[prefix] = (cls, rows)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        help_text = docs.get(f.name) or FALLBACK_HELP.get(key)
        if not help_text:
            raise SystemExit(f"config key {key!r} has no docstring in {cls.__module__}.{cls.__name__} "
                             "and no entry in FALLBACK_HELP of scripts/gen_keys.py: document it")
        rows.append(Row(key, show_type(str(f.type)), show_default(default_of(f)), clean(help_text)))
        sub = nested_dataclass(hints[f.name])
        if sub is not None:
            section_rows(sub, key, sections)


def all_sections() -> tuple[dict[str, tuple[type, list[Row]]], dict[str, tuple[type, list[Row]]]]:
    """(experiment sections, study-file sections), each: dotted prefix -> (class, rows)."""
    experiment: dict[str, tuple[type, list[Row]]] = {}
    section_rows(ExperimentConfig, "", experiment)
    study: dict[str, tuple[type, list[Row]]] = {}
    section_rows(ExecutorConfig, "executor", study)
    section_rows(Resources, "resources", study)
    section_rows(SearchSpec, "search", study)
    return experiment, study


def study_keys() -> list[str]:
    keys = list(study_module._STUDY_KEYS)  # noqa: SLF001 - the parser's own list is the truth
    missing = [k for k in keys if k not in STUDY_KEYS]
    if missing:
        raise SystemExit(f"study-file keys without a description in STUDY_KEYS of scripts/gen_keys.py: {missing}")
    return keys


def documented_keys() -> set[str]:
    """Every dotted key this reference documents (experiment keys, study-file keys and their sections)."""
    experiment, study = all_sections()
    keys = {row.key for _, rows in [*experiment.values(), *study.values()] for row in rows}
    return keys | set(study_keys()) | set(ENTRY_KEYS)


def render_section(prefix: str, cls: type, rows: list[Row], link_prefix: str = "../") -> list[str]:
    title = prefix or "Experiment (top level)"
    lines = [f"### {title}", ""]
    doc = inspect.getdoc(cls) or ""
    if doc and prefix:
        lines += [" ".join(doc.split("\n\n")[0].split()).replace("``", "`"), ""]
    if prefix in SEE:
        lines += [f"See [{SEE[prefix].split('#')[0].removesuffix('.md')}]({link_prefix}{SEE[prefix]}).", ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{r.key}` | {r.type} | {r.default} | {r.help} |" for r in rows]
    return [*lines, ""]


def render() -> str:
    experiment, study = all_sections()
    lines = [
        "# Config keys",
        "",
        "<!-- Generated by scripts/gen_keys.py from transferlab.config.schema and transferlab.config.scaling: do not edit by hand;",
        "     run `.venv/bin/python scripts/gen_keys.py` after changing the schema (tests/test_docs.py checks it). -->",
        "",
        "Every key a study file may use, with its type, default and meaning, generated from the schema's",
        "dataclasses and their docstrings. Every key is checked when a study is read: an unknown key is an",
        "error naming the closest valid one, a wrong type or an impossible value is rejected before any data",
        "is loaded (see [Configuration](../configuration.md)). Nested sections are written as mappings",
        "(`train: {mixup: {alpha: 0.2}}`) or, in `sweep:` and `search:`, as dotted keys (`train.mixup.alpha`).",
        "",
        "## Study file",
        "",
        "The top level of a study file (`transferlab.config.study`):",
        "",
        "| key | description |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {clean(STUDY_KEYS[k])} |" for k in study_keys()]
    lines += ["", "An entry of `experiments:` may also have:", "", "| key | description |", "|---|---|"]
    lines += [f"| `{k}` | {clean(v)} |" for k, v in ENTRY_KEYS.items()]
    lines += ["", "## Experiment", "",
              "The keys of one experiment (`transferlab.config.schema.ExperimentConfig`): an entry of `experiments:`,",
              "or `defaults:`. The fully resolved experiment is saved as `config.yaml` in its run directory.", ""]
    for prefix, (cls, rows) in experiment.items():
        lines += render_section(prefix, cls, rows)
    lines += ["## Scaling sections", "",
              "`executor:` (top level), `resources:` (top level or per experiment) and `search:` (per experiment) say how",
              "a study runs, not what it computes: they are not part of `config.yaml` (`transferlab.config.scaling`).", ""]
    for prefix, (cls, rows) in study.items():
        lines += render_section(prefix, cls, rows)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reference/keys.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(REPO)} is out of date: run .venv/bin/python scripts/gen_keys.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
