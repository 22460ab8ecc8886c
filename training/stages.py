"""The stage protocol: how every stage (finetune, importance, convert as the pipeline runs it, distill,
evaluate, the hash-balance counts) writes its output and says it is done, the one way.

(Named `stages`, not `checkpoint`: it is about stage outputs and their records, not about model
checkpoints, which moebert.loading reads, nor about the resumable training state, training.train_state.)

- An output is a folder (a model: teacher/, moe/, student/) or a single file users read at a fixed path
  (importance.safetensors, eval_<name>.json, balance_counts.safetensors).
- It is written under a temporary sibling name and renamed when complete (moebert.atomic), so an
  interrupted stage never leaves an output a later stage could mistake for a finished one.
- It carries its record, `stage.json`: the stage name, its config and its fingerprint (a hash of the
  config and of its inputs' own fingerprints). A folder holds it inside; a file has it beside it, as
  `<file stem>.stage.json` (the file's own format stays what its readers expect).
- "Is it done?" is `finished(output, fingerprint)`, which reads that record and nothing else.
- Under torchrun only rank 0 publishes: the other ranks write into a scratch folder that is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from moebert.atomic import atomic_file, atomic_folder, write_text
from training.train_state import STATE_DIR

STAGE_FILE = "stage.json"
# Settings added after finished stages existed: left out of the fingerprint while unset (None), so
# those stages stay valid; once set they count like any other setting.
ADDED_LATER = frozenset({"attention_dropout"})
# Settings that change how a stage runs, not what it makes: never part of the fingerprint.
NOT_FINGERPRINTED = frozenset({"checkpoint_minutes", "teacher_cache_gb"})


def write_json(path: str | Path, data: dict) -> None:
    """Indented JSON, written atomically (a reader never sees half a file)."""
    write_text(path, json.dumps(data, indent=1, default=str) + "\n")


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


def record_path(output: str | Path, *, file: bool | None = None) -> Path:
    """Where an output's stage record lives: inside a folder, beside a file. file=None: decide by what
    is there now (a missing output has no record to read)."""
    out = Path(output)
    if file is None:
        file = out.is_file()
    return out.with_name(f"{out.stem}.stage.json") if file else out / STAGE_FILE


def stage_record(output: str | Path) -> dict | None:
    """The stage record of a finished output, or None (no output, no record, or an unreadable one)."""
    out = Path(output)
    if not out.exists():
        return None
    try:
        record = json.loads(record_path(out).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def finished(output: str | Path, fp: str) -> bool:
    """Is it done: True when `output` is a completed stage output with this fingerprint."""
    record = stage_record(output)
    return record is not None and record.get("fingerprint") == fp


def fingerprint(config: dict, inputs: list[str | Path | None]) -> str:
    """Hash of a stage's config and of its inputs' own fingerprints (or, for files made elsewhere, their
    stats; for hub ids, their names)."""
    h = hashlib.sha256(json.dumps(_canonical(config), sort_keys=True, default=str).encode())
    for item in inputs:
        if item is None:
            continue
        path = Path(item)
        record = stage_record(path)
        if record is not None:
            h.update(str(record.get("fingerprint", "")).encode())
        elif path.is_file():
            stat = path.stat()
            h.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            h.update(str(item).encode())  # a hub id or a folder made elsewhere: its name is all we know
    return h.hexdigest()[:16]


def resume_folder(out_dir: str | Path, fp: str) -> Path:
    """The stable temporary folder of a resumable stage: the same for a rerun with the same fingerprint."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.tmp-{fp}"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


@contextmanager
def stage_output(
    output: str | Path,
    stage: str,
    fp: str,
    config: dict,
    overwrite: bool = True,
    resumable: bool = False,
    file: bool = False,
) -> Iterator[Path]:
    """Yield a temporary folder (file=True: a temporary file path) to write the output into; on success
    it becomes `output`, with its stage record.

    Under torchrun only rank 0 publishes: the other ranks get a scratch path that is discarded, so they
    can never replace rank 0's output with their own.

    resumable (folders): the temporary folder is `resume_folder(output, fp)`, reused by a rerun, and kept
    when the stage fails while it holds a training state (`training.train_state`), so the rerun continues
    from it; any other leftover is removed.
    """
    out = Path(output)
    if _rank() != 0:
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.rank{_rank()}-"))
        try:
            yield scratch / out.name if file else scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    record = {"stage": stage, "fingerprint": fp, "config": config}
    if file:
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
        # The old record goes first: a record never describes a file other than the one beside it.
        record_path(out, file=True).unlink(missing_ok=True)
        with atomic_file(out) as tmp:
            yield tmp
        write_json(record_path(out, file=True), record)
        return
    with atomic_folder(
        out,
        overwrite=overwrite,
        tmp=resume_folder(out, fp) if resumable else None,
        keep_on_error=lambda tmp: resumable and (tmp / STATE_DIR / "state.json").is_file(),
    ) as tmp:
        yield tmp
        for state in (tmp / STATE_DIR, *tmp.glob(f".{STATE_DIR}.*")):  # the run state and any half-written one
            shutil.rmtree(state, ignore_errors=True)
        write_json(tmp / STAGE_FILE, record)


@dataclass(frozen=True)
class Stage:
    """One stage run as the pipeline sees it: its name, config, output and inputs, hence its fingerprint.

    The stage functions build theirs with the same fields (training.finetune.finetune_stage, ...), so the
    pipeline's "is it done" and the stage's own record always agree.
    """

    name: str
    config: dict
    output: Path
    inputs: tuple = ()
    file: bool = False
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", fingerprint(self.config, list(self.inputs)))

    def done(self) -> bool:
        return finished(self.output, self.fingerprint)

    def writing(self, overwrite: bool = True, resumable: bool = False):
        """stage_output for this stage: yields the temporary folder (or file) to write into."""
        return stage_output(self.output, self.name, self.fingerprint, self.config, overwrite, resumable, self.file)
