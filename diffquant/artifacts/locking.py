"""One writer per output: a lock that a second writer sees and refuses in one line.

Local outputs: `fcntl.flock` on a lock file beside the output, `<parent>/.<name>.diffquant-lock`
(beside, not inside, so that the lock outlives the directory switch of an `--overwrite`, and the
output holds only artifact files). The file records the holder's pid, host and start time, which
the refusal quotes. The kernel drops a flock when its process dies, so the lock of a run killed
with `kill -9` is stale by construction: the next writer takes it over (`stale_holder` records
whom it replaced). The holder deletes the file on release; a writer that locked a file deleted
under it (its inode no longer the path's) tries again.

fsspec stores: a lease object `<url>/.diffquant.lock`, created only if absent (an exclusive
create), holding pid, host, a token and an expiry time `LEASE_SECONDS` ahead. A thread renews it
every `LEASE_SECONDS / 4`. A lease whose expiry has passed (a killed holder stops renewing), or
whose holder is a dead process of this host, is stale. Taking over a stale lease of token T first
creates, exclusively, `<url>/.diffquant.lock.takeover-T`: of two writers that find the same stale
lease, only the one that creates that marker deletes the lease and creates its own (conditionally
again, so a third writer arriving meanwhile wins or loses cleanly); the other sees a live lease.

The exclusive create is what makes the lease a lock, so it is used only where the backend has one
(`EXCLUSIVE_CREATE`), and a store on any other fsspec filesystem is refused in one line:

==================  ====================================================================
fsspec filesystem   exclusive create
==================  ====================================================================
file, local         the lease is written to a temporary file and hard-linked to its name
                    (`link(2)` fails if the name exists, and the lease is whole once it has
                    a name); POSIX file systems, NFSv3 and later
memory              `pipe_file(mode="create")`, i.e. `open(mode="xb")`: one process only,
                    as the memory store itself is
s3, s3a (s3fs)      `pipe_file(mode="create")`: PutObject with `If-None-Match: *`. AWS S3
                    honours it since 2024; an S3-compatible store that ignores the header
                    gives no exclusion, which diffquant cannot see (check your store's
                    documentation for conditional writes)
gs, gcs (gcsfs)     `pipe_file(mode="create")`: upload with `ifGenerationMatch=0`
others              refused: fsspec's generic `pipe_file(mode="create")` checks `exists` and
                    then writes, so two writers can both succeed
==================  ====================================================================

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "calib"
    >>> with OutputLock(out):
    ...     pass
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from diffquant.artifacts.location import LEASE_PREFIX, ArtifactLocation
from diffquant.errors import ArtifactError

LEASE_NAME = LEASE_PREFIX
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

    # Store: exclusive-create lease.
    def _acquire_lease(self) -> None:
        location = self.location
        _exclusive_create_of(location)  # refuses a backend without one, before anything is written
        for _ in range(5):
            if self._create(LEASE_NAME, self._record(time.time() + LEASE_SECONDS)):
                self._renewer = threading.Thread(target=self._renew, name="diffquant-lease", daemon=True)
                self._renewer.start()
                return
            raw = self._read(LEASE_NAME)
            if raw is None:
                continue  # released between our create and our read
            holder = _parse_holder(raw)
            if holder is None:
                raise ArtifactError(f"{location}/{LEASE_NAME} is not a diffquant lease, so diffquant cannot tell who writes {location}",
                                    f"delete {location}/{LEASE_NAME} if no run is writing there")
            if not _lease_is_stale(holder):
                raise ArtifactError(f"{location} is being written by {_describe(holder)} (lease {location}/{LEASE_NAME}, "
                                    f"expires in {holder.get('expires', 0) - time.time():.0f} s)", _BUSY_FIX)
            self._take_over(holder)
        raise ArtifactError(f"the lease {location}/{LEASE_NAME} keeps being taken",
                            f"wait, or delete {location}/{LEASE_NAME} and its .takeover-* markers if no run is writing there")

    def _take_over(self, holder: dict[str, Any]) -> None:
        """Delete the stale lease of `holder`, if this writer wins its takeover marker (module docstring)."""
        marker = f"{LEASE_NAME}.takeover-{_token_of(holder)}"
        if not self._create(marker, self._record(time.time() + LEASE_SECONDS)):
            return  # another writer is taking it over; the next round sees its lease
        try:
            current = _parse_holder(self._read(LEASE_NAME) or b"")
            if current is not None and _token_of(current) == _token_of(holder):
                with self.location._store("deleting the stale lease", LEASE_NAME):
                    self.location.fs.rm(self.location._key(LEASE_NAME))
                self.stale_holder = holder
        finally:
            with self.location._store("deleting the takeover marker", marker):
                self.location.fs.rm(self.location._key(marker))

    def _create(self, name: str, data: bytes) -> bool:
        """Create `name` holding `data` only if it does not exist; False if it does."""
        location = self.location
        with location._store("creating the lease", name):
            return _exclusive_create_of(location)(location, location._key(name), data)

    def _read(self, name: str) -> bytes | None:
        with self.location._store("reading the lease", name):
            try:
                return self.location.fs.cat_file(self.location._key(name))
            except FileNotFoundError:
                return None

    def _read_lease(self) -> dict[str, Any] | None:
        return _parse_holder(self._read(LEASE_NAME) or b"")

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            try:
                if (self._read_lease() or {}).get("token") != self._token:
                    return  # taken over after we failed to renew in time: never overwrite another writer's lease
                _overwrite(self.location, self.location._key(LEASE_NAME), self._record(time.time() + LEASE_SECONDS))
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


def _create_local(location: ArtifactLocation, key: str, data: bytes) -> bool:
    """Exclusive create on a local file system: write a temporary file, then `link(2)` it to its name."""
    path = location.fs._strip_protocol(key)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    return True


def _overwrite(location: ArtifactLocation, key: str, data: bytes) -> None:
    """Replace the lease's content so that a reader sees the old or the new lease, whole."""
    if _exclusive_create_of(location) is not _create_local:
        location.fs.pipe_file(key, data)  # one object upload: atomic in the stores above
        return
    path = location.fs._strip_protocol(key)
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "xb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def _create_conditional(location: ArtifactLocation, key: str, data: bytes) -> bool:
    """Exclusive create through the backend's own conditional write (`pipe_file(mode="create")`)."""
    try:
        location.fs.pipe_file(key, data, mode="create")
    except FileExistsError:
        return False
    return True


