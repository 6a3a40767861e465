"""The quantizer: plan which layers to quantize, observe their inputs, build quantized modules.

1. `plan_layers` walks the target submodule and picks every nn.Linear and nn.Conv2d that no
   exclude pattern matches, resolving each one's LayerSpec from the recipe. Layers a spec cannot
   apply to (an input dim not divisible by the group size) are skipped, with the reason recorded.
2. `stat_requests` says which activation statistics the recipe needs
   (`diffquant.quant.activation_stats`: input ranges for static observers, per-channel abs-max
   for SVDQuant smoothing, input rows for its alpha search); stage two collects or loads them.
3. `build_quantized_layer` freezes scales and returns a QuantizedLinear / QuantizedConv2d.
   With the recipe's `share_groups`, the parts of a shared-input group (`shared_groups`) are
   chosen together, once, when the group's first part is built (`SharedGroup`): one smoothing
   factor and one SVD of the stacked weight, one per-tensor / NVFP4 weight range.
4. `swap_layers` puts the quantized modules into the submodule.

SVDQuant with static inputs: the layer quantizes x / s, so its static range is taken from the
per-channel abs-max the smoothing reads, max_j absmax_j / s_j, which is the min_max range of x / s
exactly (division by s_j > 0 is monotone, also after float rounding); the recipe allows only the
symmetric min_max observer there.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from diffquant.quant.algorithms.clip_search import search_clip_range
from diffquant.quant.algorithms.svdquant import LowRankSplit, refine_low_rank, smoothed_weight, smoothing_factor, split_smoothed
from diffquant.quant.activation_stats import LayerActivationStats
from diffquant.quant.errors import ConfigError
from diffquant.quant.modules import QuantizedConv2d, QuantizedLayer, QuantizedLinear, conv_options
from diffquant.quant.observers import QuantGrid, make_observer
from diffquant.quant.qtypes import get_qtype, magnitude_grid
from diffquant.quant.shifted_inputs import shift_correction, shift_input, shifted_bias
from diffquant.quant.recipe import Recipe, SVDQuantConfig
from diffquant.quant.shared_groups import shared_input_groups
from diffquant.quant.spec import LayerSpec, TensorSpec, resolve_scale_dtype
from diffquant.quant.weights import QuantizedWeight, fake_quantize_input, input_params, quantize_weight_in_range, weight_rows

LAYER_TYPES: dict[type, str] = {torch.nn.Linear: "Linear", torch.nn.Conv2d: "Conv2d"}
WEIGHT_OBSERVER_CHUNK = 2048


@dataclass
class LayerPlan:
    """One layer to quantize: its name, type, resolved spec, whether it gets an SVD branch, and
    the shared-input group it is chosen with (recipe `share_groups`), if any."""

    name: str
    layer_type: str
    spec: LayerSpec
    svd: bool
    group: "SharedGroup | None" = field(default=None, repr=False, compare=False)

    @property
    def needs_input_observer(self) -> bool:
        return self.spec.input is not None and not self.spec.input.dynamic and self.spec.input.dtype != "mxfp4"


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    reason: str


def plan_layers(model: torch.nn.Module, recipe: Recipe, quant_exclude: Iterable[str], svd_exclude: Iterable[str]) -> tuple[list[LayerPlan], list[SkippedLayer]]:
    """Decide, for every Linear and Conv2d of `model`, whether and how it is quantized.

    The recipe's excludes are added to the model's (`quant_exclude`, `svd_exclude`), or replace
    them when the recipe says `exclude_mode: replace`."""
    if recipe.exclude_mode == "replace":
        quant_exclude, svd_exclude = (), ()
    excludes = [*quant_exclude, *recipe.exclude]
    svd_excludes = [*svd_exclude, *(recipe.svdquant.exclude if recipe.svdquant else ())]
    plans: list[LayerPlan] = []
    skipped: list[SkippedLayer] = []
    for name, module in model.named_modules():
        layer_type = LAYER_TYPES.get(type(module))
        if layer_type is None:
            continue
        pattern = next((p for p in excludes if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None:
            skipped.append(SkippedLayer(name, f"excluded by {pattern}"))
            continue
        spec = resolve_scale_dtype(recipe.layer_spec(name, layer_type), str(module.weight.dtype).removeprefix("torch."))
        reason = _unsupported_reason(module, spec)
        if reason is None:
            spec, reason = resolve_shift_from(spec, name, module, model)
        if reason:
            skipped.append(SkippedLayer(name, reason))
            continue
        svd = recipe.svdquant is not None and layer_type == "Linear" and not any(fnmatch.fnmatchcase(name, p) for p in svd_excludes)
        plans.append(LayerPlan(name, layer_type, spec, svd))
    _attach_groups(model, plans, recipe)
    return plans, skipped


def resolve_shift_from(spec: LayerSpec, name: str, module: torch.nn.Module, model: torch.nn.Module) -> tuple[LayerSpec, str | None]:
    """(`spec` with a shifted input's `shift_from` as a column index of this layer, or the reason the
    layer cannot take it). `proj_mlp` is in_features - proj_mlp.out_features of the sibling
    `proj_mlp` (a Flux single block's proj_out reads cat(attention, gelu(proj_mlp(x))), so its MLP
    columns are the last ones)."""
    act = spec.input
    if act is None or act.shift is None:
        return spec, None
    if not isinstance(module, torch.nn.Linear):
        raise ConfigError(f"layer {name}: an input shift applies to Linear layers, not {type(module).__name__}", "match only Linear layers with shift")
    start = act.shift_from
    if start == "proj_mlp":
        parent = model.get_submodule(name.rpartition(".")[0])
        proj_mlp = getattr(parent, "proj_mlp", None)
        if not isinstance(proj_mlp, torch.nn.Linear):
            raise ConfigError(f"layer {name}: shift_from proj_mlp needs a sibling proj_mlp Linear (a Flux single block's proj_out)",
                              "match only single_transformer_blocks.*.proj_out with it, or give shift_from a column index")
        start = module.in_features - proj_mlp.out_features
    assert isinstance(start, int)
    if not 0 <= start < module.in_features or start % (act.group_size or 1):
        return spec, f"its input shift starts at column {start}, outside its {module.in_features} inputs or off the {act.group_size}-wide input groups"
    return LayerSpec(spec.weight, dataclasses.replace(act, shift_from=start)), None


@dataclass
class GroupPart:
    """One part of a shared group: the weight it quantizes (its rows of the residual), its rows of
    the low-rank split, the group's weight range where the scale is tensor-wide, the alpha used."""

    weight: torch.Tensor
    split: LowRankSplit | None
    weight_range: tuple[torch.Tensor, torch.Tensor] | None
    alpha: float | None


