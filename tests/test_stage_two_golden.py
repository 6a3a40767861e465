"""Stage two writes the same checkpoint for the same settings as the code before its rewiring.

The digests in `tests/fixtures/stage_two/golden.json` were recorded by `tests/helpers/stage_two_golden.py`
before the placement protocol, the typed checkpoint manifest and the one sample split went in.
They cover the three placements (whole, accelerate's device map with disk offload, block by block)
and every kind of layer record (plain int8, static inputs, SVDQuant branch, packed NVFP4).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from diffquant.artifacts.checkpoint_records import CheckpointManifest
from tests.helpers.stage_two_golden import FIXTURES, RUNS, run_digests

GOLDEN = json.loads((FIXTURES / "golden.json").read_text())
STORED_MANIFESTS = sorted(FIXTURES.glob("manifest-*.json.gz"))


def test_golden_file_lists_every_run():
    assert [(run["calibration"], run["recipe"], run["settings"]) for run in GOLDEN["runs"]] == [tuple(run) for run in RUNS]


@pytest.mark.parametrize("index", range(len(RUNS)), ids=[f"{r}-{'-'.join(s) or 'whole'}" for _, r, s in RUNS])
def test_checkpoint_is_byte_identical_to_the_one_before_the_rewiring(index: int, tmp_path: Path) -> None:
    # The figures in the manifest and the static input scales come from float forward passes,
    # whose last bits differ between the CPU's SIMD paths: the digests hold on the kind of CPU
    # they were recorded on.
    if torch.backends.cpu.get_cpu_capability() != GOLDEN["cpu_capability"] or torch.__version__ != GOLDEN["torch"]:
        pytest.skip(f"digests recorded with torch {GOLDEN['torch']} on {GOLDEN['cpu_capability']}; this is "
                    f"torch {torch.__version__} on {torch.backends.cpu.get_cpu_capability()}")
    calib, recipe, extra = RUNS[index]
    copied = tmp_path / calib
    shutil.copytree(FIXTURES / calib, copied)
    digests = run_digests(copied, recipe, extra, tmp_path / "q")
    golden = GOLDEN["runs"][index]
    assert digests == {"weights": golden["weights"], "manifest": golden["manifest"]}


@pytest.mark.parametrize("path", STORED_MANIFESTS, ids=[p.name for p in STORED_MANIFESTS])
def test_stored_manifest_reads_into_the_record_and_writes_back_byte_identical(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes())
    record = CheckpointManifest.from_json(json.loads(raw))
    assert (json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n").encode() == raw
    assert len(record.layers) > 10 and record.files is not None and record.timing is not None
    assert record.holdout_sample_ids and record.quality_report


def test_stored_manifests_cover_the_svd_branch_and_accelerate_placement():
    records = [CheckpointManifest.from_json(json.loads(gzip.decompress(p.read_bytes()))) for p in STORED_MANIFESTS]
    assert any(layer.svd is not None for record in records for layer in record.layers)
    assert {record.placement["mode"] for record in records} == {"whole", "device_map"}


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(version=2), "not a diffquant checkpoint manifest of version 1"),
    (lambda m: m.update(surprise=1), "unknown field 'surprise'"),
    (lambda m: m.pop("quality"), "quality is None, allowed is a mapping"),
    (lambda m: m.update(placement=[]), "placement is [], allowed is a mapping"),
    (lambda m: m["skipped"].append({"name": "x"}), "skipped entry"),
    (lambda m: m["layers"].append(dict(m["layers"][0])), "is listed twice"),
    (lambda m: m["model"].pop("torch_dtype"), "model.torch_dtype is None"),
], ids=["version", "unknown-field", "no-quality", "placement-list", "skipped-no-reason", "duplicate-layer", "no-dtype"])
def test_malformed_manifest_is_one_line_naming_the_field(change, message: str) -> None:
    from diffquant.errors import ArtifactError

    raw = json.loads(gzip.decompress(STORED_MANIFESTS[0].read_bytes()))
    change(raw)
    with pytest.raises(ArtifactError) as caught:
        CheckpointManifest.from_json(raw)
    assert message in str(caught.value) and "\n" not in str(caught.value)
