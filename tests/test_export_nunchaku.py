"""Nunchaku Lite export: the key set and shapes against diffusers' own replacement code (in a
process that never imports diffquant), and the packing read back by a reference unpacker written
here from nunchaku's packer algorithm (index arithmetic, not the exporter's reshapes), compared
with diffquant's codes bit for bit. The W4A4 / AWQ kernels need an NVIDIA GPU (and diffusers
refuses Hopper), so no forward runs here; `test_unpacked_tensors_rebuild_diffquant_layer` checks
that the unpacked tensors compute diffquant's layer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffquant.errors import ConfigError
from diffquant.eval.metrics import sqnr_db
from diffquant.export import export_checkpoint
from diffquant.export.stored import StoredCheckpoint, unpack_int4
from tests.helpers.export_checks import wide_flux_pipeline

BF16_REL = 2.0**-8  # half a bf16 ulp (8-bit significand), relative

REPLACE_AND_CHECK = r"""
import json, sys, torch, diffusers
from accelerate import init_empty_weights
from safetensors.torch import load_file
from diffusers import NunchakuLiteQuantizationConfig
from diffusers.quantizers.nunchaku.utils import AWQW4A16Linear, SVDQW4A4Linear, check_strict_state_dict_match, replace_with_nunchaku_linear
folder = sys.argv[1]
config = json.load(open(f"{folder}/config.json"))
quant = NunchakuLiteQuantizationConfig(**config.pop("quantization_config"))
with init_empty_weights():
    model = getattr(diffusers, config["_class_name"]).from_config(config)
replaced = replace_with_nunchaku_linear(model, quant.to_dict(), quant.compute_dtype)
state = load_file(f"{folder}/diffusion_pytorch_model.safetensors")
check_strict_state_dict_match(model, state)
mismatch = []
for name, param in list(model.named_parameters()) + list(model.named_buffers()):
    module = model.get_submodule(name.rpartition(".")[0])
    quantized = isinstance(module, (SVDQW4A4Linear, AWQW4A16Linear))
    if tuple(param.shape) != tuple(state[name].shape) or (quantized and param.dtype != state[name].dtype):
        mismatch.append((name, tuple(param.shape), str(param.dtype), tuple(state[name].shape), str(state[name].dtype)))
model.load_state_dict(state, strict=True, assign=True)
kinds = {}
for module in model.modules():
    kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