class SharedGroup:
    """The parts of a shared-input group, chosen together when the first part is built.

    Holds the parts' float modules only until then (the stage releases each float layer after its
    swap), and afterwards each remaining part's float32 rows until that part is built.
    """

    def __init__(self, members: tuple[str, ...], modules: dict[str, torch.nn.Module]) -> None:
        self.members = members
        self._modules: dict[str, torch.nn.Module] | None = modules
        self._parts: dict[str, GroupPart] | None = None

    def part(self, name: str, stats: LayerActivationStats | None, spec: LayerSpec, svd: SVDQuantConfig | None) -> GroupPart:
        if self._parts is None:
            self._parts = self._choose(stats, spec, svd)
            self._modules = None
        return self._parts.pop(name)

    def _choose(self, stats: LayerActivationStats | None, spec: LayerSpec, svd: SVDQuantConfig | None) -> dict[str, GroupPart]:
        assert self._modules is not None
        weights = [self._modules[m].weight for m in self.members]
        if any(w.is_meta for w in weights):
            raise ConfigError(f"share_groups chooses {', '.join(self.members)} together, but some of their weights are offloaded",
                              "quantize without a device_map that offloads them (blockwise placement keeps a block's weights together)")
        stacked = torch.cat([w.detach().float().to(weights[0].device) for w in weights])
        split: LowRankSplit | None = None
        alpha: float | None = None
        residual = stacked
        if svd is not None:
            smooth, alpha = svd_smoothing(stacked, stats, spec, svd, f"layer {self.members[0]}'s group")
            split = svd_split(stacked, smooth, spec.weight, svd)
            residual = split.residual
        weight_range = None
        if spec.weight.granularity == "per_tensor" or spec.weight.dtype == "nvfp4":
            lo, hi = observe_weight_range(residual, spec.weight)
            amax = torch.maximum(lo.abs(), hi.abs()).amax().reshape(1)
            weight_range = (lo, hi) if spec.weight.granularity == "per_tensor" else (-amax, amax)
        parts: dict[str, GroupPart] = {}
        start = 0
        for name, weight in zip(self.members, weights):
            rows = slice(start, start + weight.shape[0])
            start += weight.shape[0]
            part_split = None
            if split is not None:
                part_split = LowRankSplit(smooth_factor=split.smooth_factor, lora_down=split.lora_down,
                                          lora_up=split.lora_up[rows].contiguous(), residual=split.residual[rows].contiguous())  # fmt: skip
            parts[name] = GroupPart(residual[rows].contiguous(), part_split, weight_range, alpha)
        return parts


