"""Where a calibration artifact lives: a local directory, or a directory in an fsspec store.

`--out` and `--calib` take a local path or an fsspec URL (`s3://bucket/calib/sdxl`,
`gs://...`, `memory://...`; `file://` URLs are local paths). Credentials and endpoints come
from fsspec's usual configuration (for S3: `AWS_*` environment variables, `~/.aws/`, or
`~/.config/fsspec/s3.json`), never from diffquant's command line.

Publication, the guarantee that a reader never takes a partly written file for a whole one:
- local: write under `<name>.partial`, fsync, rename, fsync the directory (`atomic.py`);
- remote: object stores have no rename, but a single object upload is atomic (S3, GCS and Azure
  never show a partly written object), so a file is one `pipe_file` call. A shard made of several
  objects (a zarr group) is written in place, and counts only once `manifest.json` (one object,
  written after the shard) lists it; a resumed run deletes every shard the manifest does not list.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import fsspec

from diffquant.artifacts.atomic import write_bytes_atomic
from diffquant.artifacts.calibration_format import file_sha256
from diffquant.errors import ArtifactError, DiffquantError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOCAL_PROTOCOLS = ("file", "local")
# Stores whose "directories" are key prefixes: nothing to create, and fsspec's makedirs would
# create a bucket (s3fs, gcsfs, adlfs) where a mistyped URL should fail.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
_STORE_FIX = "check the URL, the network and the store's credentials (fsspec's configuration)"
# `s3:/bucket/x`: a scheme with one slash, which a Path would take for a directory named `s3:`.
_ONE_SLASH_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/(?!/)")
# Entries a location does not list as an artifact's files: the writer lease of a store, and its
# takeover markers and temporaries (`locking.py`).
LEASE_PREFIX = ".diffquant.lock"


def artifact_target(value: str | Path) -> Path | str:
    """A command-line `--out`/`--calib` value: a `Path` for a local directory (`file://` and
    `local://` URLs included), the URL itself for a store (`s3://...`, chained `simplecache::s3://...`).
    A path is a URL only when it starts with `scheme://` or chains with `::`."""
    if isinstance(value, Path):
        return value
    if "\0" in value:
        raise ArtifactError(f"path {value!r} contains a NUL byte", "pass a plain path or URL")
    one_slash = _ONE_SLASH_SCHEME.match(value)
    if one_slash is not None:
        scheme = one_slash.group(1)
        raise ArtifactError(f"{value} has one slash after {scheme}:", f"write {scheme}://{value[one_slash.end():]} for a store URL, or ./{value} for a local directory")
    match = _SCHEME.match(value)
    if match is None:
        return value.rstrip("/") if "::" in value and "://" in value else Path(value)
    if match.group(1).lower() not in _LOCAL_PROTOCOLS:
        return value.rstrip("/")
    rest = value[match.end():]
    return Path(rest.removeprefix("localhost") if rest.startswith("localhost/") else rest)



def checked_name(name: Any, where: str) -> str:
    """A file name read from a manifest or an index, refused unless it is a relative path that
    stays inside its artifact: a non-empty string, `/`-separated, no `..`, `.` or empty segment, not
    absolute, no backslash, NUL or URL scheme. Symlinks are checked where the name is used
    (`ArtifactLocation`), since only the file system knows them.

    Example:
        >>> checked_name("shard-000000.safetensors", "manifest.json")
        'shard-000000.safetensors'
    """
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{where} names the file {name!r}, which is not a file name", "restore the artifact, or recreate it")
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or "\0" in name or "://" in name or ":" in parts[0]
            or any(part in ("", ".", "..") for part in parts)):
        raise ArtifactError(f"{where} names the file {name!r}, which leaves the artifact directory",
                            "restore the artifact, or recreate it; a manifest may only name files inside its directory")
    return name


class ArtifactLocation:
    """A directory of an artifact, with the few file operations the artifact formats need.

    Every name is resolved inside the directory: a name that leaves it (`..`, absolute, a symlink
    pointing outside) is an error, so a tampered manifest cannot make diffquant read or write
    elsewhere. `boundary` is the artifact's own root, kept by `child` locations (`stats/`).
    """

    def __init__(self, target: str | Path, boundary: Path | str | None = None) -> None:
        resolved = artifact_target(target)
        self.local: Path | None = resolved if isinstance(resolved, Path) else None
        self.boundary = boundary
        self.url = str(resolved)
        if self.local is None:
            try:
                self.fs, self.root = fsspec.core.url_to_fs(self.url)
            except (ImportError, ValueError) as exc:
                raise ArtifactError(f"cannot open the store {self.url} ({exc})", "install the fsspec backend it names (e.g. s3fs for s3://)") from exc
            except Exception as exc:  # each backend raises its own types: unknown protocol, missing archive, refused connection
                raise ArtifactError(f"cannot open the store {self.url} ({type(exc).__name__}: {exc})", _STORE_FIX) from exc
            self.root = self.root.rstrip("/")
            protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
            self.object_store = bool(_OBJECT_STORES.intersection(protocols))

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ArtifactLocation({self.url!r})"

    @property
    def target(self) -> Path | str:
        """What the caller passed, normalized: a Path when local, else the URL."""
        return self.local if self.local is not None else self.url

    def child(self, name: str) -> ArtifactLocation:
        """The location of subdirectory `name`, held to this artifact's boundary."""
        boundary = self.boundary if self.boundary is not None else (self.local if self.local is not None else self.url)
        if self.local is not None:
            return ArtifactLocation(self._local(name), boundary=boundary)
        return ArtifactLocation(f"{self.url}/{checked_name(name, str(self))}", boundary=boundary)

    def path(self, name: str) -> Path:
        """The local path of `name` (local locations only), checked to lie inside the artifact."""
        if self.local is None:
            raise ArtifactError(f"{self.url} is a remote store, and {name} needs a local file", "use a local directory")
        return self._local(name)

    def _local(self, name: str) -> Path:
        """`self.local / name`, refused when it resolves outside the artifact (symlinks followed)."""
        if self.local is None:
            raise ArtifactError(f"{self.url} is a remote store, and {name} needs a local file", "use a local directory")
        checked_name(name, str(self))
        path = self.local / name
        root = Path(self.boundary if self.boundary is not None else self.local)
        try:
            resolved, inside = path.resolve(), root.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise ArtifactError(f"{path} cannot be resolved ({exc})", "remove the symlink from the artifact") from exc
        if resolved != inside and inside not in resolved.parents:
            raise ArtifactError(f"{path} resolves to {resolved}, outside the artifact {root}",
                                "remove the symlink, or copy the file into the artifact directory")
        return path

    def _key(self, name: str) -> str:
        return f"{self.root}/{checked_name(name, str(self))}"

    @contextlib.contextmanager
    def _store(self, action: str, name: str = "") -> Iterator[None]:
        """Turn a store's own exceptions (botocore, aiohttp, gcsfs, ...) into a one-line error."""
        try:
            yield
        except DiffquantError:
            raise
        except Exception as exc:  # every fsspec backend raises its own types
            where = f"{self.url}/{name}" if name else self.url
            raise ArtifactError(f"{action} {where} failed ({type(exc).__name__}: {exc})", _STORE_FIX) from exc

    def make(self) -> None:
        """Create the directory; refuse one that cannot be written. In an object store there is
        nothing to create (a prefix exists once an object is under it)."""
        if self.local is None:
            if not self.object_store:
                with self._store("creating"):
                    self.fs.makedirs(self.root, exist_ok=True)
            return
        try:
            self.local.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"cannot create output directory {self.local} ({exc.strerror})", "choose a writable --out") from exc
        if not os.access(self.local, os.W_OK | os.X_OK):
            raise ArtifactError(f"output directory {self.local} is not writable", "choose a writable --out")

    def names(self) -> list[str]:
        """Names of the entries directly inside the directory (none if it does not exist)."""
        if self.local is not None:
            return sorted(p.name for p in self.local.iterdir() if not p.name.startswith(LEASE_PREFIX)) if self.local.is_dir() else []
        with self._store("listing"):
            if not self.fs.isdir(self.root):
                return []
            names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self.root, detail=False))
            return sorted(name for name in names if not name.startswith(LEASE_PREFIX))

    def exists(self, name: str) -> bool:
        if self.local is not None:
            return self._local(name).exists()
        with self._store("checking", name):
            return self.fs.exists(self._key(name))

    def is_file(self, name: str) -> bool:
        if self.local is not None:
            return self._local(name).is_file()
        with self._store("checking", name):
            return self.fs.isfile(self._key(name))

    def read_bytes(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """The file's bytes, or bytes [start, end) of it (one ranged request in a store)."""
        if self.local is None:
            with self._store("reading", name):
                return self.fs.cat_file(self._key(name), start=start, end=end)
        path = self._local(name)
        try:
            with open(path, "rb") as handle:
                handle.seek(start or 0)
                return handle.read() if end is None else handle.read(end - (start or 0))
        except OSError as exc:
            raise ArtifactError(f"cannot read {path} ({exc.strerror or exc})", "check that the file exists and is readable") from exc

    def read_json(self, name: str) -> Any:
        """The parsed JSON document `name`; invalid JSON is a one-line error naming the file."""
        try:
            return json.loads(self.read_bytes(name))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{self.url}/{name} is not valid JSON ({exc})", "restore the file, or recreate the artifact") from exc

    def write_bytes(self, name: str, data: bytes) -> None:
        """Publish `data` as `name`: readers see the old content or all of the new (module docstring)."""
        if self.local is not None:
            write_bytes_atomic(self._local(name), data)
        else:
            with self._store("writing", name):
                self.fs.pipe_file(self._key(name), data)

    def write_json(self, name: str, obj: Any) -> None:
        """`write_bytes` of a JSON document (sorted keys, two-space indent)."""
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def size(self, name: str) -> int:
        """Bytes of a file, or the sum over a directory's files."""
        if self.local is None:
            with self._store("sizing", name):
                return int(self.fs.du(self._key(name)))
        path = self._local(name)
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size

    def sha256(self, name: str) -> str:
        """sha256 of a file; of a directory, the sha256 of its sorted `relative path NUL file sha256`
        lines (the same value for a local directory and its copy in a store)."""
        with self._store("hashing", name) if self.local is None else contextlib.nullcontext():
            files = self._files(name)
            if files is None:
                return self._file_sha256(name)
            hasher = hashlib.sha256()
            for relative in sorted(files, key=lambda r: r.split("/")):
                hasher.update(f"{relative}\0{self._file_sha256(f'{name}/{relative}')}\n".encode())
            return hasher.hexdigest()

    def _files(self, name: str) -> list[str] | None:
        """Relative paths of the files under directory `name`; None when `name` is a file."""
        if self.local is not None:
            path = self._local(name)
            return [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()] if path.is_dir() else None
        key = self._key(name)
        if not self.fs.isdir(key):
            return None
        return [found[len(key) + 1:] for found in self.fs.find(key, detail=False)]

    def _file_sha256(self, name: str) -> str:
        if self.local is not None:
            return file_sha256(self._local(name))
        hasher = hashlib.sha256()
        with self.fs.open(self._key(name), "rb") as handle:
            while chunk := handle.read(1 << 20):
                hasher.update(chunk)
        return hasher.hexdigest()

    def remove(self, name: str) -> None:
        """Delete a file or a directory tree (nothing if absent)."""
        if self.local is None:
            with self._store("deleting", name):
                if self.fs.exists(self._key(name)):
                    self.fs.rm(self._key(name), recursive=True)
            return
        import shutil

        checked_name(name, str(self))
        path = self.local / name
        if path.is_symlink():
            path.unlink()  # the link only: what it points at is no part of the artifact
        elif path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def remove_tree(self) -> None:
        """Delete this whole (local) directory: only for a location diffquant created itself."""
        import shutil

        if self.local is not None and self.local.is_dir() and not self.local.is_symlink():
            shutil.rmtree(self.local)

    def zarr_store(self, name: str, read_only: bool) -> Any:
        """The store to open a zarr group `name` with: a local path, or an fsspec-backed store.

        For reading, every entry of the group is checked first (`_check_zarr_tree`): zarr opens
        the files of a directory store by path, so a symlink inside the group, or a key with a `..`
        or empty segment in a store, would make it read outside the artifact."""
        if self.local is not None:
            path = self._local(name)
            if read_only:
                self._check_zarr_tree(name, path)
            return str(path)
        from zarr.storage import FsspecStore

        if read_only:
            self._check_zarr_tree(name, None)
        return FsspecStore.from_url(f"{self.url}/{name}", read_only=read_only)

    def _check_zarr_tree(self, name: str, path: Path | None) -> None:
        """Refuse a zarr group holding a symlink (local) or a key that leaves it (store), naming it."""
        fix = "recreate the shard (diffquant writes no links), or restore the artifact"
        if path is not None:
            for directory, subdirs, files in os.walk(path):  # os.walk does not descend into symlinked directories
                for entry in (*subdirs, *files):
                    if os.path.islink(os.path.join(directory, entry)):
                        where = Path(directory, entry)
                        raise ArtifactError(f"{where} inside the zarr shard {name} is a symlink, which zarr would follow", fix)
            return
        with self._store("listing", name):
            key = self._key(name)
            found = self.fs.find(key, detail=False, withdirs=True)
        for entry in found:
            relative = entry[len(key):].lstrip("/") if entry.startswith(key) else entry
            if relative:
                checked_name(relative, f"{self.url}/{name}")
