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

In an fsspec store there is no rename, so an `--overwrite` builds the new artifact inside the old
one, in a generation directory `generation-<12 hex>/` (its own shards and progress manifest), and
publishes it by uploading `manifest.json` once, naming the generation's shards
(`generation-.../shard-000000.safetensors`). One object upload is atomic in S3, GCS and Azure, so
a reader sees the old manifest, which lists the old shards, still there, or the new one. Only after
that upload are the old artifact's files deleted. `recover_generation`, run under the output's
lease before any write, deletes a generation that `manifest.json` does not name (a kill before
the upload), and finishes the clean-up otherwise (a kill after it).

Data-parallel ranks all write into the same replacement (the staging directory, or the
generation, whose name every rank derives from the old manifest); rank 0 merges their manifests
there and publishes once (`Replacement`).

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

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator

from diffquant.artifacts.atomic import fsync_directory
from diffquant.artifacts.calibration_format import FORMAT_NAME, MANIFEST_NAME, read_manifest
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


@dataclass
class Replacement:
    """Where a run writes: `location`, which is `out` itself (nothing to replace), the staging
    directory beside a local `out`, or a generation directory inside a store's `out`. After the
    `replacing` block, `published` is the manifest that was switched in, or None (written in place,
    or not the publishing rank)."""

    out: ArtifactLocation
    location: ArtifactLocation
    generation: str | None = None
    published: dict[str, Any] | None = field(default=None)


@contextlib.contextmanager
def replacing(out: ArtifactLocation, owned: set[str] | None, publisher: bool = True) -> Iterator[Replacement]:
    """Build the replacement of the artifact at `out` (`owned`: the old one's files; None when
    there is nothing to replace, and the run writes in place) and publish it in one step when the
    block ends without an error; on an error the old artifact stays and the half-built one goes.
    Only the `publisher` (rank 0) publishes or deletes; other ranks just write into the location."""
    if owned is None:
        yield Replacement(out, out)
        return
    if out.local is not None:
        build = Replacement(out, ArtifactLocation(staging_dir(out.local)))
    else:
        generation = generation_name(out)
        build = Replacement(out, out.child(generation), generation)
    build.location.make()
    try:
        yield build
    except BaseException as error:
        if publisher:
            try:
                _discard(build)
            except Exception as cleanup:  # the run's own error is the one to report; the next run's recovery deletes the leftover
                error.add_note(f"the half-built replacement {build.location} is left for the next run to delete ({cleanup})")
        raise
    if not publisher:
        return
    if out.local is not None:
        _publish_step("switch")
        switch_directory(build.location.local, out.local, owned)
        build.published = read_manifest(out)
    else:
        build.published = publish_generation(out, build.generation, owned)


def generation_name(out: ArtifactLocation) -> str:
    """The generation directory of an `--overwrite` of the store artifact at `out`, named from the
    manifests it replaces (which nothing changes until the publish), so every rank of a run derives
    the same name, and the next overwrite, of the manifest this one publishes, another."""
    hasher = hashlib.sha256()
    for name in out.names():
        if name == MANIFEST_NAME or RANK_MANIFEST.match(name):
            hasher.update(f"{name}\0".encode() + out.read_bytes(name))
    return f"generation-{hasher.hexdigest()[:12]}"


def publish_generation(out: ArtifactLocation, generation: str, owned: Collection[str]) -> dict[str, Any]:
    """Switch the generation in: upload `manifest.json` naming its shards (the one publish step),
    then delete the old artifact's files. Returns the published manifest."""
    built = read_manifest(out.child(generation))
    published = {**built, "shards": [{**shard, "file": f"{generation}/{shard['file']}"} for shard in built["shards"]]}
    _publish_step("manifest")
    out.write_json(MANIFEST_NAME, published)
    _finish_generation(out, generation, owned)
    return published


def recover_generation(out: ArtifactLocation) -> None:
    """In a store: delete a generation `manifest.json` does not name (a kill before its publish),
    and finish the clean-up of a published one (a kill after). Run under the output's lease."""
    generations = [name for name in out.names() if GENERATION.match(name)]
    if not generations:
        return
    current = _named_generation(out)
    for name in generations:
        if name != current:
            out.remove(name)
    if current is not None:  # the statistics may already be the new artifact's: they are a cache, keyed to their manifest
        _finish_generation(out, current, owned_files(out) - {STATS_DIR})


def _named_generation(out: ArtifactLocation) -> str | None:
    """The generation whose shards `manifest.json` lists, if it lists one."""
    if not out.is_file(MANIFEST_NAME):
        return None
    manifest = out.read_json(MANIFEST_NAME)
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    first = shards[0].get("file") if isinstance(shards, list) and shards and isinstance(shards[0], dict) else None
    head = first.split("/", 1)[0] if isinstance(first, str) and "/" in first else None
    return head if head is not None and GENERATION.match(head) else None


def _finish_generation(out: ArtifactLocation, generation: str, owned: Collection[str]) -> None:
    """After the publish: delete the generation's own progress manifest and the old artifact's
    files (`owned`, less the new manifest and generation)."""
    _publish_step("cleanup")
    out.child(generation).remove(MANIFEST_NAME)
    for name in sorted(set(owned) - {MANIFEST_NAME, generation}):
        if "/" in name and name.split("/", 1)[0] == generation:
            continue  # a file of the published generation
        _publish_step("remove")
        out.remove(name)


def _discard(build: Replacement) -> None:
    """Delete a half-built replacement (the old artifact is untouched)."""
    if build.location.local is not None:
        build.location.remove_tree()
    else:
        build.out.remove(build.generation)


def _publish_step(step: str) -> None:
    """A named point of a publish step; tests stop the process here (a no-op otherwise)."""


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


# diffquant's own names in an artifact directory: shards and manifests, and their `.partial` forms,
# and the generation directories of a store's `--overwrite`.
OWN_NAME = re.compile(r"^(shard-(r\d{3}-)?\d{6}\.(safetensors|zarr)|manifest(\.rank\d{3})?\.json)(\.partial)?$|^generation-[0-9a-f]{12}$")
GENERATION = re.compile(r"^generation-[0-9a-f]{12}$")
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