def _attach_groups(model: torch.nn.Module, plans: list[LayerPlan], recipe: Recipe) -> None:
    by_name = {plan.name: plan for plan in plans}
    for members in shared_input_groups(by_name, recipe.share_groups):
        group_plans = [by_name[m] for m in members]
        kinds = {(p.layer_type, p.svd, p.spec.weight, p.spec.input) for p in group_plans}
        if len(kinds) != 1:
            raise ConfigError(f"recipe {recipe.name}: share_groups chooses {', '.join(members)} together, but their specs or svd branches differ",
                              "give them one spec (and the same svd excludes), or set share_groups: none")
        group = SharedGroup(members, {m: model.get_submodule(m) for m in members})
        for plan in group_plans:
            plan.group = group


def quant_grid(spec: TensorSpec) -> QuantGrid:
    """The value grid an observer optimises the clipping range for."""
    qtype = get_qtype(spec.dtype)
    if qtype.element == "int":
        return QuantGrid.integer(int(qtype.qmin), int(qtype.qmax), symmetric=spec.symmetric)
    return QuantGrid.floating(magnitude_grid(qtype))


def stat_requests(model: torch.nn.Module, plans: list[LayerPlan], recipe: Recipe) -> dict[str, set[str]]:
    """The activation statistics a recipe needs, per layer name.

    `range` and `channel_absmax` are requested for every Linear/Conv2d (resp. Linear) of the
    model, not only the planned ones, so that one cached pass serves every recipe and exclude
    list; `rows` (alpha search only) just for the SVDQuant layers.
    """
    requests: dict[str, set[str]] = {}
    layer_types = {name: LAYER_TYPES.get(type(m)) for name, m in model.named_modules() if type(m) in LAYER_TYPES}
    if any(plan.needs_input_observer for plan in plans):
        for name in layer_types:
            requests.setdefault(name, set()).add("range")
    smoothed = recipe.svdquant is not None and recipe.svdquant.smoothing == "activation"
    static_svd_inputs = any(plan.svd and plan.needs_input_observer for plan in plans)
    if recipe.svdquant is not None and any(plan.svd for plan in plans) and (smoothed or static_svd_inputs):
        for name, layer_type in layer_types.items():
            if layer_type == "Linear":
                requests.setdefault(name, set()).add("channel_absmax")
        if recipe.svdquant.search_alpha:
            for plan in plans:
                if plan.svd:
                    requests[plan.name].add("rows")
    return requests


