"""Tiny, randomly initialised pipelines of the real diffusers classes, built offline.

Each family (`sdxl`, `sd15`, `sd21`, `sd3`, `flux`, `pixart`) is the real pipeline class with the
real component classes, shrunk to a few MB: same module names as the released checkpoints (so the
family's exclude patterns match), widths that are multiples of 64 along every `nn.Linear` input of
the denoiser (so per-group quantizers with group 16/32/64 apply), and the real schedulers. Nothing
is downloaded: weights come from `torch.manual_seed`, tokenizers from a vocabulary generated here.

The built pipeline is saved with `save_pretrained`, so the project loads it with the same
`from_pretrained` call a hub id takes.

Example:
    >>> from diffusers import StableDiffusionXLPipeline
    >>> path = tiny_pipeline_dir("sdxl")            # built on first use, then cached
    >>> pipe = StableDiffusionXLPipeline.from_pretrained(path)
    >>> pipe("a cat", height=64, width=64, num_inference_steps=2).images[0].size
    (64, 64)
"""

from __future__ import annotations

import functools
import heapq
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffquant.errors import ConfigError
from diffquant.paths import tiny_model_cache

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5Tokenizer,
    )

TINY_FAMILIES: tuple[str, ...] = ("sdxl", "sd15", "sd21", "sd3", "flux", "pixart")
# Bump when any config, seed or tokenizer below changes: the cache directory name carries it, so
# a stale build is never reused.
BUILDER_VERSION = 1
COMPLETE_MARKER = ".complete"
# Leftover temp dirs from killed builds older than this are removed by the next build.
_STALE_TMP_SECONDS = 3600.0
# Builders seed torch's global RNG; two threads building at once would interleave their draws.
_BUILD_LOCK = threading.Lock()


