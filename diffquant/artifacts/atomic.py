"""Atomic file publication: write under a temporary name, fsync, rename, fsync the directory.

A crash, a kill or a full disk therefore never leaves a file under its final name that is
incomplete. Temporary names end in `.partial` so a resumed run can delete leftovers by pattern.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

PARTIAL_SUFFIX = ".partial"


def partial_path(final: Path) -> Path:
    """The temporary name a file is written under before it is published."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it to `final`, and give it the permissions the umask allows.

    safetensors 0.8 writes files with mode 0600 whatever the umask (safetensors #782); a
    calibration artifact is meant to be shared, so the mode is reset here.
    """
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, final)
    fsync_directory(final.parent)


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """The one way a file is written here: `write(tmp)` writes it under its temporary name
    (`partial_path`), then it is published; on any error the temporary goes and the old file, if
    any, stays. Returns `path`."""
    tmp = partial_path(path)
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: Path, obj: Any) -> None:
    """`write_bytes_atomic` for a JSON document (sorted keys, two-space indent)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
