"""Output paths checked before long work starts: an unwritable path should fail in one line, not
after minutes of generation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mag.errors import InputError
from mag.io.files import check_folder_writable, check_output

__all__ = ["check_output_dir", "check_output_file"]


def _probe(folder: Path, name: str, what: str, advice: str) -> None:
    """Write and delete an empty file in ``folder``: the only test that holds for every
    filesystem."""
    probe = folder / f".{name}.mag-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputError(f"cannot write {what}: {err.strerror or err}; {advice}") from err


def check_output_dir(path: str | Path, option: str = "-o") -> Path:
    """Check that the output folder exists as a folder or can be created (it is created when the
    first file is written), or raise a one-line InputError saying why not. Nothing is left on
    disk."""
    out = Path(path)
    advice = f"choose a writable folder with {option}"
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} is not a folder; give a folder with {option}")
    check_folder_writable(out, f"into {out}")
    if out.is_dir():
        _probe(out, "folder", f"into {out}", advice)
    return out


def check_output_file(path: str | Path, suffixes: Iterable[str] = (),
                      inputs: Iterable[str | Path] = ()) -> Path:
    """Check an output file before the work (see :func:`mag.io.files.check_output`) and probe its
    folder."""
    target = Path(path)
    if target.is_dir() and not target.is_symlink():
        raise InputError(f"output {target} is a folder; give a file name such as "
                         f"{target / 'out.mp4'}")
    check_output(target, suffixes=suffixes, inputs=inputs)
    if target.parent.is_dir():
        _probe(target.parent, target.name, str(target), "choose a writable output path")
    return target
