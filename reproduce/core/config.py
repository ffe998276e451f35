"""Reading params.yaml: safe YAML, dotted overrides, and a clear error for a missing key."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the key."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (argparse prints the whole usage first, which
    for our long option lists buries the error)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_print_config_arguments(parser: argparse.ArgumentParser, does_nothing: str) -> None:
    """``--print-config`` and ``--explain``, worded the same for every command that resolves a
    run config; ``does_nothing`` says what the command then skips ("trains nothing")."""
    parser.add_argument("--print-config", action="store_true",
                        help=f"print the resolved run config as JSON and exit; {does_nothing}")
    parser.add_argument("--explain", action="store_true",
                        help="like --print-config, but one line per train / distill / image / eval option: "
                             "its value and where it comes from (code default, params.yaml, -S)")


def print_run_config(cfg: dict, sources: dict[str, str] | None = None) -> None:
    """The run config as JSON, or with ``sources`` (``{"train.lr": "params.yaml ..."}``) one
    ``key = value  # source`` line per explained option, so both commands print one format."""
    if sources is None:
        print(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        return
    for key in sorted(sources):
        section, _, option = key.partition(".")
        value = json.dumps(cfg[section][option], default=str)
        print(f"{key} = {value}  # {sources[key]}")


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    """Load ``params.yaml`` with ``yaml.safe_load``. Overrides (``-S key=value``) have one
    parser, reproduce.training.runconfig.apply_overrides, which also checks keys and types."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root)")
    with path.open() as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


def get_dotted(params: dict, key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params: missing key {key!r}")
        node = node[part]
    return node


def set_dotted(params: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = params
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a mapping")
    node[parts[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    """Return ``base`` updated recursively by ``update`` (neither input is modified)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_json(path: str | Path, obj, default=str, sort_keys: bool = True) -> None:
    """Write JSON atomically (temp file, then rename), creating the parent folder: a reader
    never sees a half-written file, even if the writer is killed."""
    from reproduce.core.outputs import write_text_atomic
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + "\n")
