"""One writer per output: a lock that a second writer sees and refuses in one line.

Local outputs: `fcntl.flock` on a lock file beside the output, `<parent>/.<name>.diffquant-lock`
(beside, not inside, so that the lock outlives the directory switch of an `--overwrite`, and the
output holds only artifact files). The file records the holder's pid, host and start time, which
the refusal quotes. The kernel drops a flock when its process dies, so the lock of a run killed
with `kill -9` is stale by construction: the next writer takes it over (`stale_holder` records
whom it replaced). The holder deletes the file on release; a writer that locked a file deleted
under it (its inode no longer the path's) tries again.

fsspec stores: a lease object `<url>/.diffquant.lock`, created with a conditional write
(`pipe_file(mode="create")`: S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`, the memory store's
`xb`), holding pid, host, a token and an expiry time `LEASE_SECONDS` ahead. A thread renews it
every `LEASE_SECONDS / 4`. A lease whose expiry has passed (a killed holder stops renewing), or
whose holder is a dead process of this host, is stale: it is deleted and created again,
conditionally, so of two writers that both find it stale one wins. A backend without conditional
create falls back to write-then-read-back of the token, which narrows, but cannot close, the
window in which two writers both succeed.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "calib"
    >>> with OutputLock(out):
    ...     pass
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from diffquant.artifacts.location import ArtifactLocation
from diffquant.errors import ArtifactError

LEASE_NAME = ".diffquant.lock"
LEASE_SECONDS = 120.0
_BUSY_FIX = "wait for that run to finish, or choose another output"


def lock_path(directory: Path) -> Path:
    """The lock file of a local output directory: a hidden sibling of it."""
    directory = Path(os.path.abspath(directory))
    return directory.with_name(f".{directory.name}.diffquant-lock")


class OutputLock:
    """Exclusive writer lock of one output (a local directory or a store URL); a context manager."""

    def __init__(self, output: ArtifactLocation | Path | str) -> None:
        self.location = output if isinstance(output, ArtifactLocation) else ArtifactLocation(output)
        self.stale_holder: dict[str, Any] | None = None
        self._fd: int | None = None
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> "OutputLock":
        if self.location.local is not None:
            self._acquire_local(lock_path(self.location.local))
        else:
            self._acquire_lease()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _record(self, expires: float | None = None) -> bytes:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": self._token}
        if expires is not None:
            record["expires"] = expires
        return (json.dumps(record, sort_keys=True) + "\n").encode()

    # Local: flock.
    def _acquire_local(self, path: Path) -> None:
        import fcntl

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"cannot create output directory {path.parent} ({exc.strerror})", "choose a writable --out") from exc
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ArtifactError(f"cannot create the lock file {path} ({exc.strerror})", "choose a writable --out") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _parse_holder(_read_fd(fd))
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise ArtifactError(f"cannot lock {path} ({exc.strerror})", "choose an output on a file system with flock") from exc
                raise ArtifactError(f"{self.location} is being written by {_describe(holder)} (lock {path})", _BUSY_FIX) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder released and deleted it between our open and flock
                os.close(fd)
                continue
            previous = _parse_holder(_read_fd(fd))
            if previous:
                self.stale_holder = previous  # its process died holding the lock (flock is released at exit)
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record(), 0)
            self._fd, self._path = fd, path
            return
        raise ArtifactError(f"the lock file {path} keeps being replaced", _BUSY_FIX)

    # Store: conditional-create lease.
    def _acquire_lease(self) -> None:
        location = self.location
        for _ in range(3):
            if self._create_lease():
                self._renewer = threading.Thread(target=self._renew, name="diffquant-lease", daemon=True)
                self._renewer.start()
                return
            holder = self._read_lease()
            if holder is not None and not _lease_is_stale(holder):
                raise ArtifactError(f"{location} is being written by {_describe(holder)} (lease {location}/{LEASE_NAME}, "
                                    f"expires in {holder.get('expires', 0) - time.time():.0f} s)", _BUSY_FIX)
            self.stale_holder = holder or {}
            with location._store("deleting the stale lease", LEASE_NAME):
                location.fs.rm(location._key(LEASE_NAME))
        raise ArtifactError(f"the lease {location}/{LEASE_NAME} keeps being taken", _BUSY_FIX)

    def _create_lease(self) -> bool:
        location, key = self.location, self.location._key(LEASE_NAME)
        data = self._record(time.time() + LEASE_SECONDS)
        with location._store("creating the lease", LEASE_NAME):
            try:
                location.fs.pipe_file(key, data, mode="create")
                return True
            except FileExistsError:
                return False
            except TypeError:  # a backend without conditional create: write, then read back
                if location.fs.exists(key):
                    return False
                location.fs.pipe_file(key, data)
                return (self._read_lease() or {}).get("token") == self._token

    def _read_lease(self) -> dict[str, Any] | None:
        try:
            return _parse_holder(self.location.fs.cat_file(self.location._key(LEASE_NAME)))
        except FileNotFoundError:
            return None

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            try:
                self.location.fs.pipe_file(self.location._key(LEASE_NAME), self._record(time.time() + LEASE_SECONDS))
            except Exception:  # a failed renewal is retried at the next tick; the lease has slack
                continue

    def release(self) -> None:
        """Give the lock up (and delete its file or lease); safe to call twice."""
        if self._fd is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._renewer is not None:
            self._stop.set()
            self._renewer.join()
            self._renewer = None
            if (self._read_lease() or {}).get("token") == self._token:
                self.location.fs.rm(self.location._key(LEASE_NAME))


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)


def _parse_holder(data: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"


def _lease_is_stale(holder: dict[str, Any]) -> bool:
    expires = holder.get("expires")
    if not isinstance(expires, (int, float)) or expires < time.time():
        return True
    return holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
