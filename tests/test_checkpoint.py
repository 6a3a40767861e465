"""Stage two's checkpoint: bit-exact reload, stored dtypes and layouts, manifest contents, sizes."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from diffquant.artifacts.calibration_reader import CalibrationArtifact
from diffquant.artifacts.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, load_checkpoint_tensors, write_checkpoint
from diffquant.artifacts.checkpoint_records import CheckpointManifest
from diffquant.models.presets import resolve_model
from diffquant.models.submodule import load_submodule
from diffquant.models.tiny import TINY_FAMILIES
from diffquant.paths import CONFIG_DIR
from diffquant.quant.modules import QuantizedLayer
from diffquant.recipes import available_recipes
from diffquant.models.quantized import load_quantized_submodule
from diffquant.eval.measure import submodule_output
from diffquant.stages.quantize import QuantizeSettings, quantize

# Every shipped recipe on tiny-sdxl (float32); the 16-bit families get the recipes whose stored
# tensors differ most (int8 codes, packed int4 with a bf16 low-rank branch, fp8 block scales).
ROUND_TRIPS = [("tiny-sdxl", recipe) for recipe in available_recipes()] + [
    ("tiny-flux", "int8_w8a8"),
    ("tiny-flux", "svdquant_w4a16"),
    ("tiny-flux", "nvfp4"),
    ("tiny-flux", "svdquant_w4a4_nunchaku"),  # shifted unsigned inputs, proj_out's from its MLP columns
    ("tiny-sd3", "int8_w8a8"),
    ("tiny-sd15", "int8_w8a8"),
    ("tiny-sd21", "int8_w8a8"),
    ("tiny-pixart", "int8_w8a8"),
]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality: dtype, shape and every byte (so -0.0 != 0.0 and NaN == NaN bitwise)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().contiguous().reshape(-1).view(torch.uint8), b.detach().cpu().contiguous().reshape(-1).view(torch.uint8))


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(parsed JSON header, offset of the data section) of a safetensors file."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length)), 8 + length


def first_calibration_index(calib: Path, manifest: dict) -> int:
    artifact = CalibrationArtifact(calib)
    held_out = set(manifest["calibration"]["holdout_sample_ids"])
    return next(i for i, record in enumerate(artifact.records) if record.id not in held_out)


def test_round_trips_cover_every_recipe_and_every_tiny_family() -> None:
    assert {recipe for model, recipe in ROUND_TRIPS if model == "tiny-sdxl"} == {p.stem for p in (CONFIG_DIR / "quant").glob("*.yaml")}
    assert {model for model, _ in ROUND_TRIPS} == {f"tiny-{family}" for family in TINY_FAMILIES}


@pytest.mark.parametrize(("model", "recipe"), ROUND_TRIPS, ids=[f"{m}-{r}" for m, r in ROUND_TRIPS])
def test_reloaded_checkpoint_is_bit_identical_to_the_in_memory_model(model: str, recipe: str, quantize_factory, private_calib) -> None:
    result = quantize_factory(model, recipe)
    rebuilt, manifest = load_quantized_submodule(result.out)

    # Every stored tensor reloads with its dtype and bytes, and the rebuilt module holds exactly them.
    stored = load_checkpoint_tensors(result.out)
    in_memory = result.model.state_dict()
    assert stored.keys() == in_memory.keys()
    assert [name for name in stored if not same_bytes(stored[name], in_memory[name])] == []
    rebuilt_state = rebuilt.state_dict()
    assert rebuilt_state.keys() == stored.keys()
    assert [name for name in stored if not same_bytes(rebuilt_state[name], stored[name])] == []
    assert {n for n, m in rebuilt.named_modules() if isinstance(m, QuantizedLayer)} == {record.name for record in manifest.layers}

    # Same numbers out, on a calibration sample.
    artifact = CalibrationArtifact(private_calib(model))
    sample = artifact.sample(first_calibration_index(private_calib(model), result.manifest))
    with torch.inference_mode():
        expected = submodule_output(result.model(**sample))
        got = submodule_output(rebuilt(**sample))
    assert got.dtype == expected.dtype == getattr(torch, manifest.model["torch_dtype"])
    assert same_bytes(got, expected)


# Stored tensors of every quantized layer per recipe: suffix -> (dtype, shape from (out, K)), with
# K = in_features (Linear) or in_channels/groups * kh * kw (Conv2d). Codes are kept as [out, K].
LAYOUTS = {
    "int8_w8a8": {"weight": (torch.int8, lambda o, k: (o, k)), "weight_scale": (torch.float32, lambda o, k: ()),
                  "input_scale": (torch.float32, lambda o, k: ())},
    "int8_weight_only": {"weight": (torch.int8, lambda o, k: (o, k)), "weight_scale": (torch.float32, lambda o, k: ())},
    "fp8": {"weight": (torch.float8_e4m3fn, lambda o, k: (o, k)), "weight_scale": (torch.float32, lambda o, k: ()),
            "input_scale": (torch.float32, lambda o, k: ())},
    "w4a16": {"weight_packed": (torch.uint8, lambda o, k: (o, k // 2)), "weight_scale": (torch.float32, lambda o, k: (o, k // 64))},
    "mxfp4": {"weight_packed": (torch.uint8, lambda o, k: (o, k // 2)), "weight_scale": (torch.uint8, lambda o, k: (o, k // 32))},
    "nvfp4": {"weight_packed": (torch.uint8, lambda o, k: (o, k // 2)), "weight_scale": (torch.float8_e4m3fn, lambda o, k: (o, k // 16)),
              "weight_scale_2": (torch.float32, lambda o, k: ())},
}


@pytest.mark.parametrize("recipe", sorted(LAYOUTS))
def test_stored_dtypes_and_shapes_follow_the_format(recipe: str, quantize_factory) -> None:
    result = quantize_factory("tiny-sdxl", recipe)
    layout = LAYOUTS[recipe]
    with safe_open(str(result.out / WEIGHTS_NAME), framework="pt") as handle:
        keys = set(handle.keys())
        for layer in result.manifest["layers"]:
            out, k = layer["shape"][0], math.prod(layer["shape"][1:])
            own = {key.removeprefix(layer["name"] + ".") for key in keys if key.rpartition(".")[0] == layer["name"]}
            assert own == set(layout) | ({"bias"} if layer["bias"] else set()), layer["name"]
            for suffix, (dtype, shape) in layout.items():
                tensor = handle.get_tensor(f"{layer['name']}.{suffix}")
                assert (tensor.dtype, tuple(tensor.shape)) == (dtype, shape(out, k)), f"{layer['name']}.{suffix}"
            if layer["bias"]:
                assert handle.get_tensor(layer["bias"]).dtype == torch.float32


def test_conv_layers_that_do_not_fit_the_group_are_skipped_with_the_reason(quantize_factory) -> None:
    manifest = quantize_factory("tiny-sdxl", "w4a16").manifest
    model = load_submodule(resolve_model("tiny-sdxl"))
    quantized = {layer["name"] for layer in manifest["layers"]}
    reasons = {s["name"]: s["reason"] for s in manifest["skipped"]}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and not name.startswith(("conv_in", "conv_out")):
            k = module.weight.shape[1:].numel()
            if k % 64:
                assert reasons[name] == f"input size {k} is not a multiple of weight group size 64"
            else:
                assert name in quantized


def test_asymmetric_specs_store_zero_points_from_the_observed_range(tmp_path: Path, private_calib) -> None:
    recipe = tmp_path / "asym.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "asym",
        "global": {"weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": False},
                   "input": {"dtype": "uint8", "symmetric": False, "observer": "min_max"}},
        "layer_types": {"Conv2d": {"weight": {"dtype": "uint8"}}},
    }))
    result = quantize(QuantizeSettings(calib=private_calib("tiny-sdxl"), recipe=str(recipe), out=tmp_path / "q", device="cpu", holdout=2), show_progress=False)
    original = dict(load_submodule(resolve_model("tiny-sdxl")).named_modules())
    stored = load_checkpoint_tensors(result.out)
    assert {layer["type"] for layer in result.manifest["layers"]} == {"Linear", "Conv2d"}
    for layer in result.manifest["layers"]:
        name, out = layer["name"], layer["shape"][0]
        # Input: uint8, scale = (max(hi, 0) - min(lo, 0)) / 255, zp = clamp(-round(lo / scale), 0, 255).
        lo, hi = (torch.tensor(v, dtype=torch.float32) for v in layer["input_range"])
        scale = (hi.clamp(min=0) - lo.clamp(max=0)) / 255
        zero_point = torch.clamp(-torch.round(lo.clamp(max=0) / scale), 0, 255)
        assert same_bytes(stored[f"{name}.input_scale"], scale)
        assert same_bytes(stored[f"{name}.input_zero_point"], zero_point.to(torch.uint8))
        assert layer["input_tensors"] == {"input_scale": f"{name}.input_scale", "input_zero_point": f"{name}.input_zero_point"}
        # Weight: int8 per output channel (Linear) or uint8 per tensor (Conv2d), zero point stored.
        w = original[name].weight.detach().float().reshape(out, -1)
        if layer["type"] == "Linear":
            qmin, qmax, dtype = -128, 127, torch.int8
            wlo, whi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        else:
            qmin, qmax, dtype = 0, 255, torch.uint8
            wlo, whi = w.amin(), w.amax()
        wscale = (whi.clamp(min=0) - wlo.clamp(max=0)) / (qmax - qmin)
        wzp = torch.clamp(qmin - torch.round(wlo.clamp(max=0) / wscale), qmin, qmax)
        assert same_bytes(stored[f"{name}.weight_scale"], wscale), name
        assert same_bytes(stored[f"{name}.weight_zero_point"], wzp.to(dtype)), name
        assert stored[f"{name}.weight"].dtype == dtype


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux", "tiny-sd3"])
def test_unquantized_tensors_keep_their_names_dtypes_and_values(model: str, quantize_factory) -> None:
    result = quantize_factory(model, "int8_w8a8")
    original = load_submodule(resolve_model(model)).state_dict()
    stored = load_checkpoint_tensors(result.out)
    layers = {layer["name"]: layer for layer in result.manifest["layers"]}
    quantized_names = {f"{n}.{s}" for n, layer in layers.items() for s in [*layer["tensors"], *layer["input_tensors"]]}
    kept = {name for name in original if name.rpartition(".")[0] not in layers}
    assert kept, "some parameters are never quantized (the preset excludes)"
    assert set(stored) == kept | quantized_names | {layer["bias"] for layer in layers.values() if layer["bias"]}
    assert [name for name in kept if not same_bytes(stored[name], original[name])] == []
    assert [layer["bias"] for layer in layers.values() if layer["bias"] and not same_bytes(stored[layer["bias"]], original[layer["bias"]])] == []


def test_manifest_describes_every_quantized_layer(quantize_factory, private_calib) -> None:
    result = quantize_factory("tiny-sdxl", "int8_w8a8")
    manifest = json.loads((result.out / MANIFEST_NAME).read_text())
    original = dict(load_submodule(resolve_model("tiny-sdxl")).named_modules())
    recipe_source = yaml.safe_load((CONFIG_DIR / "quant" / "int8_w8a8.yaml").read_text())
    stored = load_checkpoint_tensors(result.out)

    quantized = {n for n, m in result.model.named_modules() if isinstance(m, QuantizedLayer)}
    names = [layer["name"] for layer in manifest["layers"]]
    skipped = [s["name"] for s in manifest["skipped"]]
    assert set(names) == quantized and len(names) == len(quantized)
    assert sorted(names + skipped) == sorted(n for n, m in original.items() if type(m) in (torch.nn.Linear, torch.nn.Conv2d))

    for layer in manifest["layers"]:
        name, module = layer["name"], original[layer["name"]]
        assert layer["type"] == type(module).__name__
        assert layer["shape"] == list(module.weight.shape)
        assert (layer["weight_format"], layer["granularity"], layer["observer"]) == ("int8", "per_tensor", "min_max")
        # `scale_dtype: model` is recorded resolved: this float32 model keeps float32 scales (no key).
        as_recorded = {side: {k: v for k, v in recipe_source["global"][side].items() if k != "scale_dtype"} for side in ("weight", "input")}
        assert recipe_source["global"]["weight"]["scale_dtype"] == "model" and module.weight.dtype == torch.float32
        assert layer["weight"] == {**as_recorded["weight"], "group_size": None, "rounding": "half_even", "dynamic": False, "percentile": 99.99}
        assert layer["input"] == {**as_recorded["input"], "group_size": None, "rounding": "half_even", "percentile": 99.99}
        assert layer["tensors"] == {"weight": f"{name}.weight", "weight_scale": f"{name}.weight_scale"}
        assert layer["input_tensors"] == {"input_scale": f"{name}.input_scale"}
        assert set(layer["tensors"].values()) | set(layer["input_tensors"].values()) <= set(stored)
        # The frozen input scale is the module's buffer and the stored tensor, and is amax / 127.5
        # (half_span) of the symmetric range the min_max observer saw.
        buffer = result.model.get_submodule(name).input_scale
        assert same_bytes(torch.tensor(layer["input_params"]["input_scale"], dtype=torch.float32), buffer)
        assert same_bytes(stored[f"{name}.input_scale"], buffer)
        lo, hi = layer["input_range"]
        assert lo == -hi
        assert same_bytes(buffer, torch.tensor(hi, dtype=torch.float32) / 127.5)
        quality = layer["quality"]
        assert math.isfinite(quality["weight_sqnr_db"]) and math.isfinite(quality["output_sqnr_db"])

    assert manifest["recipe"] == recipe_source
    assert manifest["quantization_config"]["recipe"] == "int8_w8a8"
    assert manifest["model"]["source"] == "tiny://sdxl" and manifest["model"]["name"] == "tiny-sdxl"
    calib_manifest = json.loads((private_calib("tiny-sdxl") / "manifest.json").read_text())
    canonical = json.dumps(calib_manifest, sort_keys=True, separators=(",", ":")).encode()
    assert manifest["calibration"]["manifest_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert manifest["calibration"]["settings_sha256"] == calib_manifest["settings_sha256"]
    weights = result.out / WEIGHTS_NAME
    assert manifest["files"][WEIGHTS_NAME] == {"bytes": weights.stat().st_size, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


def test_min_max_input_range_is_the_exact_extreme_of_the_calibration_inputs(quantize_factory, private_calib) -> None:
    result = quantize_factory("tiny-sdxl", "int8_w8a8")
    model = load_submodule(resolve_model("tiny-sdxl"))
    artifact = CalibrationArtifact(private_calib("tiny-sdxl"))
    held_out = set(result.manifest["calibration"]["holdout_sample_ids"])
    amax: dict[str, float] = {}

    def hook(name):
        def record(module, args):
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
        return record

    handles = [model.get_submodule(layer["name"]).register_forward_pre_hook(hook(layer["name"])) for layer in result.manifest["layers"]]
    with torch.inference_mode():
        for index, record in enumerate(artifact.records):
            if record.id not in held_out:
                model(**artifact.sample(index))
    for handle in handles:
        handle.remove()
    assert {layer["name"]: layer["input_range"][1] for layer in result.manifest["layers"]} == amax


def test_int8_checkpoint_stores_one_byte_per_quantized_weight(quantize_factory) -> None:
    result = quantize_factory("tiny-sdxl", "int8_w8a8")
    weights = result.out / WEIGHTS_NAME
    header, data_start = safetensors_header(weights)
    original = load_submodule(resolve_model("tiny-sdxl"))
    layers = {layer["name"]: layer for layer in result.manifest["layers"]}

    def nbytes(name: str) -> int:
        start, end = header[name]["data_offsets"]
        return end - start

    expected_data = 0
    for name, param in original.named_parameters():
        owner, _, suffix = name.rpartition(".")
        if owner in layers and suffix == "weight":
            entry = header[f"{owner}.weight"]
            assert entry["dtype"] == "I8" and nbytes(f"{owner}.weight") == param.numel()
            expected_data += param.numel() + 4 + 4  # int8 codes, float32 weight_scale and input_scale
        else:
            assert nbytes(name) == param.numel() * 4  # float32, unquantized (bias included)
            expected_data += param.numel() * 4
    assert weights.stat().st_size == data_start + expected_data

    numel = sum(p.numel() for p in original.parameters())
    sizes = result.manifest["sizes"]
    assert weights.stat().st_size < 4 * numel  # smaller than the float32 original
    assert sizes["checkpoint_bytes"] == weights.stat().st_size
    assert sizes["fp16_bytes"] == 2 * numel
    assert sizes["ratio_vs_fp16"] == weights.stat().st_size / (2 * numel)


def _tiny_checkpoint_inputs() -> tuple[dict[str, torch.Tensor], CheckpointManifest]:
    state = {"layer.weight": torch.arange(6, dtype=torch.int8).reshape(2, 3), "layer.weight_scale": torch.tensor(0.5)}
    manifest = CheckpointManifest(diffquant_version="0", quantization_config={"recipe": "x"}, recipe={},
                                  model={"name": "m", "torch_dtype": "float32", "target": "unet"},
                                  calibration={"manifest_sha256": "0" * 64}, layers=(), skipped=(), quality={}, sizes={"fp16_bytes": 12})
    return state, manifest


def test_writing_the_same_checkpoint_twice_gives_identical_bytes(tmp_path: Path) -> None:
    digests = set()
    for attempt in range(6):
        state, manifest = _tiny_checkpoint_inputs()
        out = tmp_path / str(attempt)
        out.mkdir()
        write_checkpoint(out, state, manifest)
        digests.add(hashlib.sha256((out / WEIGHTS_NAME).read_bytes()).hexdigest())
    assert len(digests) == 1


def test_written_checkpoint_records_its_size_and_hash(tmp_path: Path) -> None:
    state, manifest = _tiny_checkpoint_inputs()
    written = write_checkpoint(tmp_path, state, manifest)
    weights = tmp_path / WEIGHTS_NAME
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == written.to_json()
    assert written.sizes == {"fp16_bytes": 12, "checkpoint_bytes": weights.stat().st_size, "ratio_vs_fp16": weights.stat().st_size / 12}
    assert written.files[WEIGHTS_NAME]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not list(tmp_path.glob("*.partial"))
    reloaded = load_checkpoint_tensors(tmp_path)
    assert all(same_bytes(reloaded[name], state[name]) for name in state) and reloaded.keys() == state.keys()
