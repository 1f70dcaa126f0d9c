"""Reading files a user did not write with care, and writing files where a user may have planted links.

Nothing read from a data file may run code (a restricted unpickler), nothing read from YAML may blow up in
memory or time (a bound on the expanded size of aliases), no name taken from a card or the command line
may lead outside the output root (one safe path component), and no write follows a link: every file
cilbench writes goes through `atomic_write`, `append_line` or `open_for_update` here.
"""
from __future__ import annotations

import errno
import io
import os
import pickle
import re
import secrets
import stat
from pathlib import Path
from typing import IO, Any, Callable

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
    unreadable, binary, oversized, non-regular (a device, a FIFO) or alias-bomb file is a UserError naming
    the file."""
    data = read_bounded(path, YAML_MAX_BYTES, "a YAML card or run file")
    return safe_yaml_loads(data, str(path))


# --- bounded reads --------------------------------------------------------------------------------------------

def read_bounded(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. A device (/dev/zero), a FIFO or a socket is
    refused before a byte is read (O_NONBLOCK: opening a FIFO without a writer would wait forever), and at
    most limit + 1 bytes are ever read, whatever the size claims. Every failure is a UserError naming it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected {what}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{path}: is a folder, expected {what}")
        if not stat.S_ISREG(mode):
            raise UserError(f"{path}: not a regular file (a device, FIFO or socket); point at {what}")
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(data) > limit:
        raise UserError(f"{path}: more than {limit} bytes is too large for {what}; check that it is the "
                        "right file")
    return data


# --- writes that never follow a link ---------------------------------------------------------------------------

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _link_refused(path: Path, how: str) -> UserError:
    return UserError(f"{path}: {how}; cilbench never writes through links: remove it (it was not made by "
                     "cilbench)")


def check_no_linked_folder(path: Path, root: str | Path) -> None:
    """Every folder from `root` (exclusive) down to `path`'s parent is a real folder, not a symlink, so a write
    at `path` stays below root."""
    root = Path(root)
    folder = Path(path).parent
    while folder != root and root in folder.parents:
        if folder.is_symlink():
            raise _link_refused(folder, f"is a symbolic link to {os.readlink(folder)}")
        folder = folder.parent


def make_folder(path: str | Path, root: str | Path) -> Path:
    """mkdir -p `path` below `root`, refusing a symlink at any level under root (a planted `tables -> ~`)."""
    path = Path(path)
    check_no_linked_folder(path / "x", root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_for_update(path: str | Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """os.open for a file cilbench keeps updating in place (a lock, an append-only log): never through a
    symlink (O_NOFOLLOW), and refused when what is there is not a regular file or has another hard link
    (a write would land in a file outside the folder). Returns the descriptor."""
    path = Path(path)
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_refused(path, "is a symbolic link") from None
        raise
    info = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode)
               else f"has {info.st_nlink} hard links" if info.st_nlink > 1 else "")
    if problem:
        os.close(fd)
        raise _link_refused(path, problem)
    os.set_blocking(fd, True)
    return fd


def append_line(path: str | Path, text: str) -> None:
    """Append one line to a log file (events.jsonl) without following a link."""
    fd = open_for_update(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")


def atomic_write(path: str | Path, data: str | bytes | Callable[[IO[bytes]], Any],
                 root: str | Path | None = None) -> Path:
    """Write `data` (text, bytes, or a function that writes to a binary file) to a new temporary file beside
    `path` and rename it over `path`. The temporary gets a fresh random name and O_EXCL | O_NOFOLLOW, so a
    planted file or link is never opened; the rename replaces a link at `path` instead of writing through
    it. With `root`, the folders between root and path must not be links either."""
    path = Path(path)
    if root is not None:
        check_no_linked_folder(path, root)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def foreign_entries(folder: str | Path) -> list[Path]:
    """What in `folder` (recursively, never following links) cilbench would not have made: symbolic links,
    files with more than one hard link, devices, FIFOs and sockets."""
    found = []
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            entry = Path(parent) / name
            info = entry.lstat()
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
                found.append(entry)
    return found


def check_no_foreign_entries(folder: str | Path, what: str, only=None) -> None:
    """Refuse a folder cilbench writes into (a run directory, sweep logs) that holds a link or special file;
    `only(path)` limits the check to the entries cilbench itself writes to (another tool's links may stay)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    found = [e for e in foreign_entries(folder) if only is None or only(e)]
    if found:
        entry = found[0]
        info = entry.lstat()
        kind = ("a symbolic link" if stat.S_ISLNK(info.st_mode) else
                f"a file with {info.st_nlink} hard links" if stat.S_ISREG(info.st_mode) else
                "not a regular file (a FIFO, device or socket)")
        raise UserError(f"{entry}: {kind} in {what} {folder}, which cilbench did not create; remove it "
                        "(cilbench never writes through links)")


# --- names that become path components ----------------------------------------------------------------------

_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,@-]{0,127}")


def check_component(value: str, what: str) -> str:
    """`value` as one directory name: letters, digits and _ . + = , @ - (not first . or -), at most 128
    characters; so it cannot climb out of (`..`), jump elsewhere (`/abs`) or hide (`.x`)."""
    if not isinstance(value, str) or not _SAFE_COMPONENT.fullmatch(value):
        raise UserError(f"{what} {value!r} cannot name a folder: use letters, digits and _ . + = , @ - "
                        "(not starting with . or -, at most 128 characters)")
    return value
