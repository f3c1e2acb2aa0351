"""Reading a config file: YAML (safe loader) or JSON -> the top-level mapping, every problem one ConfigError
naming the file (and the line). training/config.py turns the mapping into the schema."""
from __future__ import annotations

import json
import os

from training.errors import ConfigError


def read_config_file(path: str) -> dict:
    """A YAML (.yaml / .yml, safe loader: no tags that build objects) or JSON file -> its top-level
    mapping; any problem is one ConfigError naming the file (and the line where the parser has one)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config file {path}:{where} not valid YAML for a config ({problem}; tags such as "
                              "!!python/... are not allowed)") from None
    else:
        try:
            tree = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections (model:, data:, optim:, ...) at "
                          f"the top level, got a {type(tree).__name__}")
    return tree
