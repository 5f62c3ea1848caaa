"""Atomic file writes, and the clean-up of what a killed writer leaves behind.

Every artifact is written to a temporary name beside its destination and renamed into place, so
an interrupted run never leaves a file that loads as if it were whole: readers see either the
old file, the new one, or none. Temporary names carry the writer's PID (`.NAME.tmp-PID`, and
`.NAME.old-PID` for a folder being swapped out), so `remove_stale_temps` can tell the leftovers
of a dead process (SIGKILL, power loss) from the work of a live one and remove only those.

Also the one place that says where the scratchlm cache folder is (`cache_dir`), for every layer that
caches (corpus parsing, device measurements).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open `path.tmp-<pid>` for writing; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def cache_dir() -> Path:
    """The cache folder: `$SCRATCHLM_CACHE`, else `$XDG_CACHE_HOME/scratchlm`, else `~/.cache/scratchlm`."""
    root = os.environ.get("SCRATCHLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "scratchlm"
    )
    return Path(root)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it into place when the block succeeds.

    An existing directory at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files and folders that dead processes left in `folder`; return their names.

    A `.NAME.old-PID` whose NAME is missing is the previous version of NAME, moved aside by a
    folder swap that was killed halfway: it is put back instead of removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        m = _TEMP.match(entry.name)
        if m is None or pid_alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["what"] == "old" and not target.exists():
            os.replace(entry, target)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed
