"""Stage two's activation statistics: from the artifact's stats cache where valid, else one pass.

A part of the quantize stage (not a stage). `gather_stats` looks each statistic kind up in the
cache (`artifacts.stats_cache`) under a key naming the calibration, the model, its dtype, the
device type and the exact samples; a cached entry is checked against the calibration samples that
witness its extremes, recomputed (`_check_cache_against_calibration`), before it is used. Every kind still missing is computed in one forward pass
over the calibration samples (`quant.activation_stats`) and then cached. A recipe that needs no
statistic (weight-only) runs no forward pass here at all.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch

from diffquant.artifacts.calibration_format import json_sha256
from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.fingerprint import module_fingerprint
from diffquant.artifacts.stats_cache import StatsCache
from diffquant.quant import activation_stats
from diffquant.errors import ArtifactError
from diffquant.quant.activation_stats import (
    STAT_KINDS,
    WITNESS_FIELDS,
    WITNESSED_KINDS,
    LayerActivationStats,
    check_against_sample,
    collect_activation_stats,
    witness_positions,
    witness_tolerance,
)
from diffquant.quant.histogram import LAYOUT as HISTOGRAM_LAYOUT

Samples = Callable[[Sequence[int]], Iterable[dict[str, Any]]]


def gather_stats(
    model: torch.nn.Module,
    artifact: CalibrationArtifact,
    calib_ids: list[int],
    requests: dict[str, set[str]],
    samples: Samples,
    device: str,
    use_cache: bool,
    show_progress: bool,
) -> tuple[dict[str, LayerActivationStats], dict[str, Any]]:
    """Activation statistics for `requests` (layer name -> kinds) over the calibration samples
    `calib_ids` (`samples(ids)` loads them onto the device): from the cache where valid, else one
    forward pass for every missing kind (then cached). Returns the statistics and what the cache
    did ({"enabled", "hits", "rejected", "computed", "store_error"})."""
    stats: dict[str, LayerActivationStats] = {name: LayerActivationStats() for name in requests}
    cache = StatsCache(artifact.location) if use_cache else None
    key_base = {
        "calibration_manifest_sha256": artifact.manifest_sha256,
        "model": module_fingerprint(model),
        "model_dtype": str(next(model.parameters()).dtype),
        "device_type": torch.device(device).type,
        "samples_sha256": json_sha256([artifact.records[i].id for i in calib_ids]),
        "histogram_layout": list(HISTOGRAM_LAYOUT),
        "witnesses": "sample position of each extreme",  # entries without them (older) are misses, not hits
    }
    missing: dict[str, set[str]] = {}
    store_error: str | None = None
    for kind in STAT_KINDS:
        layers = {name for name, kinds in requests.items() if kind in kinds}
        if not layers:
            continue
        found = cache.lookup({**key_base, "kind": kind}, layers) if cache else None
        if found is not None:
            _check_cache_against_calibration(model, kind, found, artifact, calib_ids, samples, cache)
        if found is None:
            for name in layers:
                missing.setdefault(name, set()).add(kind)
            continue
        for name, tensors in found.items():
            stats[name].set_from_tensors(kind, tensors)
    if missing:
        computed = collect_activation_stats(model, missing, samples(calib_ids), len(calib_ids), show_progress)
        for name, layer_stats in computed.items():
            for kind in missing[name]:
                tensors = layer_stats.to_tensors(kind)
                if tensors:  # a layer that never ran has no statistic
                    stats[name].set_from_tensors(kind, tensors)
        if cache is not None:
            artifact.check_unchanged()  # never cache statistics into an artifact that replaced ours
            store_error = _store_stats(cache, key_base, missing, stats)
    report = {"enabled": cache is not None, "hits": cache.hits if cache else [], "rejected": cache.rejected if cache else [],
              "computed": sorted({k for kinds in missing.values() for k in kinds}), "store_error": store_error}
    return stats, report


def _check_cache_against_calibration(model: torch.nn.Module, kind: str, found: dict[str, dict[str, torch.Tensor]],
                                     artifact: CalibrationArtifact, calib_ids: list[int], samples: Samples, cache: StatsCache) -> None:
    """Check cached statistics against the calibration they claim to come from, whose sha256 is in
    their key. For each witnessed field (`range`: min and max; `channel_absmax`: the channels), one
    layer (and channel) is drawn at random and the sample that witnesses it is recomputed, one
    forward pass each; every layer must contain what that sample gives and reproduce each extreme
    it witnesses (`check_against_sample`). A field altered in every layer is caught with certainty,
    one altered in k of n layers with probability at least k/n per run. Statistics widened or
    narrowed together with their hash are refused in one line: the cache was altered."""
    if kind not in WITNESSED_KINDS or not found:
        return
    fix = "delete the artifact's stats/ directory (a cache, recomputed on the next run) or pass --no-stats-cache"
    positions: set[int] = set()
    for name, tensors in sorted(found.items()):
        witnessed = witness_positions(kind, tensors)
        if witnessed is None or not all(0 <= p < len(calib_ids) for p in witnessed):
            raise ArtifactError(f"{cache.root}: the cached {kind} statistic of layer {name} has no valid witness samples, "
                                "though its sha256 matches the index (the cache was altered)", fix)
    tolerance = witness_tolerance(next(model.parameters()).dtype)
    draw = random.SystemRandom()
    for field in WITNESS_FIELDS[kind]:
        witness = found[draw.choice(sorted(found))][field].flatten()
        positions.add(int(witness[draw.randrange(witness.numel())]))
    for position in sorted(positions):
        # Through the module, not this module's name: a check of a few samples is not a pass over the calibration data.
        recomputed = activation_stats.collect_activation_stats(model, {name: {kind} for name in found}, samples([calib_ids[position]]), 1, False)
        for name, stats in sorted(recomputed.items()):
            problem = check_against_sample(kind, found[name], stats.to_tensors(kind), position, tolerance) if stats.to_tensors(kind) else None
            if problem is not None:
                raise ArtifactError(f"{cache.root}: the cached {kind} statistic of layer {name} disagrees with calibration sample "
                                    f"{artifact.records[calib_ids[position]].id} ({problem}), though its sha256 matches the index "
                                    "(the cache was altered)", fix)


def _store_stats(cache: StatsCache, key_base: dict[str, Any], missing: dict[str, set[str]], stats: dict[str, LayerActivationStats]) -> str | None:
    """Cache the statistics just computed; None, or why they could not be (a read-only artifact,
    a store without write access): the cache only saves time, so quantization goes on, warned."""
    try:
        for kind in sorted({k for kinds in missing.values() for k in kinds}):
            layers = [name for name in missing if kind in missing[name]]
            cache.store({**key_base, "kind": kind}, {name: stats[name].to_tensors(kind) for name in layers})
    except Exception as exc:  # any store's own error: the cache is optional, the statistics are in hand
        warnings.warn(f"the statistics cache {cache.root} cannot be written ({exc}); quantizing without caching", stacklevel=3)
        return str(exc)
    return None
