"""Atomic writes: the one way a file or a folder is written in this project (model package, training
stages, benchmarks). The content goes to a temporary sibling (same folder, so the same file system)
that is renamed onto the final name only once it is complete, so a crash or a Ctrl-C leaves either the
previous version or the new one, never a half-written file a later reader could take for a finished one.

It lives in the model package because `moebert convert` needs it too and moebert imports no application.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it replaces `path` (os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private; the final file reads like any other
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """`path.write_text(text)` (UTF-8, newlines as given), atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


@contextmanager
def atomic_folder(
    path: str | Path,
    *,
    overwrite: bool = True,
    tmp: str | Path | None = None,
    keep_on_error: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it becomes `path` (replacing an old one).

    overwrite=False: a non-empty `path` is refused (FileExistsError) before anything is written, and
    again at the rename if one appeared meanwhile. tmp: use this (stable) folder instead of a fresh one,
    e.g. a resumable stage's; keep_on_error(tmp): keep it when the body fails (it holds what a rerun
    resumes from), else it is removed.
    """
    out = Path(path)
    if not overwrite and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    else:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
        work.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise FileExistsError(f"{out} appeared while it was being written")
            # Move the old folder aside first: a folder cannot be renamed onto a non-empty one.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            work.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(out)
    except BaseException:
        if not (keep_on_error is not None and keep_on_error(work)):
            shutil.rmtree(work, ignore_errors=True)
        raise
