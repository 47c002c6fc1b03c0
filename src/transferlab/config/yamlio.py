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


def _duplicates(node: yaml.Node, path: str, source: str) -> None:
    """Raise for the first mapping key that appears twice, naming its dotted path and both lines."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicates(item, f"{path}[{i}]", source)
    elif isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            dotted = f"{path}.{key}" if path else key
            if key in seen:
                raise ConfigError(f"{source}: duplicate key '{dotted}' (line {seen[key]} and line {line}); a key may appear only once")
            seen[key] = line
            _duplicates(value_node, dotted, source)


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
            _duplicates(root, "", source)
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