def tiny_pipeline_dir(family: str, cache: Path | None = None) -> Path:
    """Return the directory of the built tiny pipeline, building it on first use (save_pretrained).

    The directory is `<cache>/<family>-v<BUILDER_VERSION>` with `cache` defaulting to
    `diffquant.paths.tiny_model_cache()`. A build is written into a temp dir beside it, marked
    with `.complete`, and renamed into place, so a killed or concurrent build never leaves a
    directory that looks complete; when two builds race, the first rename wins.

    Example:
        >>> tiny_pipeline_dir("flux").name
        'flux-v1'
    """
    _check_family(family)
    root = Path(cache) if cache is not None else tiny_model_cache()
    final = root / f"{family}-v{BUILDER_VERSION}"
    if (final / COMPLETE_MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(root, final.name)
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        pipe = build_tiny_pipeline(family)
        with quiet_progress_bars():
            pipe.save_pretrained(tmp, safe_serialization=True)
        _write_clip_tokenizers_in_hub_layout(pipe, tmp)
        marker = {"family": family, "builder_version": BUILDER_VERSION}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        _move_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_pipeline(family: str) -> DiffusionPipeline:
    """Build the tiny pipeline of one family in memory, float32 on the CPU.

    Deterministic: every component is seeded on its own, so two builds have bit-identical
    weights regardless of what ran before; the caller's global torch RNG state is left as it was.

    Example:
        >>> type(build_tiny_pipeline("sd3")).__name__
        'StableDiffusion3Pipeline'
    """
    _check_family(family)
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        pipe = _BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide diffusers' and transformers' loader/saver progress bars inside the block.

    For the tiny pipelines they finish in milliseconds and only clutter the output; the previous
    setting is restored on exit.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    modules = (diffusers_logging, transformers_logging)
    enabled = [module.is_progress_bar_enabled() for module in modules]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was_enabled in zip(modules, enabled):
            if was_enabled:
                module.enable_progress_bar()


def _check_family(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise ConfigError(
            f"unknown tiny model family {family!r}",
            f"use one of {', '.join(TINY_FAMILIES)} (as tiny://<family>)",
        )


# --------------------------------------------------------------------------- families


def _build_sdxl() -> DiffusionPipeline:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    # CLIP-L (768) + OpenCLIP-bigG (1280) become 32 + 32: their concatenation is the UNet's
    # cross-attention width (64), and 6 time ids x 16 + pooled 32 = 128 feed add_embedding.
    text_encoder = _clip_text_encoder(hidden_size=32, hidden_act="quick_gelu", seed=1)
    text_encoder_2 = _clip_text_encoder(
        hidden_size=32, hidden_act="gelu", seed=2, with_projection=True
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 2),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=6 * 16 + 32,
        norm_num_groups=32,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(latent_channels=4, scaling_factor=0.13025, seed=3),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_clip_tokenizer(pad_token="<|endoftext|>"),
        # OpenCLIP tokenizers pad with "!" (id 0), as in the released SDXL tokenizer_2.
        tokenizer_2=_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            interpolation_type="linear",
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )


def _build_sd15() -> DiffusionPipeline:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=_vae(latent_channels=4, scaling_factor=0.18215, seed=3),
        text_encoder=_clip_text_encoder(hidden_size=64, hidden_act="quick_gelu", seed=1),
        tokenizer=_clip_tokenizer(pad_token="<|endoftext|>"),
        # SD 1.x: conv proj_in/proj_out in the transformers, one head count for all levels.
        unet=_sd_unet(attention_head_dim=2, use_linear_projection=False, upcast_attention=False),
        scheduler=PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sd21() -> DiffusionPipeline:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=_vae(latent_channels=4, scaling_factor=0.18215, seed=3),
        # OpenCLIP-H text tower: gelu, not CLIP-L's quick_gelu.
        text_encoder=_clip_text_encoder(hidden_size=64, hidden_act="gelu", seed=1),
        tokenizer=_clip_tokenizer(pad_token="!"),
        # SD 2.x: linear proj_in/proj_out, per-level head widths, upcast attention (2.1-v).
        unet=_sd_unet(attention_head_dim=(2, 2), use_linear_projection=True, upcast_attention=True),
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sd3() -> DiffusionPipeline:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    # Two CLIPs of 32 concatenate to the T5 width (64) = joint_attention_dim, and their pooled
    # projections concatenate to pooled_projection_dim (64), as 768 + 1280 -> 4096 / 2048 in SD3.
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, seed=3, flow=True),
        text_encoder=_clip_text_encoder(
            hidden_size=32, hidden_act="quick_gelu", seed=1, with_projection=True
        ),
        tokenizer=_clip_tokenizer(pad_token="<|endoftext|>"),
        text_encoder_2=_clip_text_encoder(
            hidden_size=32, hidden_act="gelu", seed=2, with_projection=True
        ),
        tokenizer_2=_clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5_encoder(seed=4),
        tokenizer_3=_t5_tokenizer(),
    )


def _build_flux() -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    # 16 latent channels packed 2x2 give x_embedder's 64 inputs; rope axes sum to the head dim.
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, seed=3, flow=True),
        text_encoder=_clip_text_encoder(hidden_size=64, hidden_act="quick_gelu", seed=1),
        tokenizer=_clip_tokenizer(pad_token="<|endoftext|>"),
        text_encoder_2=_t5_encoder(seed=4),
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def _build_pixart() -> DiffusionPipeline:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    # sample_size 32 is the smallest the pipeline's resolution binning accepts (256 px bins);
    # tiny presets pass use_resolution_binning=False to generate at 64 px directly.
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        cross_attention_dim=64,
        caption_channels=64,
        norm_num_groups=32,
        use_additional_conditions=False,
    )
    return PixArtSigmaPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(seed=4),
        vae=_vae(latent_channels=4, scaling_factor=0.13025, seed=3),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type="epsilon",
            solver_order=2,
            algorithm_type="dpmsolver++",
            lower_order_final=True,
        ),
    )


_BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "sdxl": _build_sdxl,
    "sd15": _build_sd15,
    "sd21": _build_sd21,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "pixart": _build_pixart,
}


# --------------------------------------------------------------------------- components


