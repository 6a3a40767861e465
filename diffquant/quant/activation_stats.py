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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from diffquant.quant.observers import make_observer

STAT_KINDS = ("range", "channel_absmax", "rows")
ROWS_KEPT = 512
RANGE_OBSERVER = "histogram"  # keeps the full histogram state every observer can load


@dataclass
class LayerActivationStats:
    """The statistics of one layer's input; a kind that was not collected is None."""

    range_state: dict[str, torch.Tensor] | None = None
    channel_absmax: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def to_tensors(self, kind: str) -> dict[str, torch.Tensor]:
        """The tensors of one kind, named by field, for saving."""
        if kind == "range":
            return dict(self.range_state or {})
        value = getattr(self, kind)
        return {} if value is None else {kind: value}

    def set_from_tensors(self, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        if kind == "range":
            self.range_state = dict(tensors)
        else:
            setattr(self, kind, tensors[kind])


@dataclass
class _Collector:
    kinds: set[str]
    channel_dim: int
    observer: Any = None
    channel_absmax: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    num_rows: int = 0


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
            for sample in tqdm(samples, total=num_samples, desc="observe inputs", unit="sample", disable=not show_progress):
                model(**sample)
    finally:
        for handle in handles:
            handle.remove()
    return {name: _finish(collector) for name, collector in collectors.items()}


def _hook(collector: _Collector) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        if collector.observer is not None:
            collector.observer.update(x.float().reshape(1, -1))
        if "channel_absmax" in collector.kinds or "rows" in collector.kinds:
            channels = x.movedim(collector.channel_dim, -1).reshape(-1, x.shape[collector.channel_dim]).float()
            if "channel_absmax" in collector.kinds:
                absmax = channels.abs().amax(dim=0)
                current = collector.channel_absmax
                collector.channel_absmax = absmax if current is None else torch.maximum(current, absmax)
            if "rows" in collector.kinds and collector.num_rows < ROWS_KEPT:
                step = -(-channels.shape[0] // 64)
                take = channels[::step][: ROWS_KEPT - collector.num_rows]
                collector.rows.append(take.cpu().clone())
                collector.num_rows += take.shape[0]

    return hook


def _finish(collector: _Collector) -> LayerActivationStats:
    stats = LayerActivationStats()
    if collector.observer is not None and collector.observer.count > 0:
        stats.range_state = {k: v.cpu() for k, v in collector.observer.state_dict().items()}
    if collector.channel_absmax is not None:
        stats.channel_absmax = collector.channel_absmax.cpu()
    if collector.rows:
        stats.rows = torch.cat(collector.rows)
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
