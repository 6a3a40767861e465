"""Activation statistics of the layers of a submodule, collected in one pass over calibration data.

Three kinds, each per layer input (the layer's first positional argument):

=================  ===========================================================================
kind               what is kept
=================  ===========================================================================
range              a histogram observer state over all input values (exact min, max, count and
                   the fixed-layout histogram of `diffquant.quant.histogram`); every observer
                   (min_max, percentile, histogram, mse, histogrampro) computes its range from it
channel_absmax     float32 [channels]: max |x| per input channel over all tokens / pixels
rows               float32 [<= 512, channels]: a deterministic subset of input rows (every
                   ceil(n/64)-th row of each call, until 512 are kept), for SVDQuant's alpha search
=================  ===========================================================================

The statistics depend only on the unquantized model and the samples, never on a recipe, which is
what lets one cached pass serve every recipe (`diffquant.artifacts.stats_cache`).

**Witnesses.** Each extreme names the sample that attains it: `witness_min` and `witness_max`
(int64 [1]) for `range`, `witness` (int64 [channels]) for `channel_absmax`, each the position, in
the pass, of the first sample that reached the final value; each kept row names the sample it came
from (`witness`, int64 [rows], for `rows`: a sample's rows do not depend on the samples before it,
but for the last one, whose rows the 512-row cap cuts to a prefix). They make a cached statistic checkable
from a few samples: recomputed on a witness sample, the statistic must reproduce every extreme that
sample witnesses (`check_against_sample`), so an extreme widened (or narrowed) together with the
cache's hash is found by one forward pass of a sample it names, not by a pass over all of them.

Example:
    >>> stats = LayerActivationStats(channel_absmax=torch.tensor([2.0, 3.0]), witnesses={"channel_absmax": torch.tensor([0, 1])})
    >>> sorted(stats.to_tensors("channel_absmax"))
    ['channel_absmax', 'witness']
    >>> check_against_sample("channel_absmax", stats.to_tensors("channel_absmax"), {"channel_absmax": torch.tensor([1.0, 3.0])}, 1) is None
    True
    >>> check_against_sample("channel_absmax", stats.to_tensors("channel_absmax"), {"channel_absmax": torch.tensor([1.0, 1.5])}, 1)
    'channel 1 is 3 in the cache, its witness sample gives 1.5'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from diffquant.quant.observers import make_observer

STAT_KINDS = ("range", "channel_absmax", "rows")
WITNESSED_KINDS = ("range", "channel_absmax", "rows")
# How far a witnessed extreme may move when recomputed, relative to the layer's largest magnitude:
# a forward pass on another CPU or thread count sums in another order, which moves activations by
# a few ulps of the model's dtype. For float32 models 2^-10 is far above that and far below a
# tampering that matters (an int8 scale moved by 2^-10 moves no value by more than 1/8 of a step);
# half-precision models get 8 ulps of their dtype (fp16: 2^-7, bf16: 2^-4), `witness_tolerance`.
WITNESS_TOLERANCE = 2.0**-10
WITNESS_ULPS = 8
WITNESS_FIELDS = {"range": {"witness_min": "min", "witness_max": "max"}, "channel_absmax": {"witness": "channel_absmax"},
                  "rows": {"witness": "rows"}}
ROWS_KEPT = 512
RANGE_OBSERVER = "histogram"  # keeps the full histogram state every observer can load


@dataclass
class LayerActivationStats:
    """The statistics of one layer's input; a kind that was not collected is None."""

    range_state: dict[str, torch.Tensor] | None = None
    channel_absmax: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    witnesses: dict[str, torch.Tensor] = field(default_factory=dict)  # "range.min", "range.max", "channel_absmax", "rows"

    def to_tensors(self, kind: str) -> dict[str, torch.Tensor]:
        """The tensors of one kind, named by field, with their witnesses, for saving."""
        if kind == "range":
            tensors = dict(self.range_state or {})
        else:
            value = getattr(self, kind)
            tensors = {} if value is None else {kind: value}
        if tensors:
            for name, extreme in WITNESS_FIELDS.get(kind, {}).items():
                witness = self.witnesses.get(f"{kind}.{extreme}" if kind == "range" else kind)
                if witness is not None:
                    tensors[name] = witness
        return tensors

    def set_from_tensors(self, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        values = {name: t for name, t in tensors.items() if name not in WITNESS_FIELDS.get(kind, {})}
        for name, extreme in WITNESS_FIELDS.get(kind, {}).items():
            if name in tensors:
                self.witnesses[f"{kind}.{extreme}" if kind == "range" else kind] = tensors[name]
        if kind == "range":
            self.range_state = values
        else:
            setattr(self, kind, values[kind])


@dataclass
class _Collector:
    kinds: set[str]
    channel_dim: int
    observer: Any = None
    channel_absmax: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    num_rows: int = 0
    position: int = 0  # of the sample in the pass
    low: float = float("inf")
    high: float = float("-inf")
    witness_min: int = -1
    witness_max: int = -1
    channel_witness: torch.Tensor | None = None
    row_witness: list[torch.Tensor] = field(default_factory=list)


def collect_activation_stats(
    model: torch.nn.Module,
    requests: dict[str, set[str]],
    samples: Iterable[dict[str, Any]],
    num_samples: int,
    show_progress: bool = True,
) -> dict[str, LayerActivationStats]:
    """One pass of `model(**sample)` collecting the requested kinds per layer name.

    requests: {layer name: kinds}. Hooks are removed afterwards, leaving the model as it was.
    """
    modules = dict(model.named_modules())
    collectors: dict[str, _Collector] = {}
    handles = []
    for name, kinds in requests.items():
        if not kinds:
            continue
        unknown = set(kinds) - set(STAT_KINDS)
        if unknown:
            raise ValueError(f"unknown statistic kinds {sorted(unknown)}; allowed: {', '.join(STAT_KINDS)}")
        module = modules[name]
        collector = _Collector(set(kinds), channel_dim=1 if isinstance(module, torch.nn.Conv2d) else -1)
        if "range" in kinds:
            collector.observer = make_observer(RANGE_OBSERVER, rows=1)
        collectors[name] = collector
        handles.append(module.register_forward_pre_hook(_hook(collector)))
    if not collectors:
        return {}
    try:
        with torch.inference_mode():
            for position, sample in enumerate(tqdm(samples, total=num_samples, desc="observe inputs", unit="sample", disable=not show_progress)):
                for collector in collectors.values():
                    collector.position = position
                model(**sample)
    finally:
        for handle in handles:
            handle.remove()
    return {name: _finish(collector) for name, collector in collectors.items()}


def _hook(collector: _Collector) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        if collector.observer is not None:
            flat = x.float().reshape(1, -1)
            collector.observer.update(flat)
            if flat.numel():
                low, high = (float(v) for v in torch.aminmax(flat))
                if low < collector.low:
                    collector.low, collector.witness_min = low, collector.position
                if high > collector.high:
                    collector.high, collector.witness_max = high, collector.position
        if "channel_absmax" in collector.kinds or "rows" in collector.kinds:
            channels = x.movedim(collector.channel_dim, -1).reshape(-1, x.shape[collector.channel_dim]).float()
            if "channel_absmax" in collector.kinds:
                absmax = channels.abs().amax(dim=0)
                current = collector.channel_absmax
                here = torch.full_like(absmax, collector.position, dtype=torch.int64)
                if current is None:
                    collector.channel_absmax, collector.channel_witness = absmax, here
                else:
                    collector.channel_witness = torch.where(absmax > current, here, collector.channel_witness)
                    collector.channel_absmax = torch.maximum(current, absmax)
            if "rows" in collector.kinds and collector.num_rows < ROWS_KEPT:
                step = -(-channels.shape[0] // 64)
                take = channels[::step][: ROWS_KEPT - collector.num_rows]
                collector.rows.append(take.cpu().clone())
                collector.row_witness.append(torch.full((take.shape[0],), collector.position, dtype=torch.int64))
                collector.num_rows += take.shape[0]

    return hook


def _finish(collector: _Collector) -> LayerActivationStats:
    stats = LayerActivationStats()
    if collector.observer is not None and collector.observer.count > 0:
        stats.range_state = {k: v.cpu() for k, v in collector.observer.state_dict().items()}
        if collector.witness_min >= 0:
            stats.witnesses["range.min"] = torch.tensor([collector.witness_min], dtype=torch.int64)
            stats.witnesses["range.max"] = torch.tensor([collector.witness_max], dtype=torch.int64)
    if collector.channel_absmax is not None:
        stats.channel_absmax = collector.channel_absmax.cpu()
        stats.witnesses["channel_absmax"] = collector.channel_witness.cpu()
    if collector.rows:
        stats.rows = torch.cat(collector.rows)
        stats.witnesses["rows"] = torch.cat(collector.row_witness)
    return stats


def contains_subset(kind: str, cached: dict[str, torch.Tensor], subset: dict[str, torch.Tensor]) -> bool:
    """Whether statistics `cached`, claimed over a set of samples, can contain `subset`, computed
    exactly over some of those samples: for `range`, min <= the subset's min, max >= its max, count
    and every histogram bin >= the subset's (counts add up over samples); for `channel_absmax`,
    every channel >= the subset's. min, max and counting are exact in floating point, so the test
    holds bit for bit on any CPU. A cached statistic that fails it was not computed from these
    samples (a tampered or foreign cache entry). `rows` has no such bound: always True.

    Example:
        >>> contains_subset("channel_absmax", {"channel_absmax": torch.tensor([2.0, 3.0])}, {"channel_absmax": torch.tensor([1.0, 3.0])})
        True
        >>> contains_subset("channel_absmax", {"channel_absmax": torch.tensor([0.5, 3.0])}, {"channel_absmax": torch.tensor([1.0, 3.0])})
        False
    """
    if kind == "range":
        pairs = [("min", lambda c, s: c <= s), ("max", lambda c, s: c >= s), ("count", lambda c, s: c >= s), ("histogram", lambda c, s: c >= s)]
    elif kind == "channel_absmax":
        pairs = [("channel_absmax", lambda c, s: c >= s)]
    else:
        return True
    for name, holds in pairs:
        if name not in subset:
            continue
        if name not in cached or cached[name].shape != subset[name].shape or not bool(holds(cached[name], subset[name]).all()):
            return False
    return True


def witness_positions(kind: str, cached: dict[str, torch.Tensor]) -> set[int] | None:
    """The sample positions that witness an extreme of `cached` (one layer's tensors of `kind`);
    None when a witness is missing or malformed (an entry that cannot be checked)."""
    positions: set[int] = set()
    for name, extreme in WITNESS_FIELDS[kind].items():
        witness = cached.get(name)
        shape = cached[extreme].shape[:1] if kind == "rows" and extreme in cached else cached[extreme].shape if extreme in cached else None
        if witness is None or witness.dtype != torch.int64 or witness.shape != shape or witness.numel() == 0 or int(witness.min()) < 0:
            return None
        positions.update(int(p) for p in witness.unique())
    return positions


def witness_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of a witnessed extreme for a model computing in `dtype`:
    `max(WITNESS_TOLERANCE, WITNESS_ULPS * eps(dtype))`.

    Example:
        >>> witness_tolerance(torch.float32) == 2.0**-10, witness_tolerance(torch.bfloat16) == 2.0**-4
        (True, True)
    """
    return max(WITNESS_TOLERANCE, WITNESS_ULPS * torch.finfo(dtype).eps) if dtype.is_floating_point else WITNESS_TOLERANCE


def check_against_sample(kind: str, cached: dict[str, torch.Tensor], sample: dict[str, torch.Tensor], position: int,
                         tolerance: float = WITNESS_TOLERANCE) -> str | None:
    """Check one layer's cached statistic of `kind` against the same statistic recomputed on the
    single sample at `position`: it must contain it, and reproduce every extreme that sample
    witnesses, both within `tolerance` of the layer's largest magnitude (a recomputation on
    another CPU or thread count moves activations by a few ulps, so neither can be exact; the
    sample's value count must be contained exactly, its histogram bins are not compared, as a
    value on a bin edge may cross it). None when it holds, else what differs (one line)."""
    for name, extreme in WITNESS_FIELDS[kind].items():
        if kind == "rows":
            break
        if cached[extreme].shape != sample[extreme].shape:
            return f"{extreme} has shape {tuple(cached[extreme].shape)} in the cache, sample {position} gives {tuple(sample[extreme].shape)}"
        slack = tolerance * _magnitude(kind, cached)
        if extreme == "min":
            narrower = cached["min"].double() > sample["min"].double() + slack
        else:
            narrower = cached[extreme].double() < sample[extreme].double() - slack
        if bool(narrower.any()):
            return f"{extreme} of the cache does not contain what sample {position} gives (narrower than its data)"
    if kind == "range" and bool((cached["count"] < sample["count"]).any()):
        return f"the cache counts fewer values than sample {position} alone has"
    for name, extreme in WITNESS_FIELDS[kind].items():
        witnessed = cached[name] == position
        if not bool(witnessed.any()):
            continue
        want, got = cached[extreme].double(), sample[extreme].double()
        scale = _magnitude(kind, cached)
        if kind == "rows":  # the sample's rows, in order, are the cached rows it witnesses (a prefix for the last sample)
            want = want[witnessed]
            if got.shape[0] < want.shape[0] or got.shape[1:] != want.shape[1:]:
                return f"{want.shape[0]} cached rows name sample {position}, which gives {got.shape[0]}"
            difference = (want - got[: want.shape[0]]).abs().amax(dim=-1)
            if bool((difference > tolerance * scale).any()):
                row = int((difference > tolerance * scale).nonzero()[0, 0])
                return f"cached row {row} of sample {position} differs from the sample's by {float(difference[row]):.6g}"
            continue
        wrong = witnessed & ((want - got).abs() > tolerance * scale)
        if bool(wrong.any()):
            index = int(wrong.nonzero()[0, 0])
            where = extreme if kind == "range" else f"channel {index}"
            return f"{where} is {float(want[index]):.6g} in the cache, its witness sample gives {float(got[index]):.6g}"
    return None


def _magnitude(kind: str, cached: dict[str, torch.Tensor]) -> float:
    """The layer's largest cached magnitude, the scale of the tolerances."""
    if kind == "range":
        return max(float(cached["min"].double().abs().max()), float(cached["max"].double().abs().max()))
    return float(cached[kind].double().abs().max())
