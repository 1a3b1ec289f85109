"""Atomic file output: a crash or a bad input never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


# Temporary names are ".<name>.<8 hex digits>" beside their target, so a later run can find the
# ones a killed process left behind (remove_temps).
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}$")


def _temp_sibling(path: Path, create: Callable[[Path], None]) -> Path:
    """Create a fresh temporary name beside `path` with `create` (which fails if it exists)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}"
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            continue


def _new_file(tmp: Path) -> None:
    # Mode 0o666 lets the kernel apply the umask (and default ACLs), as for any program's output.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _temp_sibling(path, _new_file)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds.

    An old `path` is first renamed aside (to a temporary name), never deleted in place, so a
    kill at any moment leaves either the old folder or the new one whole, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, lambda p: p.mkdir(0o777))
    old = None
    try:
        yield tmp
        _follow_umask(tmp)
        if path.exists():
            old = _temp_sibling(path, lambda p: p.mkdir(0o700))
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover)


def _follow_umask(folder: Path) -> None:
    """Give everything in `folder` the modes the umask allows, as `folder` itself got them (some
    writers, such as safetensors, create private 0600 files)."""
    allowed = folder.stat().st_mode & 0o777
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(parent) / name
            if p.is_symlink():
                continue
            mode = p.stat().st_mode
            full = 0o777 if name in dirs or mode & 0o100 else 0o666
            if mode & 0o777 != full & allowed:
                os.chmod(p, full & allowed)


def remove_temps(root: str | Path, folders: bool = True) -> list[Path]:
    """Remove the temporary files (and, with `folders`, folders) that atomic_path/atomic_dir left
    under `root` when their process was killed; returns what was removed. Only safe while no other
    process writes them (hold run_lock; a stage's temporary folder, its stage_lock)."""
    removed = []
    for parent, dirs, files in os.walk(root):
        if not folders:
            # Another process may be writing inside a stage's temporary folder: leave it whole.
            dirs[:] = [d for d in dirs if not _TEMP_NAME.match(d)]
        for name in [n for n in dirs + files if _TEMP_NAME.match(n)]:
            target = Path(parent) / name
            if name in dirs:
                shutil.rmtree(target, ignore_errors=True)
                dirs.remove(name)
            else:
                target.unlink(missing_ok=True)
            removed.append(target)
    return removed


def _hold(path: Path, on_wait: Callable[[], None]):
    """A filelock on `path`, acquired: at once where it is free, else after `on_wait()`, waiting."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        on_wait()
        lock.acquire()
    return lock


@contextmanager
def stage_lock(folder: str | Path, on_wait: Callable[[], None] = lambda: None) -> Iterator[Path]:
    """Hold the lock of one stage folder (`parent/.NAME.lock`) for the block, waiting (after
    `on_wait()`) for the worker or run that holds it; then remove the temporary folders a killed
    writer of this stage left beside it. The system releases the lock when its process dies."""
    folder = Path(folder)
    lock = _hold(folder.parent / f".{folder.name}.lock", on_wait)
    try:
        for tmp in folder.parent.glob(f".{folder.name}.*"):
            if _TEMP_NAME.match(tmp.name) and tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
        yield folder
    finally:
        lock.release()


@contextmanager
def run_lock(folder: str | Path, log: Callable[[str], None] = print, stages_too: bool = True) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if needed) for the block, waiting for another
    process that holds it; then clear the temporary leftovers of killed runs (`stages_too`: the
    stage folders' too, for a holder that keeps every stage to itself; else only files, as the
    stages' temporary folders belong to their stage_lock).

    The lock is `filelock` on `folder/.lock` (flock on Linux and macOS, LockFileEx on Windows):
    the system releases it when its process dies, so a killed run never leaves a stale lock
    behind. The holder's pid is in `folder/.lock.pid`, for the message a waiting run prints."""
    folder = Path(folder)

    def waiting() -> None:
        try:
            holder = (folder / ".lock.pid").read_text(encoding="utf-8").strip() or "?"
        except OSError:
            holder = "?"
        log(f"{folder} is in use by another run (pid {holder}); waiting for it to finish")

    lock = _hold(folder / ".lock", waiting)
    try:
        with open(folder / ".lock.pid", "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
        remove_temps(folder, folders=stages_too)
        yield folder
    finally:
        lock.release()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read once per process while its size and mtime are unchanged (model
    files are hashed by the manifest, stage keys, metrics and adapter checks alike)."""
    st = Path(path).stat()
    return _sha256(Path(path).resolve(), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
