"""Tiny offline pipelines, their presets, and the loader that reads them back.

Every tiny family is built once per module into a temporary cache (never ~/.cache), loaded
through `load_pipeline` (the same from_pretrained path a hub id takes) and run at 64 px.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from diffquant.errors import ConfigError
from diffquant.models import tiny
from diffquant.models.loading import get_target, load_pipeline, seeded_generator
from diffquant.models.presets import ModelPreset, available_presets, load_preset, resolve_model
from diffquant.models.tiny import (
    BUILDER_VERSION,
    COMPLETE_MARKER,
    TINY_FAMILIES,
    build_tiny_pipeline,
    tiny_pipeline_dir,
)
from diffquant.paths import CONFIG_DIR

PROMPT = "A golden retriever playing in autumn leaves"
REAL_PRESETS = ("sdxl", "sd15", "sd21", "sd3", "flux", "pixart")
EXPECTED_DTYPES = {
    "sdxl": torch.float32,
    "sd15": torch.float32,
    "sd21": torch.float32,
    "sd3": torch.float16,
    "flux": torch.bfloat16,
    "pixart": torch.float32,
}
# Module names the family's exclude patterns are written against (as in the released models).
EXPECTED_MODULE_PATTERNS = {
    "sdxl": ("*add_embedding*", "*time_embedding*", "conv_in", "conv_out"),
    "sd15": ("*time_embedding*", "conv_in", "conv_out", "*attentions.0.proj_in"),
    "sd21": ("*time_embedding*", "conv_in", "conv_out", "*attentions.0.proj_in"),
    "sd3": ("*pos_embed*", "*time_text_embed*", "*context_embedder*", "norm_out.linear"),
    "flux": ("*x_embedder*", "*norm1.linear*", "*norm1_context.linear*", "*context_embedder*"),
    "pixart": ("*adaln_single*", "*caption_projection*", "pos_embed.proj", "proj_out"),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded: the tiny models gain nothing from threads, and on a small CPU
    shared with other processes the intra-op pool's spin-waiting made each image ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """DIFFQUANT_CACHE pointed at a per-module temp dir for every test in this module."""
    cache = tmp_path_factory.mktemp("tiny-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFQUANT_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def loaded(tiny_cache: Path) -> dict[str, object]:
    """Each tiny preset's pipeline, built into the temp cache and loaded by load_pipeline."""
    return {family: load_pipeline(resolve_model(f"tiny-{family}")) for family in TINY_FAMILIES}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_preset_loads_and_generates_a_64px_image(family: str, loaded: dict) -> None:
    preset = resolve_model(f"tiny-{family}")
    pipe = loaded[family]
    assert type(pipe).__name__ == preset.pipeline_class
    assert get_target(pipe, preset).dtype == EXPECTED_DTYPES[family]

    image = pipe(
        PROMPT,
        num_inference_steps=preset.steps,
        generator=seeded_generator(0, 0, "cpu"),
        **preset.pipeline_kwargs,
    ).images[0]

    assert image.size == (64, 64)
    low, high = zip(*image.getextrema())
    assert max(high) - min(low) > 16, "the image is (nearly) one colour"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_same_seed_and_prompt_index_give_the_same_image(family: str, loaded: dict) -> None:
    preset = resolve_model(f"tiny-{family}")
    pipe = loaded[family]

    def generate(prompt_index: int) -> bytes:
        generator = seeded_generator(5, prompt_index, "cpu")
        kwargs = dict(num_inference_steps=2, generator=generator, **preset.pipeline_kwargs)
        return pipe(PROMPT, **kwargs).images[0].tobytes()

    first = generate(1)
    assert generate(1) == first
    assert generate(2) != first


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_two_builds_are_bit_identical(family: str) -> None:
    torch.manual_seed(1234)
    first = build_tiny_pipeline(family)
    torch.rand(3)  # builds must not depend on the caller's RNG state
    second = build_tiny_pipeline(family)

    for name, component in first.components.items():
        if isinstance(component, torch.nn.Module):
            a, b = component.state_dict(), second.components[name].state_dict()
            assert a.keys() == b.keys()
            assert all(torch.equal(a[key], b[key]) for key in a), name


