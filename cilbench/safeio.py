"""Reading files a user did not write with care: data-set pickles, YAML cards and run files, path names.

Nothing read from a data file may run code (a restricted unpickler), nothing read from YAML may blow up in
memory or time (a bound on the expanded size of aliases), and no name taken from a card or the command line
may lead outside the output root (one safe path component).
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import yaml

from cilbench.errors import UserError

# --- pickles ------------------------------------------------------------------------------------------------

# Everything torchvision's CIFAR pickles need besides dicts, lists, ints, bytes and str: numpy arrays as
# Python 2 wrote them (_reconstruct + ndarray + dtype), as Python 3 protocol 5 writes them (_frombuffer),
# and bytes pickled by Python 3 at protocol <= 2 (_codecs.encode). numpy 2 renamed numpy.core to numpy._core.
PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _Refused(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class DataUnpickler(pickle.Unpickler):
    """Admits only the globals in PICKLE_ALLOWED; any other (os.system, builtins.eval, ...) is refused
    before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in PICKLE_ALLOWED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def load_data_pickle(path: Path, what: str = "data file") -> Any:
    """Unpickle a data-set file (latin1, as torchvision reads Python 2 pickles) without running code."""
    try:
        with open(path, "rb") as fh:
            return DataUnpickler(fh, encoding="latin1").load()
    except _Refused as exc:
        raise UserError(f"{path}: refused to load: it asks to run '{exc.name}', which a {what} never does; "
                        "replace the file with the original download") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable {what} ({type(exc).__name__}); "
                        "replace the file with the original download") from None


# --- YAML ---------------------------------------------------------------------------------------------------

YAML_MAX_BYTES = 1 << 20          # cards and config.yaml are a few KB; a megabyte is generous
YAML_MAX_NODES = 100_000          # scalars + collections after expanding every alias


def _expanded_size(node: yaml.Node, where: str) -> int:
    """Number of nodes the document has once every alias is expanded, without expanding it; refuses cycles
    (a recursive alias would make every consumer loop forever) and stops as soon as the bound is passed."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def visit(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise UserError(f"{where}: a YAML alias refers to itself; remove the recursive anchor")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(visit(child) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(visit(k) + visit(v) for k, v in n.value)
        active.discard(key)
        if total > YAML_MAX_NODES:
            raise UserError(f"{where}: YAML expands to more than {YAML_MAX_NODES} values through aliases "
                            "(an alias bomb?); write the values out or remove the anchors")
        sizes[key] = total
        return total

    return visit(node)


def safe_yaml_loads(text: str | bytes, where: str) -> Any:
    """`yaml.safe_load` with bounds: at most YAML_MAX_BYTES of text and YAML_MAX_NODES values after alias
    expansion, no recursive aliases, UTF-8 only. Every failure is a UserError naming `where`."""
    if isinstance(text, bytes):
        if len(text) > YAML_MAX_BYTES:
            raise UserError(f"{where}: {len(text)} bytes is too large for a YAML card or run file "
                            f"(limit {YAML_MAX_BYTES}); check that it is the right file")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{where}: not UTF-8 text (bad byte at offset {exc.start}); "
                            "save the file as UTF-8") from None
    if len(text) > YAML_MAX_BYTES:
        raise UserError(f"{where}: {len(text)} characters is too large for a YAML card or run file "
                        f"(limit {YAML_MAX_BYTES}); check that it is the right file")
    loader = yaml.SafeLoader(io.StringIO(text))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply; flatten it") from None
    finally:
        loader.dispose()


def safe_yaml_load(path: str | Path) -> Any:
    """Read a YAML file (a card, a run's config.yaml) with the bounds of `safe_yaml_loads`; a missing,
    unreadable, binary, oversized or alias-bomb file is a UserError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > YAML_MAX_BYTES:
            raise UserError(f"{path}: {size} bytes is too large for a YAML card or run file "
                            f"(limit {YAML_MAX_BYTES}); check that it is the right file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a YAML file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    return safe_yaml_loads(data, str(path))


# --- names that become path components ----------------------------------------------------------------------

_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,@-]{0,127}")


def check_component(value: str, what: str) -> str:
    """`value` as one directory name: letters, digits and _ . + = , @ - (not first . or -), at most 128
    characters; so it cannot climb out of (`..`), jump elsewhere (`/abs`) or hide (`.x`)."""
    if not isinstance(value, str) or not _SAFE_COMPONENT.fullmatch(value):
        raise UserError(f"{what} {value!r} cannot name a folder: use letters, digits and _ . + = , @ - "
                        "(not starting with . or -, at most 128 characters)")
    return value
