"""Named models: `model.size` -> (family, args).

Each built-in family module (`llamatron/models/<family>/__init__.py`) defines `FAMILY` (a `Family`)
and `SIZES` (name -> args); adding a family is its folder plus its module name in `FAMILY_MODULES`.
`register` adds entries at run time (tests register a toy family this way).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from llamatron.errors import LlamatronError
from llamatron.models.family import Family

FAMILY_MODULES = ("llamatron.models.llama", "llamatron.models.glam")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: Family
    args: Any


_entries: dict[str, ModelEntry] = {}
_families: dict[str, Family] = {}
_builtin_loaded = False


def _load_builtin() -> None:
    # A flag, not "is anything registered": a family registered at run time before the first lookup
    # must not hide the built-in ones.
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    for module_name in FAMILY_MODULES:
        module = importlib.import_module(module_name)
        for name, args in module.SIZES.items():
            _entries.setdefault(name, ModelEntry(name, module.FAMILY, args))
            _families.setdefault(module.FAMILY.name, module.FAMILY)


def register(name: str, family: Family, args: Any) -> ModelEntry:
    """Add (or replace) a named model of `family`."""
    # The built-in families first, so a family registered before any lookup does not hide them.
    _load_builtin()
    if not isinstance(args, family.args_type):
        raise TypeError(f"{name}: args of family {family.name} must be {family.args_type.__name__}")
    _families[family.name] = family
    _entries[name] = ModelEntry(name, family, args)
    return _entries[name]


def unregister(name: str) -> None:
    """Remove a named model added with `register` (its family goes when no entry uses it)."""
    entry = _entries.pop(name, None)
    if entry is not None and not any(e.family is entry.family for e in _entries.values()):
        _families.pop(entry.family.name, None)


def entries() -> dict[str, ModelEntry]:
    _load_builtin()
    return dict(_entries)


def families() -> dict[str, Family]:
    _load_builtin()
    return dict(_families)


def get(name: str) -> ModelEntry:
    _load_builtin()
    if name not in _entries:
        raise LlamatronError(f"config key 'model.size': unknown size {name!r}; known: {', '.join(_entries)}")
    return _entries[name]


def family_of(args: Any) -> Family:
    """The family whose args dataclass `args` is."""
    for family in families().values():
        if isinstance(args, family.args_type):
            return family
    raise LlamatronError(f"no model family takes {type(args).__name__}")


def differing_fields(entry: ModelEntry, args: Any) -> dict[str, Any]:
    """The fields of `args` that differ from the entry's: the `[model]` keys that make `args` from it."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
            if getattr(args, f.name) != getattr(entry.args, f.name)}


def closest(args: Any, exclude: tuple[str, ...] = ()) -> ModelEntry:
    """The named model of `args`'s family that differs from it in the fewest fields (ignoring `exclude`)."""
    family = family_of(args)
    same = [e for e in entries().values() if e.family is family]
    return min(same, key=lambda e: len(set(differing_fields(e, args)) - set(exclude)))
