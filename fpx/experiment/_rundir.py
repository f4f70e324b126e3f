"""The run directory's guarantees: one writer, atomic files, checkable checkpoints.

- **One writer**: `RunLock` holds an exclusive `flock` on `WORKDIR/lock` for the whole run.
  The kernel releases it when the process dies (even by `kill -9`), so a lock is never
  stale; the file names the holder (pid, host, start time) for the error a second writer gets.
- **Atomic files**: `config.json`, `summary.json` and the rewritten `metrics.jsonl` go to a
  temporary file in the same directory, are fsynced and renamed over the old one, so a crash
  leaves the old or the new file, never half of one. Appended metric lines are written whole
  with one `write` and fsynced; a crash can leave only a truncated *last* line, which resume
  drops (the evaluation is recomputed from the checkpoint before it).
- **Checkable checkpoints**: after orbax has committed a checkpoint (its own temp-dir +
  rename), `write_manifest` records the size and SHA-256 of every file in it;
  `verify_manifest` names the first file that is missing, truncated or altered.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any


class RunDirectoryError(RuntimeError):
    """A run directory is missing, in use, incomplete or corrupt; the message names the
    path, what is wrong and how to proceed.

    ```python
    import pathlib, tempfile
    from fpx.experiment import RunDirectoryError, read_jsonl
    path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
    path.write_text('{"step": 1}\\nnot json\\n{"step": 3}\\n')
    try:
        read_jsonl(path)
    except RunDirectoryError as e:
        assert "metrics.jsonl" in str(e)                     # names the file (and the line)
    else:
        raise AssertionError
    ```
    """


# ---------------------------------------------------------------- atomic files


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` by `text` atomically (temp file in the same directory, fsync, rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: pathlib.Path) -> None:
    # The rename is durable only once the directory entry is; not every OS allows this.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_lines(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append one JSON line per record, all in one `write`, flushed and fsynced."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    if not text:
        return
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in `path`; `RunDirectoryError` naming the file if it is missing or half-written.

    ```python
    import pathlib, tempfile
    from fpx.experiment import RunDirectoryError, read_json
    p = pathlib.Path(tempfile.mkdtemp()) / "summary.json"
    p.write_text('{"members": [')               # what a crash mid-write would leave
    try:
        read_json(p)
    except RunDirectoryError as e:
        assert "summary.json" in str(e) and "half-written" in str(e)
    ```
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise RunDirectoryError(f"{path} does not exist.")
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunDirectoryError(
            f"{path} is half-written or corrupt ({len(text)} bytes; {e.msg} at line {e.lineno}, column {e.colno})."
        ) from None


def ends_mid_line(path: str | os.PathLike) -> bool:
    """Whether a (JSON-lines) file ends without its final newline: a crash cut its last line."""
    path = pathlib.Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_jsonl(path: str | os.PathLike, *, tolerate_partial_tail: bool = False) -> list[dict]:
    """The records of a JSON-lines file (`[]` if it does not exist).

    A corrupt line is a `RunDirectoryError` naming the file and line. With
    `tolerate_partial_tail`, a last line without its newline (what a crash during an append
    leaves) is dropped instead.

    ```python
    import pathlib, tempfile
    from fpx.experiment import read_jsonl
    path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
    assert read_jsonl(path) == []                            # no file yet
    path.write_text('{"step": 1}\\n{"step": 2}\\n{"st')       # a crash during the last append
    assert read_jsonl(path, tolerate_partial_tail=True) == [{"step": 1}, {"step": 2}]
    ```
    """
    path = pathlib.Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    partial_tail = lines[-1] != ""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if tolerate_partial_tail and partial_tail and number == len(lines):
                break
            where = "its last line is half-written" if number == len(lines) else f"line {number} is corrupt"
            raise RunDirectoryError(f"{path}: {where} ({line[:60]!r}).") from None
    return records


# ---------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive lock on a run directory for the life of one `fpx run`.

    ```python
    import tempfile
    from fpx.experiment import RunDirectoryError, RunLock
    workdir = tempfile.mkdtemp()
    with RunLock(workdir):
        try:
            RunLock(workdir).acquire()      # a second writer is refused
        except RunDirectoryError as e:
            assert "in use" in str(e)
    ```
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = pathlib.Path(workdir) / "lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (not POSIX: no locking)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirectoryError(
                f"{self.path.parent} is in use by {holder}: only one `fpx run` may write a run directory. "
                "Wait for it to finish, or choose another --workdir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------ checkpoint manifests


def _step_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file())


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_path(manifests: pathlib.Path, step: int) -> pathlib.Path:
    return manifests / f"{step}.json"


def write_manifest(step_dir: pathlib.Path, manifests: pathlib.Path, step: int) -> None:
    """Record the size and SHA-256 of every file of a committed checkpoint."""
    manifests.mkdir(parents=True, exist_ok=True)
    files = {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _step_files(step_dir)}
    atomic_write_json(manifest_path(manifests, step), {"step": step, "files": files})


def verify_manifest(step_dir: pathlib.Path, manifests: pathlib.Path, step: int) -> str | None:
    """`None` if the checkpoint matches its manifest, else what is wrong (naming the file)."""
    path = manifest_path(manifests, step)
    if not path.exists():
        return f"it has no manifest ({path}): its save was interrupted"
    try:
        files = read_json(path)["files"]
    except (RunDirectoryError, KeyError) as e:
        return f"its manifest is unreadable ({e})"
    for name, expected in files.items():
        p = step_dir / name
        if not p.is_file():
            return f"file {p} is missing"
        size = p.stat().st_size
        if size != expected["bytes"]:
            return f"file {p} has {size} bytes, {expected['bytes']} were written"
        if _sha256(p) != expected["sha256"]:
            return f"file {p} does not match its checksum (its contents changed after the save)"
    return None


def prune_manifests(manifests: pathlib.Path, keep: Sequence[int]) -> None:
    if not manifests.exists():
        return
    for p in manifests.glob("*.json"):
        if p.stem.isdigit() and int(p.stem) not in keep:
            p.unlink(missing_ok=True)


def run_info(workdir: str | os.PathLike) -> dict[str, Any]:
    """When and how long a finished run took, from its own files: for the run notes of
    generated results tables.

    `date` (UTC) is when `summary.json` was written, `wall_s` the time from `config.json`
    to `summary.json` (training, evaluation and checkpoints; not interpreter start-up or
    data generation before the config was written), `compile_s` from `summary.json`,
    `ms_per_step` the median over `timing.jsonl` (None without timings) and `jax` the
    version of the interpreter reading the run.

    ```python
    import tempfile, fpx
    workdir = tempfile.mkdtemp()
    fpx.experiment.run("configs/quickstart.py:quick", {"train.steps": "20"}, workdir=workdir, progress=False)
    info = fpx.experiment.run_info(workdir)
    assert info["wall_s"] > 0 and info["date"].endswith("UTC") and set(info) >= {"compile_s", "ms_per_step", "jax"}
    ```
    """
    import datetime
    import importlib.metadata
    import statistics

    workdir = pathlib.Path(workdir)
    for name in ("config.json", "summary.json"):
        if not (workdir / name).is_file():
            raise RunDirectoryError(f"{workdir} has no {name}: run_info needs a finished run directory.")
    start, end = (workdir / "config.json").stat().st_mtime, (workdir / "summary.json").stat().st_mtime
    summary = read_json(workdir / "summary.json")
    times = [t["ms_per_step"] for t in read_jsonl(workdir / "timing.jsonl", tolerate_partial_tail=True)]
    return {
        "date": datetime.datetime.fromtimestamp(end, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": end - start,
        "compile_s": summary.get("compile_s"),
        "ms_per_step": statistics.median(times) if times else None,
        "jax": importlib.metadata.version("jax"),
    }