assert "diffquant" not in sys.modules
print(json.dumps({"replaced": replaced, "mismatch": mismatch, "svdq": kinds.get("SVDQW4A4Linear", 0), "awq": kinds.get("AWQW4A16Linear", 0)}))
"""


@pytest.fixture(scope="module")
def kernels_stub(tmp_path_factory):
    """A stand-in for the Hub `kernels` package, so diffusers' Nunchaku module imports on a CPU
    machine; its ops are never called here (they are CUDA kernels)."""
    root = tmp_path_factory.mktemp("kernels-stub")
    (root / "kernels").mkdir()
    (root / "kernels" / "__init__.py").write_text(
        "class _Ops:\n    def __getattr__(self, name):\n        raise RuntimeError('nunchaku kernels need a GPU')\n"
        "class _Kernel:\n    ops = _Ops()\n"
        "def get_kernel(*args, **kwargs):\n    return _Kernel()\n")
    info = root / "kernels-0.14.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.14.0\n")
    (info / "top_level.txt").write_text("kernels\n")
    (info / "RECORD").write_text("kernels/__init__.py,,\n")
    return root


def replaced_by_diffusers(folder, stub) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(stub), DIFFUSERS_TRUST_REMOTE_KERNELS="true", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", REPLACE_AND_CHECK, str(folder)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wide_flux(tmp_path_factory):
    return str(wide_flux_pipeline(tmp_path_factory.mktemp("wide-flux")))


@pytest.fixture(scope="module")
def wide_quantized(wide_flux, tmp_path_factory):
    """Calibrate the wide tiny-flux once (3 prompts x 2 steps) and quantize it once per recipe."""
    from diffquant.stages.calibrate import CalibrationSettings, calibrate
    from diffquant.stages.quantize import QuantizeSettings, quantize

    calib = tmp_path_factory.mktemp("wide-calib")
    calibrate(CalibrationSettings(model=wide_flux, out=calib, num_prompts=3, steps=2), show_progress=False)
    cache = {}

    def make(recipe: str):
        if recipe not in cache:
            out = tmp_path_factory.mktemp(f"wide-{Path(recipe).stem}")
            cache[recipe] = quantize(QuantizeSettings(calib=calib, recipe=recipe, out=out, device="cpu", holdout=2), show_progress=False)
        return cache[recipe]

    return make


# ---- reference unpackers: the position of each element in nunchaku's packed stream ----------

def nibble_stream(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([flat & 0xF, flat >> 4], dim=-1).reshape(-1)


def ref_unpack_weight(qweight: torch.Tensor) -> torch.Tensor:
    """int8 [N, K/2] -> 4-bit codes [N, K]: row = 128 t + 16 pack + 8 half + lane (8 lanes),
    col = 64 kt + 32 khalf + 8 klane + reg; stream order (t, kt, pack, lane, klane, half, khalf, reg)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    row, col = torch.arange(n)[:, None], torch.arange(k)[None, :]
    t, rr = row // 128, row % 128
    pack, half, lane = rr // 16, (rr % 16) // 8, rr % 8
    kt, ck = col // 64, col % 64
    khalf, klane, reg = ck // 32, (ck % 32) // 8, ck % 8
    pos = (((((((t * (k // 64) + kt) * 8 + pack) * 8 + lane) * 4 + klane) * 2 + half) * 2 + khalf) * 8 + reg)
    return nibble_stream(qweight)[pos]


def ref_unpack_scales(buffer: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """[G, N] (or [N]) -> [N, G]: row = 128 t + 16 a + 8 b + 2 c + d, stream (t, g, a, c, b, d)."""
    flat = buffer.reshape(-1)
    row, g = torch.arange(n)[:, None], torch.arange(groups)[None, :]
    t, rr = row // 128, row % 128
    a, b, c, d = rr // 16, (rr % 16) // 8, (rr % 8) // 2, rr % 2
    return flat[(((((t * groups + g) * 8 + a) * 4 + c) * 2 + b) * 2 + d)]


def ref_unpack_micro_scales(buffer: torch.Tensor, n: int, blocks: int) -> torch.Tensor:
    """[K/16, N] -> [N, K/16]: row = 128 t + 32 p + 8 q + r, block = 4 s + u, stream (t, s, r, q, p, u)."""
    flat = buffer.reshape(-1)
    row, blk = torch.arange(n)[:, None], torch.arange(blocks)[None, :]
    t, rr = row // 128, row % 128
    p, q, r = rr // 32, (rr % 32) // 8, rr % 8
    s, u = blk // 4, blk % 4
    return flat[(((((t * (blocks // 4) + s) * 8 + r) * 4 + q) * 4 + p) * 4 + u)]


def ref_unpack_lowrank(buffer: torch.Tensor, down: bool) -> torch.Tensor:
    """down: [in, rank] -> lora_down [rank, in]; up: [out, rank] -> [out, rank]. In each 16 x 16
    fragment n = 8 npack + lane, k = 8 kpack + 2 klane + reg; stream (col frag, rank frag, lane, klane, npack, kpack, reg)."""
    width, rank = buffer.shape
    flat = buffer.reshape(-1)
    if down:
        n_idx, k_idx = torch.arange(rank)[:, None], torch.arange(width)[None, :]  # n = rank, k = in
        outer, inner = k_idx // 16, n_idx // 16
    else:
        n_idx, k_idx = torch.arange(width)[:, None], torch.arange(rank)[None, :]  # n = out, k = rank
        outer, inner = n_idx // 16, k_idx // 16
    nn_, kk = n_idx % 16, k_idx % 16
    npack, lane = nn_ // 8, nn_ % 8
    kpack, klane, reg = kk // 8, (kk % 8) // 2, kk % 2
    pos = ((((((outer * (rank // 16) + inner) * 8 + lane) * 4 + klane) * 2 + npack) * 2 + kpack) * 2 + reg)
    return flat[pos]


def ref_unpack_awq(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N/4, K/2] -> unsigned codes [N, K]: code (o, c) is nibble c%32 // 8 of 16-bit word
    (o//4, 64 (c//64) + 16 (o%4) + 8 ((c%64)//32) + c%8)."""
    words = qweight.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    n, k = qweight.shape[0] * 4, qweight.shape[1] * 2
    o, c = torch.arange(n)[:, None], torch.arange(k)[None, :]
    col = (c // 64) * 64 + (o % 4) * 16 + ((c % 64) // 32) * 8 + c % 8
    return (words[o // 4, col] >> (4 * ((c % 32) // 8))) & 0xF


# ---- tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["svdquant_w4a4", "nvfp4", "w4a16"])
def test_diffusers_replacement_takes_exactly_the_exported_keys(recipe, wide_flux, wide_quantized, kernels_stub, tmp_path) -> None:
    result = wide_quantized(recipe)
    folder = tmp_path / "nunchaku"
    report = export_checkpoint(result.out, "nunchaku-lite", folder, config=f"{wide_flux}/transformer", dense_unfit=True)
    seen = replaced_by_diffusers(folder, kernels_stub)
    targets = sum(len(v["targets"]) for k, v in json.loads((folder / "config.json").read_text())["quantization_config"].items() if isinstance(v, dict))
    assert seen["mismatch"] == []
    assert seen["replaced"] == targets == sum(n for kind, n in report.layers.items() if not kind.startswith("dense"))
    assert (seen["svdq"], seen["awq"]) == ((0, targets) if recipe == "w4a16" else (targets, 0))
    assert targets >= 15  # the wide twin's tiled Linear layers left by the Flux family's exclude patterns (19)


@pytest.mark.parametrize("recipe", ["svdquant_w4a4", "svdquant_w4a4_nosmooth", "nvfp4"])
def test_svdq_packing_unpacks_to_diffquant_codes_and_scales(recipe, wide_flux, wide_quantized, tmp_path) -> None:
    result = wide_quantized(recipe)
    export_checkpoint(result.out, "nunchaku-lite", tmp_path / "n", config=f"{wide_flux}/transformer", dense_unfit=True)
    state = load_file(tmp_path / "n" / "diffusion_pytorch_model.safetensors")
    targets = json.loads((tmp_path / "n" / "config.json").read_text())["quantization_config"]["svdq_w4a4"]["targets"]
    source = StoredCheckpoint.read(result.out)
    records = {r.name: r for r in source.layers}
    # Layers the SVD excludes leave without a branch get a zero one of the others' rank (16 when none has one).
    zero_rank = max((r.svd.rank for r in records.values() if r.svd), default=16)
    for name in targets:
        record, stored = records[name], source.stored(records[name])
        n, k = record.out_features, record.in_features
        codes = unpack_int4(stored["weight_packed"], signed=False)
        assert torch.equal(ref_unpack_weight(state[f"{name}.qweight"]), codes)
        if recipe == "nvfp4":
            assert state[f"{name}.wscales"].dtype == torch.float8_e4m3fn
            got = ref_unpack_micro_scales(state[f"{name}.wscales"].view(torch.uint8), n, k // 16)
            assert torch.equal(got, stored["weight_scale"].view(torch.uint8))
            assert torch.equal(state[f"{name}.wtscale"], stored["weight_scale_2"].reshape(1).bfloat16())
            assert torch.equal(state[f"{name}.wcscales"], torch.ones(n, dtype=torch.bfloat16))
        else:
            scale = stored["weight_scale"]
            got = ref_unpack_scales(state[f"{name}.wscales"], n, k // 64)
            assert torch.equal(got, scale.bfloat16())
            assert torch.all((got.float() - scale).abs() <= BF16_REL * scale.abs())
        svd = {s: source.tensors[key] for s, key in record.svd.tensors.items()} if record.svd else None
        smooth = svd["smooth_factor"] if svd else torch.ones(k)
        assert torch.equal(ref_unpack_scales(state[f"{name}.smooth_factor"], k, 1)[:, 0], smooth.bfloat16())
        down = ref_unpack_lowrank(state[f"{name}.proj_down"], down=True)
        up = ref_unpack_lowrank(state[f"{name}.proj_up"], down=False)
        if svd:
            assert torch.equal(down, (svd["lora_down"].float() / smooth.float()).bfloat16())
            assert torch.equal(up, svd["lora_up"].bfloat16())
        else:
            assert not down.any() and not up.any() and down.shape[0] == zero_rank
        if record.bias:
            assert torch.equal(ref_unpack_scales(state[f"{name}.bias"], n, 1)[:, 0], source.tensors[record.bias].bfloat16())


def test_unpacked_tensors_rebuild_diffquant_layer(wide_flux, wide_quantized, tmp_path) -> None:
    # Without the activation quantizer both sides are linear maps: diffquant's
    # W = (deq(R) + lora_up lora_down) / s, the kernel's deq(qweight, wscales) / s + proj_up proj_down^T.
    result = wide_quantized("svdquant_w4a4")
    export_checkpoint(result.out, "nunchaku-lite", tmp_path / "n", config=f"{wide_flux}/transformer", dense_unfit=True)
    state = load_file(tmp_path / "n" / "diffusion_pytorch_model.safetensors")
    source = StoredCheckpoint.read(result.out)
    record = next(r for r in source.layers if r.name == "transformer_blocks.0.attn.to_q")
    n, k = record.out_features, record.in_features
    svd = {s: source.tensors[key].float() for s, key in record.svd.tensors.items()}
    ours = (source.dequantized(record).reshape(n, k) + svd["lora_up"] @ svd["lora_down"]) / svd["smooth_factor"]
    codes = ref_unpack_weight(state[f"{record.name}.qweight"]).to(torch.int8)
    codes = torch.where(codes > 7, codes - 16, codes).float()
    scale = ref_unpack_scales(state[f"{record.name}.wscales"], n, k // 64).float().repeat_interleave(64, dim=1)
    smooth = ref_unpack_scales(state[f"{record.name}.smooth_factor"], k, 1)[:, 0].float()
    theirs = codes * scale / smooth + ref_unpack_lowrank(state[f"{record.name}.proj_up"], False).float() @ ref_unpack_lowrank(state[f"{record.name}.proj_down"], True).float()
    # bf16 rounding of the scales, the smoothing and proj_down: each at most 2^-8 relative.
    assert sqnr_db(ours, theirs) > 40.0


def test_awq_packing_on_tiny_flux_unpacks_to_diffquant_codes(quantize_factory, kernels_stub, tmp_path) -> None:
    result = quantize_factory("tiny-flux", "w4a16")
    report = export_checkpoint(result.out, "nunchaku-lite", tmp_path / "n")
    assert report.layers == {"awq_w4a16 int4": len(result.manifest["layers"])}
    assert replaced_by_diffusers(tmp_path / "n", kernels_stub)["mismatch"] == []
    state = load_file(tmp_path / "n" / "diffusion_pytorch_model.safetensors")
    source = StoredCheckpoint.read(result.out)
    for record in source.layers:
        scale = source.stored(record)["weight_scale"]
        assert torch.equal(ref_unpack_awq(state[f"{record.name}.qweight"]), source.int_codes(record).to(torch.int32) + 8)
        assert torch.equal(state[f"{record.name}.wscales"], scale.bfloat16().t())
        assert torch.equal(state[f"{record.name}.wzeros"], (-8 * scale).bfloat16().t())


@pytest.mark.parametrize(("recipe", "message"), [
    ("int8_w8a8", "static input scales.*svdquant_w4a4"),
    ("fp8", "static input scales"),
    ("mxfp4", "mxfp4 weights with 16-bit inputs.*w4a16"),
    ("svdquant_w4a16", "AWQ W4A16 layout has no low-rank branch.*svdquant_w4a4 or w4a16"),
    ("svdquant_w4a4", "off nunchaku's tiles.*dense_unfit"),
    ("w4a4", "scale_rule 'half_span'.*amax / 7.*scale_rule: qmax"),
])
def test_nunchaku_refuses_what_it_cannot_carry(recipe, message, quantize_factory, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(quantize_factory("tiny-flux", recipe).out, "nunchaku-lite", tmp_path / "n")
    assert not (tmp_path / "n" / "diffusion_pytorch_model.safetensors").exists()


def test_nunchaku_refuses_a_model_with_no_layer_on_the_tiles(quantize_factory, tmp_path) -> None:
    with pytest.raises(ConfigError, match="no quantized layer fits"):
        export_checkpoint(quantize_factory("tiny-flux", "svdquant_w4a4").out, "nunchaku-lite", tmp_path / "n", dense_unfit=True)


# ---- nunchaku's single-file Flux layout (--to nunchaku-flux) --------------------------------

# nunchaku's `convert_flux_state_dict` (transformer_flux_v2.py at 49bec14), as data: the module
# renames per block kind, then the tensor renames; this is what the loader applies to the file.
DOUBLE_RENAMES = {"qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj", "out_proj": "attn.to_out.0",
                  "out_proj_context": "attn.to_add_out", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
                  "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2",
                  "norm_q": "attn.norm_q", "norm_k": "attn.norm_k", "norm_added_q": "attn.norm_added_q", "norm_added_k": "attn.norm_added_k"}
SINGLE_RENAMES = {"qkv_proj": "attn.to_qkv", "out_proj": "attn.to_out", "norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}
TENSOR_RENAMES = {"lora_down": "proj_down", "lora_up": "proj_up", "smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig"}


def nunchaku_converted(key: str) -> str:
    parts = key.split(".")
    if parts[0] in ("transformer_blocks", "single_transformer_blocks") and len(parts) > 3:
        renames = SINGLE_RENAMES if parts[0] == "single_transformer_blocks" else DOUBLE_RENAMES
        module, leaf = ".".join(parts[2:-1]), parts[-1]
        return ".".join([*parts[:2], renames.get(module, module), TENSOR_RENAMES.get(leaf, leaf)])
    return key


def nunchaku_v2_parameters(pipeline: str, precision: str = "nvfp4") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The parameters of NunchakuFluxTransformer2DModelV2 (bf16, precision nvfp4 or int4) built on this config:
    diffusers' model with `_patch_model`'s replacements, shaped as SVDQW4A4Linear / AWQW4A16Linear
    allocate them (nunchaku/models/linear.py at 49bec14: rank 32; int4: group 64, wscales in the
    compute dtype, no wtscale / wcscales, which `patch_scale_key` adds only for nvfp4)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(pipeline, subfolder="transformer", torch_dtype=torch.bfloat16)
    bf16 = torch.bfloat16

    def svdq(prefix: str, k: int, n: int) -> dict:
        common = {f"{prefix}.qweight": ((n, k // 2), torch.int8), f"{prefix}.bias": ((n,), bf16), f"{prefix}.smooth_factor": ((k,), bf16),
                  f"{prefix}.smooth_factor_orig": ((k,), bf16), f"{prefix}.proj_down": ((k, 32), bf16), f"{prefix}.proj_up": ((n, 32), bf16)}  # fmt: skip
        if precision == "int4":
            return common | {f"{prefix}.wscales": ((k // 64, n), bf16)}
        return common | {f"{prefix}.wscales": ((k // 16, n), torch.float8_e4m3fn), f"{prefix}.wtscale": ((1,), bf16), f"{prefix}.wcscales": ((n,), bf16)}

    def awq(prefix: str, k: int, n: int) -> dict:
        return {f"{prefix}.qweight": ((n // 4, k // 2), torch.int32), f"{prefix}.bias": ((n,), bf16),
                f"{prefix}.wscales": ((k // 64, n), bf16), f"{prefix}.wzeros": ((k // 64, n), bf16)}  # fmt: skip

    def linear(name: str) -> tuple[int, int]:
        layer = model.get_submodule(name)
        return layer.in_features, layer.out_features

    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if not k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    for i in range(len(model.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        expected.update(svdq(f"{b}.attn.to_qkv", inner, 3 * inner) | svdq(f"{b}.attn.add_qkv_proj", inner, 3 * inner))
        for name in ("attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"):
            expected.update(svdq(f"{b}.{name}", *linear(f"{b}.{name}")))
        for name in ("norm1.linear", "norm1_context.linear"):
            expected.update(awq(f"{b}.{name}", *linear(f"{b}.{name}")))
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            expected[f"{b}.attn.{name}.weight"] = ((model.config.attention_head_dim,), bf16)
    for i in range(len(model.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}"
        mlp = model.single_transformer_blocks[i].mlp_hidden_dim
        expected.update(svdq(f"{b}.attn.to_qkv", inner, 3 * inner) | svdq(f"{b}.mlp_fc1", inner, mlp) | svdq(f"{b}.mlp_fc2", mlp, inner)
                        | svdq(f"{b}.attn.to_out", inner, inner) | awq(f"{b}.norm.linear", *linear(f"{b}.norm.linear")))  # fmt: skip
        for name in ("norm_q", "norm_k"):
            expected[f"{b}.attn.{name}.weight"] = ((model.config.attention_head_dim,), bf16)
    return expected


def export_nunchaku_flux(wide_flux, wide_quantized, tmp_path_factory, recipe: str, precision: str):
    """(quantize result, nunchaku Flux file, export report) of `recipe` on the wide twin."""
    result = wide_quantized(recipe)
    path = tmp_path_factory.mktemp(f"nunchaku-flux-{precision}") / f"flux-svdq-{precision}.safetensors"
    report = export_checkpoint(result.out, "nunchaku-flux", path, config=f"{wide_flux}/transformer")
    return result, path, report


@pytest.fixture(scope="module")
def nunchaku_flux_file(wide_flux, wide_quantized, tmp_path_factory):
    return export_nunchaku_flux(wide_flux, wide_quantized, tmp_path_factory, "svdquant_nvfp4_nunchaku", "nvfp4")


@pytest.fixture(scope="module")
def nunchaku_int4_file(wide_flux, wide_quantized, tmp_path_factory):
    return export_nunchaku_flux(wide_flux, wide_quantized, tmp_path_factory, "svdquant_w4a4_nunchaku", "int4")


# nunchaku/merge_safetensors.py's `quantization_config` per precision (the loader reads `rank`;
# nunchaku's v1 `check_hardware_compatibility` reads weight.dtype).
QUANTIZATION_CONFIG_WEIGHT = {"nvfp4": {"dtype": "fp4_e2m1_all", "group_size": 16, "scale_dtype": [None, "fp8_e4m3_nan"]},
                              "int4": {"dtype": "int4", "group_size": 64, "scale_dtype": None}}


@pytest.mark.parametrize(("precision", "file_fixture"), [("nvfp4", "nunchaku_flux_file"), ("int4", "nunchaku_int4_file")])
def test_nunchaku_flux_file_is_exactly_what_nunchakus_loader_builds(precision, file_fixture, wide_flux, request) -> None:
    from safetensors import safe_open

    _, path, report = request.getfixturevalue(file_fixture)
    with safe_open(str(path), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    converted = {nunchaku_converted(k): v for k, v in state.items()}
    assert len(converted) == len(state)
    expected = nunchaku_v2_parameters(wide_flux, precision)
    assert sorted(set(expected) - set(converted)) == [] and sorted(set(converted) - set(expected)) == []
    assert [(k, tuple(v.shape), v.dtype) for k, v in converted.items() if (tuple(v.shape), v.dtype) != expected[k]] == []
    assert report.layers == {f"svdq_w4a4 {precision}": 12, "awq_w4a16 int4": 3}  # 1 double block (8 SVDQ, 2 AWQ) + 1 single (4, 1)
    config = json.loads(metadata["config"])
    assert config["num_layers"] == 1 and config["_class_name"] == "FluxTransformer2DModel"
    quantization = json.loads(metadata["quantization_config"])
    assert quantization["weight"] == quantization["activation"] | {"scale_dtype": QUANTIZATION_CONFIG_WEIGHT[precision]["scale_dtype"]}
    assert quantization["weight"] == QUANTIZATION_CONFIG_WEIGHT[precision] and quantization["rank"] == 32


def test_nunchaku_flux_packing_unpacks_to_diffquant_codes(nunchaku_flux_file) -> None:
    result, path, _ = nunchaku_flux_file
    state = load_file(path)
    source = StoredCheckpoint.read(result.out)
    records = {r.name: r for r in source.layers}

    def codes(name: str) -> torch.Tensor:
        return unpack_int4(source.stored(records[name])["weight_packed"], signed=False)

    def svd(name: str, suffix: str) -> torch.Tensor:
        return source.tensors[records[name].svd.tensors[suffix]].float()

    # fused q/k/v: the parts stacked along N, sharing smoothing, lora_down and wtscale (share_groups: qkv)
    parts = [f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
    key = "transformer_blocks.0.qkv_proj"
    n, k = 3 * records[parts[0]].out_features, records[parts[0]].in_features
    assert torch.equal(ref_unpack_weight(state[f"{key}.qweight"]), torch.cat([codes(p) for p in parts]))
    block_scales = torch.cat([source.stored(records[p])["weight_scale"].view(torch.uint8) for p in parts])
    assert torch.equal(ref_unpack_micro_scales(state[f"{key}.wscales"].view(torch.uint8), n, k // 16), block_scales)
    assert torch.equal(state[f"{key}.wtscale"], source.stored(records[parts[0]])["weight_scale_2"].reshape(1).bfloat16())
    smooth = svd(parts[0], "smooth_factor")
    assert torch.equal(ref_unpack_scales(state[f"{key}.smooth"], k, 1)[:, 0], smooth.bfloat16())
    assert torch.equal(state[f"{key}.smooth_orig"], state[f"{key}.smooth"])
    assert torch.equal(ref_unpack_lowrank(state[f"{key}.lora_down"], down=True), (svd(parts[0], "lora_down") / smooth).bfloat16())
    assert torch.equal(ref_unpack_lowrank(state[f"{key}.lora_up"], down=False), torch.cat([svd(p, "lora_up") for p in parts]).bfloat16())
    bias = torch.cat([source.tensors[records[p].bias] for p in parts])
    assert torch.equal(ref_unpack_scales(state[f"{key}.bias"], n, 1)[:, 0], bias.bfloat16())

    # the single block's proj_out: out_proj = attention columns (with the bias), mlp_fc2 = MLP columns (zero bias)
    name, inner = "single_transformer_blocks.0.proj_out", 128
    record = records[name]
    n = record.out_features
    for key, cols in (("single_transformer_blocks.0.out_proj", slice(0, inner)), ("single_transformer_blocks.0.mlp_fc2", slice(inner, None))):
        width = codes(name)[:, cols].shape[1]
        assert torch.equal(ref_unpack_weight(state[f"{key}.qweight"]), codes(name)[:, cols])
        blocks = slice(cols.start // 16, None if cols.stop is None else cols.stop // 16)
        assert torch.equal(ref_unpack_micro_scales(state[f"{key}.wscales"].view(torch.uint8), n, width // 16), source.stored(record)["weight_scale"].view(torch.uint8)[:, blocks])
        part_smooth = svd(name, "smooth_factor")[cols]
        assert torch.equal(ref_unpack_lowrank(state[f"{key}.lora_down"], down=True), (svd(name, "lora_down")[:, cols] / part_smooth).bfloat16())
        assert torch.equal(ref_unpack_lowrank(state[f"{key}.lora_up"], down=False), svd(name, "lora_up").bfloat16())
    assert torch.equal(ref_unpack_scales(state["single_transformer_blocks.0.out_proj.bias"], n, 1)[:, 0], source.tensors[record.bias].bfloat16())
    assert not state["single_transformer_blocks.0.mlp_fc2.bias"].any()

    # modulation: AWQ codes with row d * chunks + c holding diffusers' row c * dim + d, and 1 + b in the scale rows
    for name, chunks, scale_chunks in (("transformer_blocks.0.norm1.linear", 6, (1, 4)), ("single_transformer_blocks.0.norm.linear", 3, (1,))):
        record = records[name]
        dim = record.out_features // chunks
        rows = torch.arange(record.out_features)
        diffusers_row = (rows % chunks) * dim + rows // chunks  # file row r = d * chunks + c
        assert torch.equal(ref_unpack_awq(state[f"{name}.qweight"]), source.int_codes(record).to(torch.int32)[diffusers_row] + 8)
        assert torch.equal(state[f"{name}.wscales"], source.stored(record)["weight_scale"][diffusers_row].bfloat16().t())
        b = source.tensors[record.bias].float()[diffusers_row]
        expected = b + torch.isin(rows % chunks, torch.tensor(scale_chunks)).float()
        assert torch.equal(state[f"{name}.bias"], expected.bfloat16())  # one rounding of 1 + b


def signed(nibbles: torch.Tensor) -> torch.Tensor:
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)


def test_nunchaku_flux_int4_packing_unpacks_to_diffquant_codes(nunchaku_int4_file) -> None:
    result, path, _ = nunchaku_int4_file
    state = load_file(path)
    source = StoredCheckpoint.read(result.out)
    records = {r.name: r for r in source.layers}

    def svd(name: str, suffix: str) -> torch.Tensor:
        return source.tensors[records[name].svd.tensors[suffix]].float()

    def check(key: str, parts: list[str], cols: slice = slice(None)) -> None:
        n = sum(records[p].out_features for p in parts)
        codes = torch.cat([unpack_int4(source.stored(records[p])["weight_packed"], signed=True) for p in parts])[:, cols]
        scale = torch.cat([source.stored(records[p])["weight_scale"] for p in parts])
        groups = slice(None if cols.start is None else cols.start // 64, None if cols.stop is None else cols.stop // 64)
        assert torch.equal(signed(ref_unpack_weight(state[f"{key}.qweight"])), codes)
        # scale_dtype: model, so the float32 scales are bfloat16 values: the file holds them bit for bit
        assert torch.equal(ref_unpack_scales(state[f"{key}.wscales"], n, codes.shape[1] // 64).float(), scale[:, groups])
        assert f"{key}.wtscale" not in state and f"{key}.wcscales" not in state
        smooth = svd(parts[0], "smooth_factor")[cols]
        assert torch.equal(ref_unpack_scales(state[f"{key}.smooth"], codes.shape[1], 1)[:, 0], smooth.bfloat16())
        assert torch.equal(ref_unpack_lowrank(state[f"{key}.lora_down"], down=True), (svd(parts[0], "lora_down")[:, cols] / smooth).bfloat16())
        assert torch.equal(ref_unpack_lowrank(state[f"{key}.lora_up"], down=False), torch.cat([svd(p, "lora_up") for p in parts]).bfloat16())

    check("transformer_blocks.0.qkv_proj", [f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")])
    for key, name in (("mlp_fc2", "ff.net.2"), ("mlp_context_fc2", "ff_context.net.2")):
        check(f"transformer_blocks.0.{key}", [f"transformer_blocks.0.{name}"])
        record = records[f"transformer_blocks.0.{name}"]
        assert (record.input["shift"], record.input.get("shift_from", 0)) == (0.171875, 0)
        # the bias diffquant stored is the shift-corrected one; the file carries it unchanged (bf16 both)
        assert torch.equal(ref_unpack_scales(state[f"transformer_blocks.0.{key}.bias"], record.out_features, 1)[:, 0], source.tensors[record.bias])
    name = "single_transformer_blocks.0.proj_out"
    assert records[name].input["shift_from"] == 128  # the MLP columns of cat(attention, mlp)
    check("single_transformer_blocks.0.out_proj", [name], slice(0, 128))
    check("single_transformer_blocks.0.mlp_fc2", [name], slice(128, None))
    assert torch.equal(ref_unpack_scales(state["single_transformer_blocks.0.out_proj.bias"], 128, 1)[:, 0], source.tensors[records[name].bias])
    assert not state["single_transformer_blocks.0.mlp_fc2.bias"].any()


def nunchaku_int4_mlp_fc2(state: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """nunchaku's int4 mlp_fc2 on the GELU output x (bf16 [M, K]) from the file's tensors, as its kernels
    compute it (gemm_w4a4.cuh `EpilogueQuantize`, `quantize_w4a4_from_fpsum_warp<true>`, the W4A4 GEMM):
    a = bf16(x + c); v = bf16(a / smooth); per 64 channels sf = f32(max|v|) * f32(1/15), codes
    q = sat_u4(rni(v * (1 / sf))), the act scale stored as bf16(sf); y = sum_g (q . w_g) act_scale_g
    wscale_g + (x proj_down) proj_up^T + bias, here in float64. Returns y and the intermediates."""
    codes = signed(ref_unpack_weight(state[f"{key}.qweight"])).double()
    n, k = codes.shape
    wscale = ref_unpack_scales(state[f"{key}.wscales"], n, k // 64).double()
    smooth = ref_unpack_scales(state[f"{key}.smooth"], k, 1)[:, 0]
    down = ref_unpack_lowrank(state[f"{key}.lora_down"], down=True).double()
    up = ref_unpack_lowrank(state[f"{key}.lora_up"], down=False).double()
    bias = ref_unpack_scales(state[f"{key}.bias"], n, 1)[:, 0].double()
    a = (x.float() + 0.171875).bfloat16()
    v = (a.float() / smooth.float()).bfloat16().float().reshape(x.shape[0], k // 64, 64)
    sf = v.abs().amax(-1, keepdim=True) * torch.tensor(1 / 15, dtype=torch.float32)
    t = v * (1.0 / sf)
    q = t.round().clamp(0, 15)
    act_scale = sf.bfloat16().double()
    weight = (codes.reshape(n, k // 64, 64) * wscale[..., None]).reshape(n, k)
    u = (q.double() * act_scale).reshape(x.shape[0], k)
    main, branch = u @ weight.T, (x.double() @ down.T) @ up.T
    return {"y": main + branch + bias, "main": main, "branch": branch, "t": t, "q": q, "act_scale": act_scale, "u": u, "weight": weight,
            "smooth": smooth.double(), "down": down, "up": up}  # fmt: skip


def test_int4_mlp_fc2_from_the_file_computes_diffquants_layer(wide_flux, nunchaku_int4_file) -> None:
    from diffusers import FluxTransformer2DModel

    from diffquant import load_quantized

    result, path, _ = nunchaku_int4_file
    state = load_file(path)
    model = FluxTransformer2DModel.from_pretrained(wide_flux, subfolder="transformer", torch_dtype=torch.bfloat16)
    load_quantized(model, result.out, mode="dequant")
    layer = model.get_submodule("transformer_blocks.0.ff.net.2")
    in_memory = result.model.get_submodule("transformer_blocks.0.ff.net.2")
    x = torch.nn.functional.gelu(torch.randn(256, layer.in_features, generator=torch.Generator().manual_seed(0)) * 0.7, approximate="tanh").bfloat16()
    with torch.no_grad():
        y = layer(x).double()
        assert torch.equal(in_memory(x).double(), y)  # the reloaded checkpoint rebuilds the same forward
    ref = nunchaku_int4_mlp_fc2(state, "transformer_blocks.0.mlp_fc2", x)
    # The float paths differ only in rounding; per output n, with bf16's relative step e = 2^-8 (2 x its rounding):
    # - the input: diffquant's v = bf16(bf16(x + c) / s) with s float32, the kernel's with bf16(s): within 1.5 e of
    #   each other, so the group scales within 2 e (with bf16(sf)) and t = v / scale within 3 e t. A code may
    #   differ (by 1) only where a half-integer lies within 3 e t' of t' (`flip`); |u - u'| <= flip a' (1 + 2 e)
    #   + q' a' 2 e + u' e (diffquant rounds u to bf16);
    # - the weights: bf16(code * scale) against code * bf16-exact scale: |w| e / 2;
    # - the branch: x / s and proj_down = bf16(lora_down / s) each rounded once: 1.5 e of sum |x| |down| |up|, h rounded: e;
    # - the outputs of the GEMM, the branch and their sum rounded to bf16: e (|main| + |branch| + |y|).
    # Each relative term is taken 1.25 x (second-order terms), plus 2^-20 absolute in t.
    e, slack = 2.0**-8, 1.25
    t, q, a, u = ref["t"], ref["q"].double(), ref["act_scale"], ref["u"]
    delta = slack * 3 * e * t + 2.0**-20
    flip = (torch.floor(t + 0.5 + delta) != torch.floor(t + 0.5 - delta)).double()
    du = (flip * a * (1 + 2 * e) + q * a * 2 * e * slack).reshape(u.shape) + u * e
    w = ref["weight"].abs()
    h = x.double() @ ref["down"].T
    bound = (du @ w.T + (u @ w.T) * e / 2
             + (slack * 1.5 * e * (x.double().abs() @ ref["down"].abs().T) + e * h.abs()) @ ref["up"].abs().T
             + e * (ref["main"].abs() + ref["branch"].abs() + ref["y"].abs()))  # fmt: skip
    diff = (y - ref["y"]).abs()
    assert torch.all(diff <= bound), float((diff / bound).max())
    # A wrong shift (none, or on the branch too, or after the smoothing) or an uncorrected bias moves every token by
    # an offset independent of x, about c sum_k w_nk / s_k; over 256 tokens the rounding differences average out
    # (measured: 0.5% of that offset's norm), so the mean difference stays far below it.
    offset = 0.171875 * (ref["weight"] / ref["smooth"]).sum(1)
    assert (y - ref["y"]).mean(0).norm() < 0.05 * offset.norm()


def test_nunchaku_lite_refuses_shifted_inputs(wide_quantized, tmp_path) -> None:
    with pytest.raises(ConfigError, match="shifted by 0.171875 onto unsigned int4.*--to nunchaku-flux"):
        export_checkpoint(wide_quantized("svdquant_w4a4_nunchaku").out, "nunchaku-lite", tmp_path / "n", dense_unfit=True)
    assert not (tmp_path / "n" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.parametrize(("recipe", "message"), [
    ("svdquant_w4a4", "ff.net.2 .*unsigned int4 of gelu.x. \\+ 0.171875 from column 0, and this checkpoint's are not shifted.*svdquant_w4a4_nunchaku"),
    ("nvfp4", "modulation linears as AWQ W4A16.*svdquant_nvfp4_nunchaku"),
])
def test_nunchaku_flux_refuses_what_it_cannot_carry(recipe, message, wide_flux, wide_quantized, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        export_checkpoint(wide_quantized(recipe).out, "nunchaku-flux", tmp_path / "x.safetensors", config=f"{wide_flux}/transformer")
    assert not (tmp_path / "x.safetensors").exists()


def test_nunchaku_refuses_int4_inputs_scaled_otherwise_than_its_kernel(wide_quantized, tmp_path) -> None:
    """nunchaku's W4A4 kernel scales activations by amax / 7 at run time: a checkpoint measured
    with amax / 7.5 inputs (`scale_rule: half_span`) would run differently there, so it is refused."""
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "quant" / "svdquant_w4a4.yaml").read_text())
    recipe["name"] = "svdquant_w4a4_half_span_inputs"
    recipe["global"]["input"]["scale_rule"] = "half_span"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="scale_rule 'half_span'.*amax / 7.*scale_rule: qmax"):
        export_checkpoint(wide_quantized(str(path)).out, "nunchaku-lite", tmp_path / "n")
    assert not (tmp_path / "n" / "diffusion_pytorch_model.safetensors").exists()


def test_nunchaku_flux_refuses_int4_shifted_from_another_column(wide_flux, wide_quantized, tmp_path) -> None:
    """A single block's proj_out shifted from column 0 shifts its attention columns too, which nunchaku's
    out_proj reads signed: refused, naming the column nunchaku shifts from."""
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "quant" / "svdquant_w4a4_nunchaku.yaml").read_text())
    recipe["name"] = "svdquant_w4a4_nunchaku_whole_proj_out"
    recipe["names"]["single_transformer_blocks.*.proj_out"] = {"input": {"shift": 0.171875}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="single_transformer_blocks.0.proj_out .*from column 128, and this checkpoint's are shifted by 0.171875 from column 0"):
        export_checkpoint(wide_quantized(str(path)).out, "nunchaku-flux", tmp_path / "x.safetensors", config=f"{wide_flux}/transformer")
    assert not (tmp_path / "x.safetensors").exists()
