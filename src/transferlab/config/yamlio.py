"""Reading YAML strictly: safe tags only, duplicate keys refused, ``1e-3`` read as a number.

PyYAML keeps the last of two equal keys (``train: {lr: 0.1, lr: 0.001}`` silently becomes 0.001);
here that is an error naming the key and both lines. PyYAML follows YAML 1.1, whose float rule
wants ``1.0e-3``; the loader also reads ``1e-3`` / ``3E4`` as floats, as users write them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from transferlab.config.schema import ConfigError

__all__ = ["load_yaml", "load_yaml_file"]


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (duplicate keys are found on the node tree first)."""


MAX_EXPANDED_NODES = 1_000_000
"""How many values a file may hold once its aliases (``*name``) are expanded. A study file has hundreds; an
alias bomb ("billion laughs": each level refers to the one before ten times) has 10^9 in 80 lines, which every
later step (merging defaults, copying configs) would expand."""


def _expanded_size(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand to more than ``MAX_EXPANDED_NODES`` values, or refer to themselves.

    Each node is sized once (aliases share node objects in the composed tree), so this takes time linear in the
    file's length however large the expansion.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            kids = _children(node)
            sizes[key] = min(1 + sum(sizes[id(k)] for k in kids), MAX_EXPANDED_NODES + 1)
            active.discard(key)
            if sizes[key] > MAX_EXPANDED_NODES:
                line = node.start_mark.line + 1
                raise ConfigError(
                    f"{source}: the aliases (*name) from line {line} on expand to more than {MAX_EXPANDED_NODES:,} values "
                    "(an alias bomb, 'billion laughs'?); refused. Write the values out, or refer to each anchor fewer times"
                )
            continue
        if key in sizes:
            continue
        if key in active:
            raise ConfigError(f"{source}: line {node.start_mark.line + 1}: an alias (*name) refers to a value that contains it; refused")
        active.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _duplicates(root: yaml.Node, source: str) -> None:
    """Raise for the first mapping key that appears twice, naming its dotted path and both lines.

    Iterative, and each node is visited once: an aliased node is checked where it is defined (its anchor), not
    again at every alias, so a file full of aliases costs no more than its length.
    """
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(node.value))))
        elif isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            children = []
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = key_node.value, key_node.start_mark.line + 1
                dotted = f"{path}.{key}" if path else key
                if key in seen:
                    raise ConfigError(f"{source}: duplicate key '{dotted}' (line {seen[key]} and line {line}); a key may appear only once")
                seen[key] = line
                children.append((value_node, dotted))
            stack.extend(reversed(children))


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str, source: str) -> Any:
    """Parse ``text``; any problem is a ConfigError naming ``source`` (and the key and lines of a duplicate)."""
    try:
        root = yaml.compose(text, Loader=StrictLoader)
        if root is not None:
            _expanded_size(root, source)
            _duplicates(root, source)
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


def load_yaml_file(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    return load_yaml(text, str(path))
