"""Architecture test: the modules of transferlab form layers, checked on the import graph.

The graph is read with `ast` only (nothing is imported). Every import statement counts, at module
level or inside a function; `if TYPE_CHECKING:` blocks are skipped because they never run.
The checker fails on:

1. an import cycle between modules;
2. an upward import (a module importing a higher layer, or another layer of the same rank);
3. a private import: `from pkg.x import _name` outside pkg.x, a private submodule (`pkg.x._y`) imported
   from outside its package, or `alias._name` where `alias` is a module of the package;
4. a function-level (lazy) import of a module of the package; lazy imports are only for third-party
   packages (heavy optional dependencies);

and on any module that is in no layer. The checker is a set of plain functions (`module_graph`,
`find_problems`), tested on the fake package under tests/fixtures/layers_pkg.
"""

from __future__ import annotations

import ast
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Layer:
    """A named layer; a module may import its own layer and layers of a lower rank only."""

    name: str
    rank: int
    packages: tuple[str, ...] = ()  # these modules and everything below them (module or package)
    modules: tuple[str, ...] = ()  # exactly these modules


# The layers of transferlab, lowest first. docs/architecture.md ("The layers") describes the same layers;
# keep the two in step. Layers of the same rank are separate: they may not import each other.
LAYERS: tuple[Layer, ...] = (
    Layer("base", 0, packages=("transferlab.registry", "transferlab.files")),
    Layer("config", 1, packages=("transferlab.config",)),
    Layer("data", 2, packages=("transferlab.data",)),
    Layer("rundir", 3, packages=("transferlab.rundir",)),  # low: every layer above reads or writes run folders
    Layer("models", 4, packages=("transferlab.models",)),
    Layer("strategies", 5, packages=("transferlab.strategies",)),
    Layer("engine", 6, packages=("transferlab.engine",)),
    Layer("kinds", 7, packages=("transferlab.kinds",)),
    Layer("study", 8, packages=("transferlab.study",)),
    Layer("results", 9, packages=("transferlab.results",)),  # compare, report, export (a package of formats), trackers
    Layer("tools", 10, packages=("transferlab.tools",)),  # predict / activations read exports; inspection registers run sections
    Layer("cli", 11, packages=("transferlab.cli",)),
    Layer("api", 12, modules=("transferlab", "transferlab.__main__")),
)

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "layers_pkg"

# Endings of the problem messages.
NO_LAYER = "add it to LAYERS in tests/test_layers.py"
LAZY = "import it at module level (function-level imports are only for third-party packages)"
PRIVATE_NAME = "private names may only be used inside their own module"
PRIVATE_MODULE = "private modules may only be imported inside their own package"


# --------------------------------------------------------------------------- the import graph


@dataclass(frozen=True)
class Edge:
    """One module of the package named by one import statement."""

    source: str  # the importing module
    target: str  # the imported module, absolute
    line: int
    lazy: bool  # inside a function body


@dataclass
class Module:
    """One module of the package (a package's __init__.py is the package module itself)."""

    name: str
    path: Path
    edges: list[Edge] = field(default_factory=list)
    private_uses: list[tuple[int, str]] = field(default_factory=list)  # (line, what is wrong)