def build_quantized_layer(
    module: torch.nn.Module,
    plan: LayerPlan,
    stats: LayerActivationStats | None,
    svd: SVDQuantConfig | None,
) -> tuple[QuantizedLayer, dict[str, Any]]:
    """Freeze one layer's quantization; returns the module and the facts the manifest records.

    `module`'s weight must be materialized (a caller placing weights with accelerate onloads it
    first); the quantized layer is built on the weight's device.
    """
    compute_dtype = module.weight.dtype
    weight = module.weight.detach().float()
    bias = module.bias.detach().clone() if module.bias is not None else None
    facts: dict[str, Any] = {}
    lowrank: dict[str, torch.Tensor] | None = None
    to_quantize = weight
    split: LowRankSplit | None = None
    weight_range: tuple[torch.Tensor, torch.Tensor] | None = None
    use_svd = plan.svd and svd is not None
    if plan.group is not None:
        part = plan.group.part(plan.name, stats, plan.spec, svd if use_svd else None)
        to_quantize, split, weight_range, alpha = part.weight.to(weight.device), part.split, part.weight_range, part.alpha
    elif use_svd:
        smooth, alpha = svd_smoothing(weight, stats, plan.spec, svd, f"layer {plan.name}")
        split = svd_split(weight, smooth, plan.spec.weight, svd)
    if split is not None and svd is not None:
        lowrank_dtype = compute_dtype if compute_dtype in (torch.float16, torch.bfloat16) else torch.float16
        lowrank = {
            "smooth_factor": split.smooth_factor,
            "lora_down": split.lora_down.to(lowrank_dtype),
            "lora_up": split.lora_up.to(lowrank_dtype),
        }
        to_quantize = split.residual
        facts.update(svd_rank=split.lora_down.shape[0], svd_alpha=alpha, svd_method=svd.svd)
    if weight_range is not None:
        quantized_weight = quantize_weight_in_range(to_quantize, plan.spec.weight, *weight_range)
    else:
        quantized_weight = quantize_weight_with_observer(to_quantize, plan.spec.weight)
    if plan.spec.input is not None and plan.spec.input.shift is not None:
        # The residual GEMM sees (x + c) / s: the bias takes back c Σ_j deq(R)_ij / s_j (`shifted_inputs`).
        smooth = split.smooth_factor if split is not None else None
        bias = shifted_bias(bias, quantized_weight.dequantize(torch.float32).reshape(weight.shape[0], -1), smooth, plan.spec.input, compute_dtype)
    act_params = None
    if plan.needs_input_observer and split is not None:
        if stats is None or stats.channel_absmax is None:
            raise RuntimeError(f"layer {plan.name} never ran during calibration, so its input scale is unknown")
        lo, hi = _smoothed_input_range(plan.spec.input, stats, split.smooth_factor, plan.name)
        act_params = input_params(plan.spec.input, lo, hi)
        facts.update(input_range=[float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0])])
    elif plan.needs_input_observer:
        if stats is None or stats.range_state is None:
            raise RuntimeError(f"layer {plan.name} never ran during calibration, so its input scale is unknown")
        observer = make_observer(plan.spec.input.observer, rows=1, **_observer_options(plan.spec.input))
        observer.load_state_dict(stats.range_state)
        lo, hi = observer.compute_range(quant_grid(plan.spec.input))
        act_params = input_params(plan.spec.input, lo, hi)
        facts.update(input_range=[float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0])])
    common = dict(weight=quantized_weight, bias=bias, compute_dtype=compute_dtype, input_spec=plan.spec.input,
                  input_params=act_params, lowrank=lowrank)
    layer: QuantizedLayer
    if plan.layer_type == "Conv2d":
        layer = QuantizedConv2d(**common, conv=conv_options(module))
    else:
        layer = QuantizedLinear(**common)
    return layer, facts


def quantize_weight_with_observer(weight: torch.Tensor, spec: TensorSpec) -> QuantizedWeight:
    """Observe a weight with its spec's observer, one row per scale, and quantize it."""
    return quantize_weight_in_range(weight, spec, *observe_weight_range(weight, spec))


