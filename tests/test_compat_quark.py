"""diffquant.compat.quark.get_calib_dataloader feeds AMD Quark's ModelQuantizer from a diffquant artifact."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DiffusionPipeline

from diffquant.compat.quark import get_calib_dataloader
from diffquant.models.tiny import tiny_pipeline_dir

quark = pytest.importorskip("quark")

PROMPTS = ["a cat", "a dog"]
SMALL = {"height": 64, "width": 64, "guidance_scale": 8.0, "show_progress": False}


@pytest.fixture(scope="module")
def pipe_and_loader(tmp_path_factory):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir("sdxl"))
    pipe.set_progress_bar_config(disable=True)
    out = tmp_path_factory.mktemp("quark") / "calib"
    return pipe, out, get_calib_dataloader(pipe, pipe.unet, PROMPTS, n_steps=2, out=out, **SMALL)


def test_batches_are_forward_kwargs_of_the_target(pipe_and_loader):
    pipe, _, loader = pipe_and_loader
    batches = list(loader)
    assert len(batches) == len(PROMPTS) * 2 and loader.batch_size == 1
    for batch in batches:
        assert isinstance(batch, dict)
        with torch.no_grad():
            assert pipe.unet(**batch)[0].shape == batch["sample"].shape  # model(**data), as ModelQuantizer calls it
    assert batches[0]["sample"].shape[0] == 2  # one sample holds both halves of classifier-free guidance


def test_a_second_call_reuses_the_artifact_without_running_the_pipe(pipe_and_loader):
    pipe, out, loader = pipe_and_loader
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        again = get_calib_dataloader(pipe, pipe.unet, PROMPTS, n_steps=2, out=out, **SMALL)
    finally:
        handle.remove()
    assert calls == []
    assert all(torch.equal(a["sample"], b["sample"]) for a, b in zip(again, loader))


def test_quark_model_quantizer_calibrates_from_the_dataloader(pipe_and_loader):
    from quark.torch import ModelQuantizer
    from quark.torch.quantization.config.config import Int8PerTensorSpec, QConfig, QLayerConfig

    pipe, _, loader = pipe_and_loader
    unet = copy.deepcopy(pipe.unet)
    name = "down_blocks.1.attentions.0.proj_in"
    seen = []
    handle = dict(unet.named_modules())[name].register_forward_pre_hook(lambda module, args: seen.append(args[0].abs().max()))
    with torch.no_grad():
        for batch in loader:
            unet(**batch)
    handle.remove()
    spec = Int8PerTensorSpec(observer_method="min_max", symmetric=True, scale_type="float", round_method="half_even", is_dynamic=False).to_quantization_spec()
    quantized = ModelQuantizer(QConfig(global_quant_config=QLayerConfig(weight=spec, input_tensors=spec))).quantize_model(unet, loader)
    layer = dict(quantized.named_modules())[name]
    assert type(layer).__name__ == "QuantLinear"
    # Quark's symmetric min_max scale is max|x| / ((qmax - qmin) / 2) = max|x| / 127.5 for int8
    # (quark/torch/quantization/observer/observer.py), max|x| over every calibration batch.
    assert float(layer._input_quantizer.scale) == pytest.approx(float(max(seen)) / 127.5, rel=1e-6)
