"""The one way the project writes a file: checked first, then temp file + fsync + atomic rename.

Invariants: a reader sees the old file or the whole new one, never a partial one; nothing but a
regular file (or nothing) is ever replaced -- not a symlink, FIFO, device node or folder -- nor a
file the command is reading; the suffix matches the data's format. :func:`check_output` runs these
checks alone, so a command can refuse its output before the work starts.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mag.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FIGURE_SUFFIXES", "SAFETENSORS_SUFFIXES", "PathLike", "atomic_path", "check_output",
           "check_folder_writable", "fsync_folder", "save_figure", "write_json", "write_text"]

PathLike = str | os.PathLike[str]
# Suffix of every safetensors file the project writes (models, checkpoints, tables, pairs).
SAFETENSORS_SUFFIXES = (".safetensors",)
# What a plain open(path, "w") gives under the process umask; mkstemp makes 0600.
_DEFAULT_FILE_MODE = 0o666


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _same_file(a: os.stat_result, path: Path) -> bool:
    try:
        b = path.stat()
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _refuse_target(target: Path, inputs: Iterable[PathLike]) -> None:
    """Raise if ``target`` exists as anything but a regular file, or is one of ``inputs``."""
    try:
        info = target.lstat()
    except FileNotFoundError:
        return
    except OSError as err:
        raise InputError(f"cannot write {target}: {err.strerror or err}") from err
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"refusing to replace {target}: it is {_kind(info.st_mode)}, not a "
                         "regular file;"
                         " give a new file name")
    for source in inputs:
        if _same_file(info, Path(source)):
            raise InputError(f"refusing to write {target}: it is the input {source} this command "
                             "reads;"
                             " give another output name")


def check_output(path: PathLike, *, suffixes: Iterable[str] = (), inputs: Iterable[PathLike] = (),
                 what: str = "output") -> Path:
    """Check that ``path`` may be written (before any work, creating nothing): folder creatable and
    writable, suffix in ``suffixes`` (when given), not a non-regular file, not one of ``inputs``.
    One-line InputError if not."""
    target = Path(path)
    allowed = tuple(s.lower() for s in suffixes)
    if allowed and target.suffix.lower() not in allowed:
        raise InputError(f"{what} {target} must end in {' or '.join(allowed)} (the format written);"
                         f" got {target.suffix or 'no suffix'!r}")
    _refuse_target(target, inputs)
    check_folder_writable(target.parent, str(target))
    return target


def check_folder_writable(folder: PathLike, what: str) -> None:
    """``folder`` exists as a writable folder, or its nearest existing ancestor does (so that it can
    be created when the output is written); nothing is created here."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write {what}: {existing} is not a folder; choose a writable path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {what}: folder {existing} is not writable; choose a "
                         "writable path")


def fsync_folder(folder: PathLike) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse fsync on
    folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: PathLike, *, suffixes: Iterable[str] = (), inputs: Iterable[PathLike] = (),
                what: str = "output") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (same suffix, so format-sniffing writers work);
    when the block succeeds, fsync it and rename it onto ``path``. On any error the target is
    untouched."""
    target = check_output(path, suffixes=suffixes, inputs=inputs, what=what)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}",
                                    dir=target.parent)
    except OSError as err:
        raise InputError(
            f"cannot write {target}: {err.strerror or err}; choose a writable path"
        ) from err
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _DEFAULT_FILE_MODE & ~_umask())
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _refuse_target(target, inputs)  # again: the target may have appeared while we worked
        try:
            os.replace(tmp, target)
        except OSError as err:
            raise InputError(f"cannot write {target}: {err.strerror or err}") from err
        fsync_folder(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: PathLike, text: str, **checks: Any) -> Path:
    """Write ``text`` (UTF-8) atomically; ``checks`` as in :func:`atomic_path`."""
    with atomic_path(path, **checks) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: PathLike, data: Any, *, indent: int = 2, allow_nan: bool = False,
               **checks: Any) -> Path:
    """Write ``data`` as JSON (strict unless ``allow_nan``) plus a newline, atomically."""
    text = json.dumps(data, indent=indent, allow_nan=allow_nan) + "\n"
    return write_text(path, text, **{"suffixes": (".json",), **checks})


# Figure formats matplotlib writes, chosen by the output's suffix.
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def save_figure(fig: Figure, path: PathLike, **savefig: Any) -> Path:
    """``fig.savefig`` through :func:`atomic_path`; the format is the suffix (one of
    FIGURE_SUFFIXES)."""
    target = Path(path)
    with atomic_path(target, suffixes=FIGURE_SUFFIXES, what="figure") as tmp:
        fig.savefig(tmp, format=target.suffix[1:].lower(), **savefig)
    return target
