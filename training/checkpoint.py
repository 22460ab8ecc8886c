"""Stage output folders: written under a temporary name and renamed when complete, so an interrupted
stage never leaves a folder a later stage could mistake for a finished one. Each finished folder
carries `stage.json`: which stage made it, from what inputs, with which config (the resume key)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from training.train_state import STATE_DIR

STAGE_FILE = "stage.json"
# Settings added after finished stages existed: left out of the fingerprint while unset (None), so
# those stages stay valid; once set they count like any other setting.
ADDED_LATER = frozenset({"attention_dropout"})
# Settings that change how a stage runs, not what it makes: never part of the fingerprint.
NOT_FINGERPRINTED = frozenset({"checkpoint_minutes", "teacher_cache_gb"})


def _canonical(value):
    if isinstance(value, dict):
        return {
            k: _canonical(v)
            for k, v in value.items()
            if k not in NOT_FINGERPRINTED and not (k in ADDED_LATER and v is None)
        }
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def fingerprint(config: dict, inputs: list[str | Path | None]) -> str:
    """Hash of a stage's config and of its input folders' own fingerprints (or file stats)."""
    h = hashlib.sha256(json.dumps(_canonical(config), sort_keys=True, default=str).encode())
    for item in inputs:
        if item is None:
            continue
        path = Path(item)
        record = path / STAGE_FILE
        if record.is_file():
            h.update(json.loads(record.read_text()).get("fingerprint", "").encode())
        elif path.is_file():
            stat = path.stat()
            h.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            h.update(str(item).encode())  # a hub id or a folder made elsewhere: its name is all we know
    return h.hexdigest()[:16]


def finished(out_dir: str | Path, fp: str) -> bool:
    """True when out_dir holds a completed stage output with this fingerprint."""
    record = Path(out_dir) / STAGE_FILE
    if not record.is_file():
        return False
    try:
        return json.loads(record.read_text()).get("fingerprint") == fp
    except json.JSONDecodeError:
        return False


def resume_folder(out_dir: str | Path, fp: str) -> Path:
    """The stable temporary folder of a resumable stage: the same for a rerun with the same fingerprint."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.tmp-{fp}"


@contextmanager
def stage_output(
    out_dir: str | Path, stage: str, fp: str, config: dict, overwrite: bool = True, resumable: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success it becomes out_dir (with stage.json).

    Under torchrun only rank 0 publishes: the other ranks get a scratch folder that is discarded, so
    they can never replace rank 0's checkpoint with their own (empty) folder.

    resumable: the temporary folder is `resume_folder(out_dir, fp)`, reused by a rerun, and kept when
    the stage fails while it holds a training state (`training.train_state`), so the rerun continues
    from it; any other leftover is removed.
    """
    out = Path(out_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.rank{os.environ['RANK']}-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    if out.exists() and not overwrite and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if resumable:
        tmp = resume_folder(out, fp)
        tmp.mkdir(exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        shutil.rmtree(tmp / STATE_DIR, ignore_errors=True)
        (tmp / STAGE_FILE).write_text(
            json.dumps({"stage": stage, "fingerprint": fp, "config": config}, indent=1, default=str)
        )
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        if not (resumable and (tmp / STATE_DIR / "state.json").is_file()):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
