"""The method registry and where methods come from.

A method is found in three places, in this order:
  1. the built-in plug-ins, `cilbench.methods` (the repository's methods/ folder);
  2. the entry-point group `cilbench.methods` of any installed package
     (`[project.entry-points."cilbench.methods"] my_method = "my_package.my_module"`);
  3. files or packages named by `--plugin PATH` or the `CILBENCH_PLUGINS` variable (paths joined by ':').

Path plug-ins are written back to `CILBENCH_PLUGINS` when loaded, so every process a run or a sweep starts
(a local worker, a Slurm job) loads the same methods. A name registered twice is an error, never a silent
replacement: a plug-in cannot shadow DER by accident.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pkgutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from cilbench.config import did_you_mean
from cilbench.errors import UserError
from cilbench.provenance import git_commit

ENTRY_POINT_GROUP = "cilbench.methods"
PLUGIN_VARIABLE = "CILBENCH_PLUGINS"


@dataclass
class Entry:
    cls: type
    defaults: dict
    source: dict            # where the method came from: kind, module, file, version / commit


REGISTRY: dict[str, Entry] = {}
_loading: dict[str, Any] = {"source": None}      # the source of the module being imported right now
_loaded_paths: list[str] = []
_builtins_loaded = False
_entry_points_loaded = False


def register(name: str, **defaults):
    """Class decorator: `@register("der")`; `register("der_prune", prune=True)(DER)` adds an alias whose
    config defaults differ. A name that is already registered is a one-line error."""
    def wrap(cls: type) -> type:
        if not cls.name:
            cls.name = name
        if not cls.family:
            cls.family = cls.name
        source = _loading["source"] or _source_of_module(cls.__module__)
        known = REGISTRY.get(name)
        if known is not None and known.cls is not cls:
            raise UserError(f"method name '{name}' from {_where(source)} is already registered by "
                            f"{_where(known.source)}; rename the plug-in's method")
        REGISTRY[name] = Entry(cls, defaults, source)
        return cls
    return wrap


def _where(source: dict) -> str:
    return source.get("file") or source.get("module") or "?"


def _source_of_module(module: str) -> dict:
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    kind = "builtin" if module.startswith("cilbench.methods") else "module"
    return {"kind": kind, "module": module, "file": path}


def _file_hash(path: Path) -> str | None:
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12] if files else None


# --------------------------------------------------------------------------------------------------------
# Loading

def load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import cilbench.methods as plugins
    for info in pkgutil.iter_modules(plugins.__path__):
        name = f"{plugins.__name__}.{info.name}"
        _import(name, {"kind": "builtin", "module": name})


def load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        source = {"kind": "entry point", "module": ep.value.split(":")[0], "entry_point": ep.name,
                  "package": dist.name if dist else None, "version": dist.version if dist else None}
        try:
            _loading["source"] = source
            ep.load()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"plug-in entry point '{ep.name}' ({ep.value}) failed to import: "
                            f"{type(exc).__name__}: {exc}") from None
        finally:
            _loading["source"] = None


def load_path(path: str | Path) -> None:
    """Import a plug-in file (`my_method.py`) or package folder (with __init__.py) by path."""
    path = Path(path).expanduser().resolve()
    if str(path) in _loaded_paths:
        return
    if path.is_dir():
        init = path / "__init__.py"
        if not init.is_file():
            raise UserError(f"--plugin {path}: a folder needs an __init__.py (or give the .py file)")
        location, search = init, [str(path)]
    elif path.is_file() and path.suffix == ".py":
        location, search = path, None
    else:
        raise UserError(f"--plugin {path}: not a .py file or a package folder")
    module = f"cilbench_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module, location, submodule_search_locations=search)
    source = {"kind": "path", "module": module, "file": str(path), "sha256": _file_hash(path),
              "git_commit": git_commit(path)}
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    try:
        _loading["source"] = source
        spec.loader.exec_module(mod)
    except UserError:
        sys.modules.pop(module, None)
        raise
    except Exception as exc:
        sys.modules.pop(module, None)
        raise UserError(f"--plugin {path}: failed to import: {type(exc).__name__}: {exc}") from None
    finally:
        _loading["source"] = None
    _loaded_paths.append(str(path))
    os.environ[PLUGIN_VARIABLE] = os.pathsep.join(_loaded_paths)   # children load the same plug-ins


def plugin_paths() -> list[str]:
    """The path plug-ins loaded in this process (absolute), for the commands a sweep starts."""
    return list(_loaded_paths)


def _import(name: str, source: dict) -> None:
    try:
        _loading["source"] = source
        importlib.import_module(name)
    finally:
        _loading["source"] = None


def load_plugins(paths: list[str] | None = None) -> None:
    """Built-ins, installed entry points, then `paths` and the CILBENCH_PLUGINS variable."""
    load_builtins()
    load_entry_points()
    env = [p for p in os.environ.get(PLUGIN_VARIABLE, "").split(os.pathsep) if p]
    for path in [*env, *(paths or [])]:
        load_path(path)


def get_method(name: str) -> Entry:
    load_plugins()
    if name not in REGISTRY:
        raise UserError(f"unknown method '{name}'{did_you_mean(name, REGISTRY)}; known: {', '.join(sorted(REGISTRY))} "
                        "(a method of your own: --plugin path/to/file.py)")
    return REGISTRY[name]


def known_methods() -> dict[str, Entry]:
    load_plugins()
    return dict(sorted(REGISTRY.items()))
