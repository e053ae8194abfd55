"""Writing output directories so that nothing half-written is ever left where a result is expected.

- `atomic_directory`: a context manager yielding a temporary sibling of the target, renamed onto the target
  when the block succeeds and removed when it fails;
- `write_directory`: run a writer (``save_peft``, ``save_base``, ...) for a directory that may be remote
  (``gs://...``, through etils.epath): locally it writes through `atomic_directory`; for a remote target it
  writes to a local temporary directory, then copies the files up.
- `write_text_atomic`: one file written to a temporary sibling and renamed over the target, so a file whose
  presence marks finished work (``results.json``, ``result.json``) is never seen half-written;
- `output_directory`: a job's output directory, created for the job and removed again (with the parents it
  created) when the job fails before leaving anything worth keeping there; `new_directories` and
  `remove_unused` are its two halves, for a job that holds the directory longer than one block;
- `json_ready`: NaN and infinities -> None, so reports stay valid JSON.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class atomic_directory:
    """Context manager: yields a temporary sibling of ``target``, renamed to ``target`` on success.

    ``target`` must not exist, or be an empty directory; on an exception the temporary directory is removed
    and nothing appears at ``target``.
    """

    def __init__(self, target: str | Path):
        self.target = Path(target)

    def __enter__(self) -> Path:
        if self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir())):
            raise FileExistsError(f"{self.target}: already exists and is not empty; choose a new directory")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{secrets.token_hex(4)}"
        self.tmp.mkdir()  # unlike tempfile.mkdtemp, honours the umask (the directory is the final output)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.target.is_dir():
            self.target.rmdir()  # empty, checked on entry
        os.replace(self.tmp, self.target)
        return False


def write_directory(target, write: Callable[[Path], Any]) -> None:
    """``write(path)`` for the directory ``target`` (a local path or an etils.epath remote path), atomically.

    A local ``target`` that already exists (a resumed run exporting again) is replaced only once the new
    one is complete, so a failed write leaves the old one in place.
    """
    if "://" not in str(target):
        target = Path(target)
        new = target.parent / f".{target.name}.new-{secrets.token_hex(4)}"
        with atomic_directory(new) as tmp:
            write(tmp)
        old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
        if target.exists():
            os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "out"
        write(local)
        target.mkdir(parents=True, exist_ok=True)
        for f in local.iterdir():
            (target / f.name).write_bytes(f.read_bytes())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling renamed over it."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def new_directories(path: str | Path) -> list[Path]:
    """The directories that creating ``path`` (with its parents) would create, innermost first."""
    path = Path(path)
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_unused(created: list[Path], scratch: tuple[str, ...] = ()) -> None:
    """Undo `new_directories`' ``created`` after a failure: delete the ``scratch`` files (a lock, a settings
    record) of the innermost, then each directory left empty; a directory holding anything else is kept."""
    if created:
        for name in scratch:
            (created[0] / name).unlink(missing_ok=True)
    for directory in created:
        if not directory.is_dir() or any(directory.iterdir()):
            return
        directory.rmdir()


@contextlib.contextmanager
def output_directory(path: str | Path | None, scratch: tuple[str, ...] = ()) -> Iterator[Path | None]:
    """Create the directory ``path`` (and its parents) for the block and yield it; when the block raises,
    remove what this call created unless it holds files other than ``scratch`` (partial work a rerun resumes
    from). A directory that existed before is never touched. ``None`` yields None (no output)."""
    if path is None:
        yield None
        return
    created = new_directories(path)
    Path(path).mkdir(parents=True, exist_ok=True)
    try:
        yield Path(path)
    except BaseException:
        remove_unused(created, scratch)
        raise


def json_ready(value):
    """Lists/dicts of floats with NaN or infinity -> None (JSON has neither)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