def is_private(name: str) -> bool:
    """`_name` and `__name` are private; dunders such as `__version__` are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def inside(module: str, package: str) -> bool:
    """Whether `module` is `package` itself or below it."""
    return module == package or module.startswith(package + ".")


def module_paths(root: Path, package: str) -> dict[str, Path]:
    """Every module under `root` (the directory of `package`) by its dotted name."""
    paths: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        paths[".".join((package, *parts))] = path
    return paths


def _dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None for anything but a name followed by attributes."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Scanner(ast.NodeVisitor):
    """Collects the edges and private uses of one module."""

    def __init__(self, module: Module, is_package: bool, package: str, known: frozenset[str]) -> None:
        self.module = module
        self.is_package = is_package
        self.package = package
        self.known = known
        self.bindings: dict[str, str] = {}  # local name -> module it is bound to by an import
        self.attributes: list[tuple[int, list[str]]] = []  # private attribute chains, resolved at the end
        self.function_depth = 0

    # -- scopes
    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        for statement in node.orelse:  # only the body is for type checkers; `else:` runs
            self.visit(statement)

    # -- imports
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            top = alias.name.partition(".")[0]
            self.bindings[alias.asname or top] = alias.name if alias.asname else top
            self.add_edge(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self.resolve(node)
        if base is None:
            return
        names = []
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in self.known:
                self.bindings[alias.asname or alias.name] = submodule
                self.add_edge(submodule, node.lineno)
            else:
                names.append(alias.name)
        if not names:
            return
        self.add_edge(base, node.lineno)
        if inside(base, self.package) and base != self.module.name:
            for name in filter(is_private, names):
                self.private(node.lineno, f"imports private name {name} from {base}: {PRIVATE_NAME}")

    def resolve(self, node: ast.ImportFrom) -> str | None:
        """The absolute module of `from ... import`; None for a relative import above the top."""
        if node.level == 0:
            return node.module
        parts = self.module.name.split(".")
        if not self.is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        if not parts:
            return None
        return ".".join(parts + ([node.module] if node.module else []))

    def add_edge(self, target: str, line: int) -> None:
        if not inside(target, self.package):
            return
        self.module.edges.append(Edge(self.module.name, target, line, lazy=self.function_depth > 0))
        parts = target.split(".")
        for i, part in enumerate(parts):
            owner = ".".join(parts[:i])
            if is_private(part) and not inside(self.module.name, owner):
                self.private(line, f"imports private module {target} from outside {owner}: {PRIVATE_MODULE}")
                return

    # -- attribute access on imported modules
    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = _dotted(node)
        if chain and is_private(chain[-1]) and not any(map(is_private, chain[1:-1])):
            self.attributes.append((node.lineno, chain))
        self.generic_visit(node)

    def resolve_attributes(self) -> None:
        """Report `alias._name` where `alias` (or `alias.sub`) is a module of the package."""
        for line, chain in self.attributes:
            if chain[0] not in self.bindings:
                continue
            owner = ".".join([self.bindings[chain[0]], *chain[1:-1]])
            if owner in self.known and owner != self.module.name:
                self.private(line, f"uses private name {chain[-1]} of {owner}: {PRIVATE_NAME}")

    def private(self, line: int, message: str) -> None:
        self.module.private_uses.append((line, message))


def module_graph(root: Path, package: str) -> dict[str, Module]:
    """Parse every module under `root` (the directory of `package`) into its imports of the package."""
    paths = module_paths(root, package)
    known = frozenset(paths)
    graph: dict[str, Module] = {}
    for name, path in paths.items():
        module = Module(name, path)
        scanner = _Scanner(module, path.name == "__init__.py", package, known)
        scanner.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        scanner.resolve_attributes()
        graph[name] = module
    return graph


# --------------------------------------------------------------------------- the rules


def layer_of(module: str, layers: tuple[Layer, ...]) -> Layer | None:
    """The layer whose most specific entry names `module`, or None."""
    best: tuple[int, Layer] | None = None
    for layer in layers:
        matches = [p for p in layer.packages if inside(module, p)] + [m for m in layer.modules if m == module]
        for pattern in matches:
            if best is None or len(pattern) > best[0]:
                best = (len(pattern), layer)
    return best[1] if best else None


def layer_problem(edge: Edge, layers: tuple[Layer, ...]) -> str | None:
    """What is wrong with `edge` between layers, if anything (modules in no layer are reported apart)."""
    source, target = layer_of(edge.source, layers), layer_of(edge.target, layers)
    if source is None or target is None or source is target or target.rank < source.rank:
        return None
    kind = "upward import" if target.rank > source.rank else "import between separate layers of the same rank"
    return f"imports {edge.target} ({target.name}, rank {target.rank}) from {source.name} (rank {source.rank}): {kind}"


def module_problems(module: Module, layers: tuple[Layer, ...], where: str) -> list[str]:
    """Private uses, lazy imports of the package and layer violations of one module, by line."""
    found = list(module.private_uses)
    for edge in module.edges:
        if edge.lazy:
            found.append((edge.line, f"imports {edge.target} inside a function: {LAZY}"))
        problem = layer_problem(edge, layers)
        if problem:
            found.append((edge.line, problem))
    return [f"{where}:{line} {message}" for line, message in sorted(found, key=lambda item: item[0])]


def first_edges(graph: dict[str, Module]) -> dict[str, dict[str, Edge]]:
    """For each module, its imported modules of the graph with the first edge to each (no self-edges)."""
    adjacency: dict[str, dict[str, Edge]] = {name: {} for name in graph}
    for module in graph.values():
        for edge in module.edges:
            known = adjacency[module.name].get(edge.target)
            if edge.target in graph and edge.target != module.name and (known is None or edge.line < known.line):
                adjacency[module.name][edge.target] = edge
    return adjacency


def strongly_connected(adjacency: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(adjacency[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            components.append(sorted(component))

    for node in sorted(adjacency):
        if node not in index:
            connect(node)
    return components


def shortest_cycle(start: str, members: set[str], adjacency: dict[str, dict[str, Edge]]) -> list[Edge]:
    """The edges of a shortest cycle through `start` inside one strongly connected component."""
    parent: dict[str, Edge] = {}
    queue = [start]
    for node in queue:
        for other, edge in sorted(adjacency[node].items()):
            if other == start:
                path = [edge]
                while path[0].source != start:
                    path.insert(0, parent[path[0].source])
                return path
            if other in members and other not in parent:
                parent[other] = edge
                queue.append(other)
    raise AssertionError(f"{start} is on no cycle")


def cycle_problems(graph: dict[str, Module], display: dict[str, str]) -> list[str]:
    """One message per import cycle group: a shortest loop, with the line of each edge."""
    adjacency = first_edges(graph)
    problems = []
    for component in strongly_connected(adjacency):
        if len(component) < 2:
            continue
        cycle = shortest_cycle(component[0], set(component), adjacency)
        loop = " -> ".join([edge.source for edge in cycle] + [component[0]])
        lines = "; ".join(f"{display[edge.source]}:{edge.line} imports {edge.target}" for edge in cycle)
        message = f"import cycle: {loop} ({lines})"
        if len(component) > len(cycle):
            message += f"; all {len(component)} modules of this tangle: {', '.join(component)}"
        problems.append(message)
    return problems


def find_problems(root: Path, package: str, layers: tuple[Layer, ...], display_base: Path | None = None) -> list[str]:
    """Everything wrong with the layering of `package` (directory `root`).

    Files are shown relative to `display_base` (default: the directory above `root`).
    """
    graph = module_graph(root, package)
    base = display_base or root.parent
    display = {name: _display(module.path, base) for name, module in graph.items()}
    problems = [
        f"{display[name]}: module {name} is in no layer; {NO_LAYER}"
        for name in graph
        if layer_of(name, layers) is None
    ]
    for name, module in sorted(graph.items()):
        problems += module_problems(module, layers, display[name])
    return problems + cycle_problems(graph, display)


def _display(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


# --------------------------------------------------------------------------- transferlab itself


def test_transferlab_layers_are_respected() -> None:
    problems = find_problems(REPO / "src" / "transferlab", "transferlab", LAYERS, display_base=REPO)
    assert not problems, f"{len(problems)} layering problem(s):\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the checker, on a fake package

FAKE_LAYERS: tuple[Layer, ...] = (
    Layer("base", 0, packages=("fakepkg.util",)),
    Layer("core", 1, packages=("fakepkg.core",)),
    Layer("app", 2, packages=("fakepkg.app",)),
    Layer("tools", 2, packages=("fakepkg.tools",)),
    Layer("api", 3, modules=("fakepkg", "fakepkg.__main__")),
)

MARK = re.compile(r"#\s*\[mark:(\w+)\]")


@dataclass(frozen=True)
class Case:
    """Lines appended to (or new files in) a copy of fakepkg, and the exact problems they cause.

    Expected messages refer to `# [mark:NAME]` lines of the fixture or of the added text as {NAME}.
    """

    id: str
    add: dict[str, str]
    expected: tuple[str, ...] = ()



CASES = (
    Case(
        "cycle",
        {"core/_impl.py": "from fakepkg.core import model  # [mark:impl]\n"},
        (
            "import cycle: fakepkg.core._impl -> fakepkg.core.model -> fakepkg.core._impl"
            " (fakepkg/core/_impl.py:{impl} imports fakepkg.core.model;"
            " fakepkg/core/model.py:{model_imports_impl} imports fakepkg.core._impl)",
        ),
    ),
    Case(
        "cycle-through-package-init",
        {"core/_impl.py": "from fakepkg.core import Model  # [mark:impl]\n"},
        (
            "import cycle: fakepkg.core -> fakepkg.core.model -> fakepkg.core._impl -> fakepkg.core"
            " (fakepkg/core/__init__.py:{init_imports_model} imports fakepkg.core.model;"
            " fakepkg/core/model.py:{model_imports_impl} imports fakepkg.core._impl;"
            " fakepkg/core/_impl.py:{impl} imports fakepkg.core)",
        ),
    ),
    Case(
        "cycle-via-function-level-import",
        {"core/_impl.py": "\n\ndef late():\n    from . import model  # [mark:impl]\n    return model\n"},
        (
            f"fakepkg/core/_impl.py:{{impl}} imports fakepkg.core.model inside a function: {LAZY}",
            "import cycle: fakepkg.core._impl -> fakepkg.core.model -> fakepkg.core._impl"
            " (fakepkg/core/_impl.py:{impl} imports fakepkg.core.model;"
            " fakepkg/core/model.py:{model_imports_impl} imports fakepkg.core._impl)",
        ),
    ),
    Case(
        "upward",
        {"tools.py": "import fakepkg  # [mark:up]\n"},
        ("fakepkg/tools.py:{up} imports fakepkg (api, rank 3) from tools (rank 2): upward import",),
    ),
    Case(
        "upward-relative",
        {"core/_impl.py": "from .. import tools  # [mark:up]\n"},
        ("fakepkg/core/_impl.py:{up} imports fakepkg.tools (tools, rank 2) from core (rank 1): upward import",),
    ),
    Case(
        "same-rank",
        {"tools.py": "from fakepkg.app import run  # [mark:side]\n"},
        (
            "fakepkg/tools.py:{side} imports fakepkg.app (app, rank 2) from tools (rank 2):"
            " import between separate layers of the same rank",
        ),
    ),
    Case(
        "private-name",
        {"app.py": "from fakepkg.util import _private  # [mark:p]\n"},
        (f"fakepkg/app.py:{{p}} imports private name _private from fakepkg.util: {PRIVATE_NAME}",),
    ),
    Case(
        "private-submodule-from",
        {"app.py": "from fakepkg.core import _impl  # [mark:p]\n"},
        (f"fakepkg/app.py:{{p}} imports private module fakepkg.core._impl from outside fakepkg.core: {PRIVATE_MODULE}",),
    ),
    Case(
        "private-submodule-import",
        {"app.py": "import fakepkg.core._impl  # [mark:p]\n"},
        (f"fakepkg/app.py:{{p}} imports private module fakepkg.core._impl from outside fakepkg.core: {PRIVATE_MODULE}",),
    ),
    Case(
        "private-attribute",
        {"app.py": "SECRET = util._private  # [mark:p]\n"},
        (f"fakepkg/app.py:{{p}} uses private name _private of fakepkg.util: {PRIVATE_NAME}",),
    ),
    Case(
        "function-level-import",
        {"app.py": "\n\ndef late():\n    from fakepkg.core import model  # [mark:lazy]\n    return model\n"},
        (f"fakepkg/app.py:{{lazy}} imports fakepkg.core.model inside a function: {LAZY}",),
    ),
    Case(
        "method-level-import",
        {"tools.py": "\n\nclass Tool:\n    def run(self):\n        from . import util  # [mark:lazy]\n"},
        (f"fakepkg/tools.py:{{lazy}} imports fakepkg.util inside a function: {LAZY}",),
    ),
    Case(
        "module-in-no-layer",
        {"extra.py": "X = 1\n"},
        (f"fakepkg/extra.py: module fakepkg.extra is in no layer; {NO_LAYER}",),
    ),
    Case(
        "package-in-no-layer",
        {"plugins/__init__.py": ""},
        (f"fakepkg/plugins/__init__.py: module fakepkg.plugins is in no layer; {NO_LAYER}",),
    ),
    Case(
        "type-checking-is-ignored",
        {
            "core/model.py": "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
            "    from fakepkg.app import run\n    from fakepkg.util import _private\n"
        },
    ),
    Case(
        "typing-dot-type-checking-is-ignored",
        {"util.py": "\nimport typing\n\nif typing.TYPE_CHECKING:\n    import fakepkg.core\n"},
    ),
    Case(
        "type-checking-else-branch-counts",
        {
            "tools.py": "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    pass\n"
            "else:\n    import fakepkg  # [mark:up]\n"
        },
        ("fakepkg/tools.py:{up} imports fakepkg (api, rank 3) from tools (rank 2): upward import",),
    ),
    Case(
        "lazy-third-party-import",
        {"util.py": "\n\ndef plot():\n    import numpy\n    from matplotlib import pyplot\n    return numpy, pyplot\n"},
    ),
    Case(
        "dunder-and-public-attributes",
        {"app.py": "from fakepkg.util import __doc__ as DOC\nSEP = util.helper\nNAME = util.__name__\n"},
    ),
)


def copy_fixture(tmp_path: Path, add: dict[str, str]) -> Path:
    """A copy of tests/fixtures/layers_pkg with `add` appended to (or written as new) files of fakepkg."""
    tree = tmp_path / "layers_pkg"
    shutil.copytree(FIXTURE, tree, ignore=shutil.ignore_patterns("__pycache__"))
    for relative, text in add.items():
        path = tree / "fakepkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        path.write_text(old + ("" if old.endswith("\n") or not old else "\n") + text, encoding="utf-8")
    return tree


def marks(tree: Path) -> dict[str, int]:
    """The line number of each `# [mark:NAME]` comment under `tree`."""
    found: dict[str, int] = {}
    for path in sorted(tree.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for name in MARK.findall(line):
                assert name not in found, f"mark {name} is used twice"
                found[name] = number
    return found


def test_clean_fixture_has_no_problems() -> None:
    assert find_problems(FIXTURE / "fakepkg", "fakepkg", FAKE_LAYERS, display_base=FIXTURE) == []


def test_module_graph_resolves_relative_and_submodule_imports() -> None:
    graph = module_graph(FIXTURE / "fakepkg", "fakepkg")
    targets = {name: sorted({edge.target for edge in module.edges}) for name, module in graph.items()}
    assert targets == {
        "fakepkg": ["fakepkg.app"],
        "fakepkg.__main__": ["fakepkg"],
        "fakepkg.app": ["fakepkg.core", "fakepkg.util"],
        "fakepkg.core": ["fakepkg.core.model"],
        "fakepkg.core._impl": [],
        "fakepkg.core.model": ["fakepkg.core._impl", "fakepkg.util"],
        "fakepkg.tools": ["fakepkg.util"],
        "fakepkg.util": [],
    }


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_checker_reports_exactly_the_added_problem(case: Case, tmp_path: Path) -> None:
    tree = copy_fixture(tmp_path, case.add)
    expected = [message.format(**marks(tree)) for message in case.expected]
    assert find_problems(tree / "fakepkg", "fakepkg", FAKE_LAYERS, display_base=tree) == expected
