"""Atomic replacement of an output directory, and which files an artifact owns.

`--overwrite` of a local output builds the new artifact or checkpoint beside the old one, in
`<parent>/.<name>.diffquant-new`, and switches it in with one `renameat2(RENAME_EXCHANGE)`: at
every instant the path holds either the whole old directory or the whole new one. Only then are
the old artifact's files deleted, and only those its manifest lists (plus diffquant's own
temporary names); any other file that was in the old directory is moved into the new one.

Where the file system has no exchange (not Linux, or a file system without it), the switch is two
renames, `out -> .<name>.diffquant-old` then `new -> out`; `recover_switch`, run under the
output's lock before any write, puts the old directory back when a kill fell between the two, and
finishes the clean-up otherwise.

An output directory is *owned*, and `--overwrite` may delete in it, only when it holds a diffquant
manifest; `refuse_nested` refuses an output that is a source or lies inside one (or the reverse).

Example:
    >>> import tempfile
    >>> parent = Path(tempfile.mkdtemp())
    >>> (parent / "out").mkdir(); (parent / "out" / "a.txt").write_text("old")
    3
    >>> new = staging_dir(parent / "out"); new.mkdir(); (new / "a.txt").write_text("new")
    3
    >>> switch_directory(new, parent / "out", owned={"a.txt"})
    >>> (parent / "out" / "a.txt").read_text(), new.exists()
    ('new', False)
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Collection

from diffquant.artifacts.atomic import fsync_directory
from diffquant.artifacts.calibration_format import FORMAT_NAME, MANIFEST_NAME
from diffquant.artifacts.location import ArtifactLocation, checked_name
from diffquant.artifacts.stats_cache import STATS_DIR, StatsCache
from diffquant.errors import ArtifactError, ConfigError

RENAME_EXCHANGE = 2  # linux/fs.h


def staging_dir(out: Path) -> Path:
    """Where the replacement of `out` is built: a hidden sibling (same file system, so renames work)."""
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.diffquant-new")


def old_dir(out: Path) -> Path:
    """Where the old `out` waits between the two renames of a switch without exchange."""
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.diffquant-old")


def switch_directory(new: Path, out: Path, owned: Collection[str]) -> None:
    """Put directory `new` at `out` in one rename, then delete the old `out`'s `owned` files;
    other entries of the old directory move into the new one (module docstring)."""
    if not out.exists():
        os.rename(new, out)
        fsync_directory(out.parent)
        return
    if _exchange(new, out):
        previous = new
    else:
        previous = old_dir(out)
        os.rename(out, previous)
        os.rename(new, out)
    fsync_directory(out.parent)
    _finish(previous, out, owned)


def recover_switch(out: Path, owned_in_old: Collection[str] | None = None) -> None:
    """Undo or finish a switch a kill interrupted, and delete a half-built replacement."""
    previous = old_dir(out)
    if previous.exists():
        if not out.exists():
            os.rename(previous, out)  # killed between the two renames: the old one comes back
            fsync_directory(out.parent)
        else:
            _finish(previous, out, owned_in_old or ())
    staging = staging_dir(out)
    if staging.exists():
        shutil.rmtree(staging)


def _finish(previous: Path, out: Path, owned: Collection[str]) -> None:
    for entry in sorted(previous.iterdir()):
        if entry.name not in owned and not (out / entry.name).exists() and not entry.name.endswith(".partial"):
            os.rename(entry, out / entry.name)
    shutil.rmtree(previous)  # what is left: the old artifact's own files
    fsync_directory(out)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    function = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if function is None:
        return False
    at_fdcwd = -100
    result = function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def refuse_nested(output: ArtifactLocation | Path | str, source: ArtifactLocation | Path | str, what: str, option: str) -> None:
    """Refuse `output` when it is `source`, lies inside it, or holds it (local paths and URLs)."""
    out_key, source_key = _place(output), _place(source)
    if out_key is None or source_key is None or out_key[0] != source_key[0]:
        return
    a, b = out_key[1].rstrip("/") + "/", source_key[1].rstrip("/") + "/"
    if a == b:
        relation = "is"
    elif a.startswith(b):
        relation = "lies inside"
    elif b.startswith(a):
        relation = "holds"
    else:
        return
    raise ConfigError(f"{option} {output} {relation} the {what} {source}", f"write to a directory outside the {what}, e.g. a sibling")


def _place(value: ArtifactLocation | Path | str) -> tuple[str, str] | None:
    location = value if isinstance(value, ArtifactLocation) else ArtifactLocation(value)
    if location.local is not None:
        return "file", os.path.realpath(location.local)
    return location.url.split("://", 1)[0], location.url


# diffquant's own names in an artifact directory: shards and manifests, and their `.partial` forms.
OWN_NAME = re.compile(r"^(shard-(r\d{3}-)?\d{6}\.(safetensors|zarr)|manifest(\.rank\d{3})?\.json)(\.partial)?$")
RANK_MANIFEST = re.compile(r"^manifest\.rank\d{3}\.json$")


def owned_files(out: ArtifactLocation) -> set[str]:
    """The entries of `out` that its calibration artifact owns: the manifests, every file they list,
    diffquant's own shard and temporary names, and `stats/` when it holds only what its index lists."""
    owned = {name for name in out.names() if OWN_NAME.match(name)}
    for name in [MANIFEST_NAME, *(n for n in owned if RANK_MANIFEST.match(n))]:
        if out.is_file(name):
            manifest = out.read_json(name)
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
                raise ArtifactError(f"{out}/{name} is not a diffquant calibration manifest, so diffquant will not delete there",
                                    "choose an empty or new output directory")
            shards = manifest.get("shards", [])
            shards = shards if isinstance(shards, list) else []
            owned |= {checked_name(shard.get("file") if isinstance(shard, dict) else shard, f"{out}/{name}") for shard in shards}
    if out.exists(STATS_DIR) and StatsCache(out).owns_everything():
        owned.add(STATS_DIR)
    return owned