def _sd_unet(
    attention_head_dim: int | tuple[int, ...], use_linear_projection: bool, upcast_attention: bool
) -> UNet2DConditionModel:
    """An SD 1.x/2.x-shaped UNet: attention at the first level, plain ResNets at the last."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=attention_head_dim,
        use_linear_projection=use_linear_projection,
        upcast_attention=upcast_attention,
        cross_attention_dim=64,
        norm_num_groups=32,
    )


def _vae(
    latent_channels: int,
    scaling_factor: float,
    seed: int,
    shift_factor: float | None = None,
    flow: bool = False,
) -> AutoencoderKL:
    """An 8x-downsampling AutoencoderKL; `flow` drops the quant convs as SD3/Flux VAEs do."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
    )


def _clip_text_encoder(
    hidden_size: int, hidden_act: str, seed: int, with_projection: bool = False
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A 2-layer CLIP text tower whose vocabulary and special ids match `_clip_tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = _clip_vocab()
    config = CLIPTextConfig(
        vocab_size=_CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=vocab[_CLIP_BOS],
        eos_token_id=vocab[_CLIP_EOS],
        pad_token_id=vocab[_CLIP_EOS],
    )
    torch.manual_seed(seed)
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_cls(config).eval()


def _t5_encoder(seed: int) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style encoder (gated GELU, untied head) sized to `_t5_tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    vocab_size = len(_t5_vocab()) + _T5_EXTRA_IDS
    config = T5Config(
        # Rounded up to a multiple of 64, as T5's 32128 rows cover its 32100 tokens.
        vocab_size=-(-vocab_size // 64) * 64,
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


# --------------------------------------------------------------------------- tokenizers
#
# Both vocabularies come from the same small English corpus of prompt words. CLIP's is byte-level
# BPE (the 256-symbol byte alphabet, each also with the end-of-word suffix, then merges learnt on
# the corpus, then the two specials last, as in openai/clip-vit-large-patch14), so any text
# tokenizes without an unknown token. T5's is a Unigram over whole words plus single characters.

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
# Embedding rows of the tiny CLIP text encoders: room for the 512 byte symbols, every merge the
# corpus yields (about 720, so each corpus word is one token) and the two specials.
_CLIP_VOCAB_SIZE = 1280
_T5_EXTRA_IDS = 100

_CORPUS = """
a an the and or of in on at to for with from by over under near above below behind beside
into onto through across along around between inside outside under after before during while
is are was were be being been has have had do does did can could will would should may might
this that these those it its his her their our your my one two three four five many some
photo photograph picture image painting drawing illustration portrait landscape close up shot
view scene still life render rendering art artwork style detailed highly intricate realistic
photorealistic cinematic lighting dramatic light soft warm cold bright dark shadow shadows
sunset sunrise night day morning evening golden hour blue sky clouds cloud rain snow fog mist
serene calm quiet peaceful busy lake river sea ocean beach wave waves water reflection reflecting
mountain mountains hill hills forest tree trees flower flowers garden field grass meadow desert
city street road bridge building buildings tower house castle room window windowsill door table
futuristic ancient old new modern small large big tiny huge tall long short wide little giant
cat cats dog dogs golden retriever puppy kitten bird birds horse fish bear lion tiger fox owl
man woman person people child children girl boy face eyes hair smile hands astronaut robot
car cars flying train plane boat ship bicycle space earth moon sun star stars planet galaxy
red green yellow orange purple pink black white gray brown silver gold colorful vibrant pastel
playing sitting standing walking running floating eating reading sleeping looking holding wearing
autumn spring summer winter leaves leaf stone rock wood wooden glass metal fire ice light
oil watercolor sketch digital concept fantasy science fiction anime cartoon vintage retro
high quality resolution sharp focus depth bokeh background foreground center wide angle lens
camera macro aerial 4k 8k hdr trending masterpiece best beautiful elegant cute happy sad
""".split()


def _clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """A CLIPTokenizer loaded from a generated `vocab.json` + `merges.txt`, as hub repos ship it.

    Loading from those two files (rather than an in-memory vocabulary) goes through the same
    transformers conversion a real SD tokenizer folder does.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="diffquant-clip-") as folder:
        _write_clip_vocab_files(Path(folder), pad_token)
        return CLIPTokenizer.from_pretrained(folder)


def _write_clip_vocab_files(folder: Path, pad_token: str) -> None:
    """vocab.json, merges.txt and tokenizer_config.json of the tiny CLIP tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(_clip_vocab(), ensure_ascii=False))
    merges = "\n".join(f"{a} {b}" for a, b in _clip_merges())
    (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "bos_token": _CLIP_BOS,
        "eos_token": _CLIP_EOS,
        "unk_token": _CLIP_EOS,
        "pad_token": pad_token,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_clip_tokenizers_in_hub_layout(pipe: DiffusionPipeline, folder: Path) -> None:
    """Replace the saved CLIP tokenizer folders by vocab.json + merges.txt, like the hub repos.

    transformers 5 saves only tokenizer.json; real SD/SDXL/SD3/Flux tokenizer folders have no
    tokenizer.json, so the tiny pipeline keeps the files a real one is loaded from.
    """
    from transformers import CLIPTokenizer

    for name, component in pipe.components.items():
        if isinstance(component, CLIPTokenizer):
            shutil.rmtree(folder / name)
            _write_clip_vocab_files(folder / name, str(component.pad_token))


@functools.cache
def _clip_vocab() -> dict[str, int]:
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    for a, b in _clip_merges():
        tokens.append(a + b)
    tokens += [_CLIP_BOS, _CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}


@functools.cache
def _clip_merges() -> tuple[tuple[str, str], ...]:
    """BPE merges learnt greedily on the corpus; ties broken by the pair's text for determinism."""
    budget = _CLIP_VOCAB_SIZE - 2 * 256 - 2
    words: dict[tuple[str, ...], int] = {}
    for word, count in Counter(w.lower() for w in _CORPUS).items():
        symbols = [_bytes_to_unicode()[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] = count
    pairs: Counter[tuple[str, str]] = Counter()
    for symbols, count in words.items():
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += count
    # A heap of (-count, pair) with stale entries skipped on pop: the most frequent pair first,
    # the smallest pair text among equals, without rescanning every pair per merge.
    heap = [(-count, pair) for pair, count in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(merges) < budget and heap:
        negative_count, best = heapq.heappop(heap)
        if pairs[best] != -negative_count or pairs[best] <= 0:
            continue
        merges.append(best)
        changed: set[tuple[str, str]] = set()
        for symbols in [s for s in words if best[0] in s and best[1] in s]:
            merged = _merge_pair(symbols, best)
            if merged == symbols:
                continue
            count = words.pop(symbols)
            words[merged] = count
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] -= count
                changed.add(pair)
            for pair in zip(merged, merged[1:]):
                pairs[pair] += count
                changed.add(pair)
        for pair in changed:
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
    return tuple(merges)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters (byte-level BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _t5_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram, tokenizers-backed) tokenizer: <pad>=0, </s>=1, <unk>=2, words, sentinels."""
    from transformers import T5Tokenizer

    vocab = _t5_vocab() + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(_T5_EXTRA_IDS))]
    return T5Tokenizer(vocab=vocab, extra_ids=_T5_EXTRA_IDS, model_max_length=512)


def _t5_vocab() -> list[tuple[str, float]]:
    """Scored pieces without the sentinels: whole words beat spelling a word out by characters."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    words = sorted(set(_CORPUS) | {w.capitalize() for w in _CORPUS})
    pieces += [(f"▁{w}", -5.0 - 0.001 * i) for i, w in enumerate(words)]
    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces += [(c, -10.0) for c in characters]
    return pieces


# --------------------------------------------------------------------------- atomic build


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename a finished build to its final name; a complete build already there wins."""
    for _ in range(3):
        try:
            os.replace(tmp, final)
            return
        except OSError:
            if (final / COMPLETE_MARKER).is_file():
                return
            # Not complete: a build from before the marker existed, or edited by hand.
            trash = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.replace(final, trash)
            except FileNotFoundError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
    raise ConfigError(
        f"could not move the tiny pipeline build into {final}",
        f"check that {final.parent} is writable, or set DIFFQUANT_CACHE to another directory",
    )


def _remove_stale_tmp_dirs(root: Path, name: str) -> None:
    cutoff = time.time() - _STALE_TMP_SECONDS
    for leftover in root.glob(f".{name}.*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass
