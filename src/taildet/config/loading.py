"""Reading YAML configs (``_base_`` inheritance, duplicate keys rejected, ``1e-3`` a number),
``--opts`` overrides and writing a config back out."""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from taildet.config.merge import _exclusive_fix, _merge
from taildet.config.schema import Config
from taildet.config.upgrade import _finetune_section
from taildet.config.validate import validate_sections
from taildet.config.validators import _fmt
from taildet.errors import ConfigError
from taildet.fileio import atomic_write_text


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (PyYAML keeps the last
    silently, e.g. ``lr: 0.5`` and ``lr: 0.01`` on two lines of the same section)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)

# YAML 1.1 (PyYAML) reads ``1e-3`` as the string "1e-3" (its floats need a dot: ``1.0e-3``);
# YAML 1.2 and every other reader take it as a number. taildet does too: a config value written
# ``1e-3`` is the float 0.001, in files and in ``--opts`` overrides alike.
_FLOAT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789"))


def _yaml_error_text(e: yaml.YAMLError) -> str:
    """One line for a PyYAML error: the problem and where it is (PyYAML's own text spans lines
    and quotes the file)."""
    if isinstance(e, yaml.MarkedYAMLError):
        problem = " ".join(str(e.problem or e.context or "syntax error").split())
        mark = e.problem_mark or e.context_mark
        if "'\\t'" in problem or "\t" in problem:
            problem += " (YAML indents with spaces, not tabs)"
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return problem + where
    return " ".join(str(e).split())


def _yaml_load(text_or_stream):
    """``yaml.load`` with taildet's loader: safe, duplicate keys rejected, ``1e-3`` a number."""
    return yaml.load(text_or_stream, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"{path}: _base_: inheritance cycle ({' -> '.join(chain + (path,))})")
    if not os.path.isfile(path):
        where = f"{chain[-1]}: _base_: " if chain else ""
        raise ConfigError(f"{where}config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = _yaml_load(fh)  # safe: SafeLoader + duplicate-key check
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_error_text(e)}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    base = raw.pop("_base_", None)
    if base is None:
        return raw
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for b in bases:
        if not isinstance(b, str):
            raise ConfigError(f"{path}: _base_: expected a file name, got {_fmt(b)}")
        bpath = b if os.path.isabs(b) else os.path.join(os.path.dirname(path), b)
        merged = _merge(merged, _read_yaml(bpath, chain + (path,)))
    return _merge(_exclusive_fix(merged, raw), raw)



def config_from_dict(raw: dict, file: str | None = None) -> Config:
    """Validate a nested dict (as in a YAML file, no ``_base_``) into a :class:`Config`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{file or 'config'}: expected a mapping at the top level")
    if "finetune" in raw:
        raw = _finetune_section(raw, file)
    return validate_sections(raw, file)


def load_config(path: str | os.PathLike) -> Config:
    """Load and validate a YAML config (following ``_base_``). Errors name the key and the file."""
    path = os.fspath(path)
    raw = _read_yaml(path)
    return config_from_dict(raw, file=path)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = _yaml_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {_yaml_error_text(e)}") from None
    return key.split("."), value


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A new config with ``KEY=VALUE`` overrides applied (values parsed as YAML) and validated.

    Setting ``train.epochs`` clears ``train.iterations`` and vice versa; ``data.train_json``
    clears ``data.synthetic`` and vice versa, so a single override switches the mode.
    """
    raw = cfg.to_dict()
    for item in overrides or []:
        parts, value = _parse_override(item)
        over: dict = {}
        node = over
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        raw = _exclusive_fix(raw, over)
        node = raw
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = node[p]
        node[parts[-1]] = value
    src = f"{cfg.source} (with overrides)" if cfg.source else "overrides"
    out = config_from_dict(raw, file=src)
    out.source = cfg.source
    return out


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg.to_dict()`` as YAML (atomically: temp file + rename)."""
    atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), path)