def observe_weight_range(weight: torch.Tensor, spec: TensorSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range (lo, hi: [rows]) of a weight per row of `weight_rows`, by its spec's observer.

    Rows are observed in chunks of WEIGHT_OBSERVER_CHUNK, so histogram observers on per-group
    weights stay within ~64 MiB of histogram counters. `mse_search` is not an observer of
    calibration batches: its clip search (`algorithms.clip_search`) runs on the rows directly.
    """
    rows = weight_rows(weight, spec)
    grid = quant_grid(spec)
    los, his = [], []
    if spec.observer == "mse_search":
        qtype = get_qtype(spec.dtype)
        for chunk in rows.split(WEIGHT_OBSERVER_CHUNK):
            lo, hi = search_clip_range(chunk, int(qtype.qmin), int(qtype.qmax), spec.symmetric, spec.scale_rule)
            los.append(lo)
            his.append(hi)
        return torch.cat(los), torch.cat(his)
    for chunk in rows.split(WEIGHT_OBSERVER_CHUNK):
        observer = make_observer(spec.observer, rows=chunk.shape[0], **_observer_options(spec))
        observer.update(chunk)
        lo, hi = observer.compute_range(grid)
        los.append(lo)
        his.append(hi)
    return torch.cat(los), torch.cat(his)


def svd_smoothing(weight: torch.Tensor, stats: LayerActivationStats | None, spec: LayerSpec, svd: SVDQuantConfig,
                  what: str) -> tuple[torch.Tensor, float | None]:
    """(smooth factor [in] float32, alpha): SVDQuant's s from the calibration statistics, or s = 1
    for `smoothing: identity` (alpha None: no activation term)."""
    if svd.smoothing == "identity":
        return torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device), None
    if stats is None or stats.channel_absmax is None:
        raise RuntimeError(f"{what} never ran during calibration, so it cannot be smoothed")
    alpha = _choose_alpha(weight, stats, spec, svd) if svd.search_alpha else svd.alpha
    return smoothing_factor(stats.channel_absmax, weight, alpha), alpha


def svd_split(weight: torch.Tensor, smooth: torch.Tensor, weight_spec: TensorSpec, svd: SVDQuantConfig) -> LowRankSplit:
    """SVDQuant's split of one weight, refined `svd.refine_iters` rounds against `weight_spec`'s quantizer."""
    smoothed = smoothed_weight(weight, smooth)
    if svd.refine_iters == 0:
        return split_smoothed(smoothed, smooth, svd.rank, svd.svd, svd.niter, svd.oversample)
    # The plain split goes straight in, so its residual is freed once a refined round is better.
    return refine_low_rank(smoothed, split_smoothed(smoothed, smooth, svd.rank, svd.svd, svd.niter, svd.oversample), lambda r: quantize_weight_with_observer(r, weight_spec).dequantize(torch.float32),
                           svd.refine_iters, svd.svd, svd.niter, svd.oversample)


def swap_layers(model: torch.nn.Module, layers: dict[str, torch.nn.Module]) -> None:
    """Replace the named submodules of `model` (dotted names) by the given modules."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)


def _unsupported_reason(module: torch.nn.Module, spec: LayerSpec) -> str | None:
    k = module.weight.shape[1:].numel()
    if spec.weight.granularity == "per_group" and k % spec.weight.group_size:
        return f"input size {k} is not a multiple of weight group size {spec.weight.group_size}"
    channels = module.in_features if isinstance(module, torch.nn.Linear) else module.in_channels
    if spec.input is not None and spec.input.granularity == "per_group" and channels % spec.input.group_size:
        return f"{channels} input channels are not a multiple of input group size {spec.input.group_size}"
    if spec.input is not None and not spec.input.dynamic and spec.input.granularity != "per_tensor" and spec.input.dtype != "nvfp4":
        return "static input scales are per_tensor only; use dynamic: true for per_group inputs"
    return None


def _observer_options(spec: TensorSpec) -> dict[str, Any]:
    return {"percentile": spec.percentile} if spec.observer == "percentile" else {}


def _smoothed_input_range(spec: TensorSpec, stats: LayerActivationStats, smooth: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric min_max range of x / smooth: (-m, m) with m = max_j absmax_j / smooth_j."""
    if spec.observer != "min_max" or not spec.symmetric:
        raise ConfigError(f"layer {name}: svdquant with static inputs needs the symmetric min_max observer, not {spec.observer}",
                          "set input observer: min_max and symmetric: true, or dynamic: true")
    assert stats.channel_absmax is not None
    m = (stats.channel_absmax.float().to(smooth.device) / smooth.float()).amax()
    return -m, m


def _choose_alpha(weight: torch.Tensor, stats: LayerActivationStats, spec: LayerSpec, svd: SVDQuantConfig) -> float:
    """The alpha of `svd.alpha_grid` whose quantized layer best reproduces the cached inputs' outputs."""
    if stats.rows is None:
        return svd.alpha
    x = stats.rows.to(weight.device)
    reference = x @ weight.T
    best_alpha, best_error = svd.alpha, float("inf")
    for alpha in svd.alpha_grid:
        split = svd_split(weight, smoothing_factor(stats.channel_absmax, weight, alpha), spec.weight, svd)
        residual = quantize_weight_with_observer(split.residual, spec.weight).dequantize(torch.float32)
        xs = x / split.smooth_factor
        params = None
        if spec.input is not None and not spec.input.dynamic and spec.input.dtype != "mxfp4":
            params = input_params(spec.input, *_smoothed_input_range(spec.input, stats, split.smooth_factor, "alpha search"))
        if spec.input is not None and spec.input.shift is not None:
            xq = fake_quantize_input(shift_input(x, spec.input) / split.smooth_factor, spec.input, None)
            xq_out = xq @ residual.T - shift_correction(residual, split.smooth_factor, spec.input).float()
        else:
            xq = fake_quantize_input(xs, spec.input, params) if spec.input is not None else xs
            xq_out = xq @ residual.T
        approx = xq_out + (xs @ split.lora_down.T) @ split.lora_up.T
        error = float((approx - reference).pow(2).mean())
        if error < best_error:
            best_alpha, best_error = alpha, error
    return best_alpha