def test_building_leaves_the_global_rng_untouched() -> None:
    torch.manual_seed(99)
    expected = torch.rand(4)
    torch.manual_seed(99)
    build_tiny_pipeline("pixart")
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_target_module_names_match_the_real_exclude_patterns(family: str, loaded: dict) -> None:
    preset = resolve_model(f"tiny-{family}")
    names = [name for name, _ in get_target(loaded[family], preset).named_modules()]

    for pattern in (*preset.quant_exclude, *preset.svd_exclude, *EXPECTED_MODULE_PATTERNS[family]):
        assert fnmatch.filter(names, pattern), f"{pattern} matches no module of tiny-{family}"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_target_linears_have_inputs_divisible_by_64(family: str, loaded: dict) -> None:
    target = get_target(loaded[family], resolve_model(f"tiny-{family}"))
    linears = {
        name: module.in_features
        for name, module in target.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    assert linears
    assert {n: k for n, k in linears.items() if k % 64} == {}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_preset_mirrors_the_real_preset(family: str) -> None:
    tiny, real = resolve_model(f"tiny-{family}"), resolve_model(family)
    assert tiny.source == f"tiny://{family}"
    assert (tiny.family, tiny.pipeline_class, tiny.target) == (
        real.family,
        real.pipeline_class,
        real.target,
    )
    assert (tiny.quant_exclude, tiny.svd_exclude) == (real.quant_exclude, real.svd_exclude)
    assert tiny.pipeline_kwargs["height"] == tiny.pipeline_kwargs["width"] == 64


def test_all_twelve_presets_load() -> None:
    names = {*REAL_PRESETS, *(f"tiny-{family}" for family in TINY_FAMILIES)}
    assert names <= set(available_presets())
    for name in names:
        preset = load_preset(CONFIG_DIR / "models" / f"{name}.yaml")
        assert preset.name == name
        assert preset.target in ("unet", "transformer")
        assert preset.quant_exclude and preset.svd_exclude


def test_tokenizers_load_from_hub_layout_and_cover_real_prompts(loaded: dict) -> None:
    for family, pipe in loaded.items():
        in_memory = build_tiny_pipeline(family)
        for name, tokenizer in pipe.components.items():
            if not name.startswith("tokenizer"):
                continue
            ids = tokenizer(PROMPT).input_ids
            assert ids == in_memory.components[name](PROMPT).input_ids, (family, name)
            encoder = pipe.components[name.replace("tokenizer", "text_encoder")]
            assert max(ids) < encoder.config.vocab_size
            tokens = tokenizer.convert_ids_to_tokens(ids)
            if type(tokenizer).__name__ == "CLIPTokenizer":
                assert tokenizer.model_max_length == 77
                assert tokens[:3] == ["<|startoftext|>", "a</w>", "golden</w>"]
                # Saved like the hub repos (vocab.json + merges.txt), and loaded from those files.
                assert (tiny_pipeline_dir(family) / name / "merges.txt").is_file()
                assert not (tiny_pipeline_dir(family) / name / "tokenizer.json").exists()
            else:
                assert tokenizer.unk_token_id not in ids
                assert tokens[:2] == ["▁A", "▁golden"]


def test_build_is_cached_and_marked_complete(tiny_cache: Path) -> None:
    path = tiny_pipeline_dir("sd15")
    assert path == tiny_cache / f"sd15-v{BUILDER_VERSION}"
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    assert marker == {"family": "sd15", "builder_version": BUILDER_VERSION}
    mtime = (path / "model_index.json").stat().st_mtime_ns
    assert tiny_pipeline_dir("sd15") == path
    assert (path / "model_index.json").stat().st_mtime_ns == mtime
    assert not [p for p in tiny_cache.iterdir() if p.name.startswith(".")]


def test_a_killed_build_is_rebuilt(tmp_path: Path) -> None:
    half_built = tmp_path / f"pixart-v{BUILDER_VERSION}"
    (half_built / "transformer").mkdir(parents=True)
    (half_built / "model_index.json").write_text("{}")

    path = tiny_pipeline_dir("pixart", cache=tmp_path)

    assert path == half_built
    assert (path / COMPLETE_MARKER).is_file()
    assert (path / "transformer" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [half_built.name]


def test_a_build_that_loses_the_race_keeps_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = tiny.build_tiny_pipeline
    winner: dict[str, int] = {}

    def build_while_a_competitor_finishes_first(family: str) -> object:
        if "started" not in winner:
            winner["started"] = 1
            index = tiny.tiny_pipeline_dir(family, cache=tmp_path) / "model_index.json"
            winner["mtime"] = index.stat().st_mtime_ns
        return real_build(family)

    monkeypatch.setattr(tiny, "build_tiny_pipeline", build_while_a_competitor_finishes_first)
    path = tiny.tiny_pipeline_dir("pixart", cache=tmp_path)

    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert (path / COMPLETE_MARKER).is_file()
    assert (path / "model_index.json").stat().st_mtime_ns == winner["mtime"]


def test_unknown_family_lists_the_families(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sdxl, sd15, sd21, sd3, flux, pixart"):
        tiny_pipeline_dir("sd9", cache=tmp_path)
    with pytest.raises(ConfigError, match="unknown tiny model family"):
        build_tiny_pipeline("sd9")


def test_missing_target_lists_the_pipeline_modules(loaded: dict) -> None:
    preset = dataclasses.replace(resolve_model("tiny-sd3"), target="unet")
    with pytest.raises(ConfigError, match="no submodule 'unet'.*text_encoder_3.*transformer.*vae"):
        get_target(loaded["sd3"], preset)


def test_loader_failures_are_one_line_config_errors(tmp_path: Path) -> None:
    base = resolve_model("tiny-sd15")
    missing = dataclasses.replace(base, source=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_pipeline(missing)

    not_a_pipeline = dataclasses.replace(base, source=str(tmp_path))
    with pytest.raises(ConfigError, match="no model_index.json"):
        load_pipeline(not_a_pipeline)

    wrong_class = dataclasses.replace(base, pipeline_class="NoSuchPipeline")
    with pytest.raises(ConfigError, match="no pipeline class 'NoSuchPipeline'"):
        load_pipeline(wrong_class)

    with pytest.raises(ConfigError, match="torch_dtype 'float64'"):
        load_pipeline(base, torch_dtype="float64")

    with pytest.raises(ConfigError, match="cannot move model 'tiny-sd15' to device 'nodevice'"):
        load_pipeline(base, device="nodevice")


def test_broken_local_pipeline_names_source_and_fix(tiny_cache: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((tiny_pipeline_dir("sd15") / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(index))
    preset = ModelPreset(
        name="broken",
        family="sd15",
        source=str(broken),
        pipeline_class="StableDiffusionPipeline",
        torch_dtype="float32",
        target="unet",
        steps=1,
    )
    with pytest.raises(ConfigError) as error:
        load_pipeline(preset)
    message = error.value.message
    assert "\n" not in message
    assert str(broken) in message and "save_pretrained" in message


def test_seeded_generator_depends_only_on_seed_and_prompt_index() -> None:
    def draw(seed: int, index: int) -> torch.Tensor:
        return torch.randn(4, generator=seeded_generator(seed, index, "cpu"))

    assert torch.equal(draw(3, 7), draw(3, 7))
    assert not torch.equal(draw(3, 7), draw(3, 8))
    assert not torch.equal(draw(3, 7), draw(4, 7))
    assert seeded_generator(3, 7, "cpu").initial_seed() == 3 * 1_000_003 + 7
    with pytest.raises(ConfigError):
        seeded_generator(-1, 0, "cpu")


def test_a_preset_file_with_yaml_aliases_or_too_large_is_refused_in_one_line(tmp_path: Path) -> None:
    """Presets are read like recipes: a YAML alias bomb or an oversized file is one line, not a hang."""
    from diffquant.errors import ConfigError
    from diffquant.models.presets import load_preset

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["x", "x"]\nb: &b [*a, *a]\nsource: x\n')
    with pytest.raises(ConfigError, match=r"YAML alias \*a at line 2 is not allowed") as excinfo:
        load_preset(bomb)
    assert "\n" not in str(excinfo.value)
    large = tmp_path / "large.yaml"
    large.write_text("description: " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="bytes, more than the"):
        load_preset(large)
