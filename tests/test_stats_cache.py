"""The stats-cache index is a typed record whose files stay byte-identical to the dict-built ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from diffquant.artifacts.location import ArtifactLocation
from diffquant.artifacts.stats_cache import INDEX_NAME, STATS_DIR, StatsCache, StatsEntry, StatsIndex
from diffquant.errors import ArtifactError
from tests.helpers.reliability import copy_artifact

# sha256 of the index below as written by the dict-based StatsCache of main at df4f6e6 (1062 bytes).
INDEX_SHA256 = "fea2b2ec0535a90fdcccfd402a30281fee57f26c6e8c13554dc2a80a3cfaf476"


def test_index_written_through_the_typed_record_is_byte_identical_to_before(tmp_path: Path) -> None:
    cache = StatsCache(ArtifactLocation(tmp_path))
    key = {"calibration_manifest_sha256": "0" * 64, "kind": "range", "model": {"target_class": "Tiny"}}
    cache.store(key, {"down": {"min": torch.tensor([-1.5]), "max": torch.tensor([2.25])}, "up": {"min": torch.tensor([-0.5]), "max": torch.tensor([0.75])}})
    cache.store({**key, "kind": "channel_absmax"}, {"down": {"channel_absmax": torch.tensor([1.0, 2.0, 3.0])}})
    data = (tmp_path / STATS_DIR / INDEX_NAME).read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (1062, INDEX_SHA256)
    index = cache.index()
    assert isinstance(next(iter(index.entries.values())), StatsEntry)
    assert sorted(entry.key["kind"] for entry in index.entries.values()) == ["channel_absmax", "range"]
    found = cache.lookup({**key, "kind": "channel_absmax"}, {"down"})
    assert torch.equal(found["down"]["channel_absmax"], torch.tensor([1.0, 2.0, 3.0]))


def test_a_tiny_runs_index_reads_back_and_writes_out_byte_for_byte(calib_factory, tmp_path: Path) -> None:
    from diffquant.stages.quantize import QuantizeSettings, quantize

    calib = copy_artifact(calib_factory(), tmp_path / "calib")
    quantize(QuantizeSettings(calib=calib, recipe="int8_w8a8", out=tmp_path / "q", device="cpu", holdout=2), show_progress=False)
    path = calib / STATS_DIR / INDEX_NAME
    parsed = StatsIndex.from_json(json.loads(path.read_bytes()), str(path))
    assert (json.dumps(parsed.to_json(), indent=2, sort_keys=True) + "\n").encode() == path.read_bytes()
    assert {entry.file for entry in parsed.entries.values()} == {p.name for p in path.parent.glob("*.safetensors")}


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_index_version_is_checked_in_from_json(version, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="is not a statistics index of version 1"):
        StatsIndex.from_json({"version": version, "entries": {}}, "stats/index.json")