# The fsspec protocols whose filesystems create a file exclusively, and how (module docstring).
EXCLUSIVE_CREATE = {"file": _create_local, "local": _create_local, "memory": _create_conditional,
                    "s3": _create_conditional, "s3a": _create_conditional, "gs": _create_conditional, "gcs": _create_conditional}


def _exclusive_create_of(location: ArtifactLocation) -> Any:
    """The exclusive-create function of the location's filesystem; refuses one that has none."""
    protocols = location.fs.protocol if isinstance(location.fs.protocol, tuple) else (location.fs.protocol,)
    create = next((EXCLUSIVE_CREATE[p] for p in protocols if p in EXCLUSIVE_CREATE), None)
    if create is None:
        raise ArtifactError(f"{location} is on fsspec's {type(location.fs).__name__} ({', '.join(protocols)}://), which cannot create a "
                            "file exclusively, so diffquant cannot lock it against a second writer",
                            "write to a local directory, s3:// or gs://, and copy the finished artifact there")
    return create


def _token_of(holder: dict[str, Any]) -> str:
    """The lease's token, as a name segment (a foreign value is hashed)."""
    token = holder.get("token")
    if isinstance(token, str) and token.isalnum() and len(token) <= 64:
        return token
    return hashlib.sha256(json.dumps(holder, sort_keys=True, default=str).encode()).hexdigest()[:32]


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
