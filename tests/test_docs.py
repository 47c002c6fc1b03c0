"""The documentation: the README as a short front door, the site's pages, the generated keys reference
and the runnable examples of docs/extending.md.

* ``docs/reference/keys.md`` must be exactly what ``scripts/gen_keys.py`` writes from the schema now:
  a key added to the schema without a docstring fails the generator, a key added without regenerating
  fails here, so no key goes undocumented.
* Every config key the hand-written pages mention — as a dotted key in backticks (`train.lr`) or as a
  key of a YAML example — must exist in that reference, so a renamed or removed key cannot linger.
* Every example marked ``<!-- example: NAME -->`` in docs/extending.md runs, in a fresh process, in a
  temporary folder (all blocks of one NAME in order).

``mkdocs build --strict`` itself (broken links, anchors, pages missing from the nav, API references
that do not resolve) runs in scripts/test.sh before the tests.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GENERATED = {DOCS / "reference" / "keys.md"}

README_MAX_LINES = 300


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_keys", REPO / "scripts" / "gen_keys.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_keys"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> Any:
    return load_generator()


@pytest.fixture(scope="module")
def keys(gen: Any) -> set[str]:
    return gen.documented_keys()


def hand_written_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if p not in GENERATED)


# --------------------------------------------------------------------------- README and site


def test_readme_is_a_short_front_door() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = readme.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the front door keeps to {README_MAX_LINES}: move detail into docs/"
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert command in readme
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/test.sh" in ci, ".ci/run must call exactly README command 2"


def nav_pages(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    return []


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = set(nav_pages(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - pages == set(), "nav entries without a page"


def test_readme_links_exist() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    missing = [t for t in targets if "://" not in t and not (REPO / t).exists()]
    assert missing == [], f"README.md links to files that do not exist: {missing}"


# --------------------------------------------------------------------------- the keys reference


def test_keys_reference_is_generated_from_the_schema(gen: Any) -> None:
    committed = (DOCS / "reference" / "keys.md").read_text(encoding="utf-8")
    assert committed == gen.render(), "docs/reference/keys.md is out of date: run .venv/bin/python scripts/gen_keys.py"


SECTIONS = ("data", "model", "head", "strategy", "train", "probe", "fewshot", "ensemble", "predict", "activations",
            "executor", "resources", "search", "tracking", "sweep")
DOTTED = re.compile(rf"^(?:{'|'.join(SECTIONS)})(?:\.[a-z_][a-z0-9_]*)+$")
FILE_SUFFIXES = (".safetensors", ".json", ".onnx", ".pt", ".pt2", ".yaml", ".csv", ".md", ".png", ".html", ".db", ".log", ".py")
NOT_CONFIG = {
    "fewshot.results",  # a metrics.json section, not a config key
}


def key_ok(key: str, keys: set[str]) -> bool:
    """``key`` is documented, or lies inside a free-form documented key (a mapping such as ``tracking`` or ``search.space``)."""
    if key in keys:
        return True
    parts = key.split(".")
    return any(".".join(parts[:i]) in FREE_FORM for i in range(1, len(parts)))


FREE_FORM = {"tracking", "search.space", "sweep.values", "executor.slurm.additional"}


def backtick_keys(text: str) -> list[str]:
    spans = re.findall(r"`([^`\n]+)`", text)
    return [s for s in spans if DOTTED.match(s) and not s.endswith(FILE_SUFFIXES) and s not in NOT_CONFIG]


def has_children(key: str, keys: set[str]) -> bool:
    return any(k.startswith(key + ".") for k in keys) and key not in FREE_FORM


def mapping_keys(mapping: dict[str, Any], prefix: str, keys: set[str]) -> list[str]:
    """Dotted keys of a (nested) config mapping, descending only into sections that have keys of their own."""
    found = []
    for k, v in mapping.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        found.append(key)
        if k == "sweep" and isinstance(v, dict):  # keys of a sweep are dotted keys themselves
            found += [str(s) for s in v]
        elif key == "search" and isinstance(v, dict):
            found += mapping_keys({s: x for s, x in v.items() if s != "space"}, "search", keys)
            found += [str(s) for s in (v.get("space") or {})]
        elif isinstance(v, dict) and has_children(key, keys):
            found += mapping_keys(v, key, keys)
    return found


def yaml_keys(text: str, keys: set[str], top_level: set[str]) -> list[str]:
    """The config keys of every ```yaml block: a study file, an experiment, or a fragment of one."""
    found = []
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        try:
            data = yaml.safe_load(block)
        except yaml.YAMLError:
            continue  # an excerpt that is not YAML on its own
        if not isinstance(data, dict) or not (set(map(str, data)) & (top_level | {"experiments", "defaults"})):
            continue  # a fragment of a section (e.g. `augment: [...]`), checked where its section is
        for entry in [data, data.get("defaults") or {}, *(data.get("experiments") or [])]:
            if isinstance(entry, dict):
                found += mapping_keys({k: v for k, v in entry.items() if k not in ("experiments", "defaults")}, "", keys)
    return found


def test_pages_mention_only_existing_keys(keys: set[str], gen: Any) -> None:
    top_level = {k for k in keys if "." not in k}
    unknown = []
    for page in hand_written_pages():
        text = page.read_text(encoding="utf-8")
        for key in backtick_keys(text) + yaml_keys(text, keys, top_level):
            if not key_ok(key, keys):
                unknown.append(f"{page.relative_to(REPO)}: {key}")
    assert unknown == [], "keys the docs mention that the schema does not have (see docs/reference/keys.md):\n" + "\n".join(sorted(set(unknown)))


def test_key_checks_catch_a_wrong_key(keys: set[str]) -> None:
    top_level = {k for k in keys if "." not in k}
    text = "Use `train.lr` and `train.lrr`.\n```yaml\nexperiments:\n  - name: a\n    train: {epoch: 3}\n    sweep: {head.dropot: [0.1]}\n```\n"
    bad = [k for k in backtick_keys(text) + yaml_keys(text, keys, top_level) if not key_ok(k, keys)]
    assert sorted(bad) == ["head.dropot", "train.epoch", "train.lrr"]


# --------------------------------------------------------------------------- Python names


NOT_PYTHON = {
    "transferlab.spec",  # the export spec's metadata key in ONNX files
    "transferlab.why_not_timm",  # a field of an exported config.json
}


def python_names(text: str) -> list[str]:
    """``transferlab.x.y`` names a page mentions, and the names its ``from transferlab.x import a, b`` lines import."""
    names = [n.rstrip(".") for n in re.findall(r"\btransferlab(?:\.[A-Za-z_][A-Za-z0-9_]*)+\.?", text)]
    for module, imported in re.findall(r"^\s*from (transferlab[\w.]*) import ([\w, ]+)", text, flags=re.M):
        names += [f"{module}.{n.strip()}" for n in imported.split(",") if n.strip()]
    return [n for n in names if n not in NOT_PYTHON]


def resolves(name: str) -> bool:
    """``name`` is a module of transferlab, or an attribute reached from one."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_pages_name_only_existing_python_objects() -> None:
    """A module or function the docs name must exist: code that moves takes its documentation along."""
    missing = sorted({f"{page.relative_to(REPO)}: {name}" for page in hand_written_pages()
                      for name in python_names(page.read_text(encoding="utf-8")) if not resolves(name)})
    assert missing == [], "the docs name Python objects that do not exist (moved or renamed?):\n" + "\n".join(missing)


def test_architecture_lists_every_registry() -> None:
    """docs/architecture.md's registry table names every Registry, at the module that holds it."""
    import transferlab  # noqa: F401 - registers everything
    from transferlab.registry import REGISTRIES

    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    listed = []
    for names, module in re.findall(r"^\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \| `(transferlab[\w.]*)`", text, flags=re.M):
        listed += [getattr(importlib.import_module(module), name) for name in re.findall(r"[A-Z_]+", names)]
    missing = [what for what, registry in REGISTRIES.items() if not any(registry is r for r in listed)]
    assert missing == [], f"registries missing from the table in docs/architecture.md: {missing}"


# --------------------------------------------------------------------------- docs/extending.md


def extending_examples() -> dict[str, str]:
    text = (DOCS / "extending.md").read_text(encoding="utf-8")
    examples: dict[str, list[str]] = {}
    for name, code in re.findall(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", text, flags=re.S):
        examples.setdefault(name, []).append(code)
    return {name: "\n\n".join(blocks) for name, blocks in examples.items()}


def test_extending_has_the_five_examples() -> None:
    assert set(extending_examples()) >= {"dataset", "strategy", "head", "kind", "executor"}


@pytest.mark.parametrize("name", sorted(extending_examples()))
def test_extending_example_runs(name: str, tmp_path: Path) -> None:
    script = tmp_path / f"example_{name}.py"
    script.write_text(extending_examples()[name], encoding="utf-8")
    env = {**os.environ, "TRANSFERLAB_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"docs/extending.md example '{name}' failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
