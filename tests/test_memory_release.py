"""Stage two's memory: released float weights leave the process, captured inputs live in a file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffquant.eval.layer_inputs import SpilledLayerInputs
from diffquant.eval.measure import capture_layer_inputs
from diffquant.models.memory import release_file_pages

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/status are Linux's")


def rss_file_bytes() -> int:
    """The process's resident file-backed pages (RssFile), in bytes."""
    line = next(line for line in open("/proc/self/status") if line.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


@linux_only
def test_a_released_file_mapped_weight_leaves_the_resident_set(tmp_path: Path) -> None:
    """safetensors maps the file privately and every tensor is a view into it: reading a tensor
    makes its pages resident, and dropping the tensor alone would not give them back. The weight
    is a Parameter made from the loaded tensor, as `from_pretrained` leaves it."""
    torch.manual_seed(0)
    reference = {"big": torch.randn(8 * 2**20 // 4), "small": torch.randn(16)}
    save_file(reference, str(tmp_path / "w.safetensors"))
    tensors = {name: torch.nn.Parameter(t, requires_grad=False) for name, t in load_file(str(tmp_path / "w.safetensors")).items()}
    big = tensors["big"]
    before = rss_file_bytes()
    assert torch.equal(big, reference["big"])  # touches every page
    touched = rss_file_bytes()
    assert touched - before >= 6 * 2**20

    released = release_file_pages(big)
    page = 4096
    # Every whole page inside the 8 MiB tensor, less at most its first and last partial page.
    assert big.nbytes - 2 * page <= released <= big.nbytes
    assert touched - rss_file_bytes() >= released - 2**20  # measured; 1 MiB for unrelated activity
    # The pages come back from the file, bit for bit: the advice drops copies, never data.
    assert torch.equal(big, reference["big"])
    assert torch.equal(tensors["small"], reference["small"])


@linux_only
def test_a_weight_whose_storage_another_tensor_uses_is_left_alone(tmp_path: Path) -> None:
    save_file({"w": torch.arange(2**20, dtype=torch.float32)}, str(tmp_path / "w.safetensors"))
    weight = torch.nn.Parameter(load_file(str(tmp_path / "w.safetensors"))["w"], requires_grad=False)
    view = weight[10:]
    assert release_file_pages(weight) == 0
    del view
    assert release_file_pages(weight) > 0


def test_anonymous_meta_and_tiny_tensors_are_left_alone() -> None:
    assert release_file_pages(torch.randn(2**20)) == 0
    assert release_file_pages(torch.empty(2**20, device="meta")) == 0
    assert release_file_pages(torch.ones(3)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn])
def test_spilled_inputs_read_back_bit_for_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    a = (torch.randn(3, 5, 7) * 4).to(dtype)
    b = (torch.randn(2, 11) * 4).to(dtype)[:, ::2]  # not contiguous
    with SpilledLayerInputs() as spilled:
        spilled.append("x", a)
        spilled.append("y", b)
        spilled.append("x", torch.empty(0, 7, dtype=dtype))
        spilled.append("x", b)
        assert spilled.bytes_written == (a.numel() + 2 * b.numel()) * a.element_size()
        back = spilled.pop("x")
        assert [t.dtype for t in back] == [dtype] * 3 and [t.shape for t in back] == [a.shape, (0, 7), b.shape]
        assert torch.equal(back[0].view(torch.uint8), a.view(torch.uint8))
        assert torch.equal(back[2].view(torch.uint8), b.contiguous().view(torch.uint8))
        assert spilled.pop("x") == []  # a name is read once
        assert torch.equal(spilled.pop("y")[0].view(torch.uint8), b.contiguous().view(torch.uint8))


def test_captured_layer_inputs_are_the_layers_inputs_and_hold_no_tensors_in_memory() -> None:
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.net(hidden_states)

    wrapped = Wrapped()
    samples = [{"hidden_states": torch.randn(2, 300, 8)} for _ in range(2)]
    inputs, outputs = capture_layer_inputs(wrapped, ["net.0", "net.2"], samples, max_rows=256, show_progress=False)
    with inputs:
        assert not any(isinstance(value, torch.Tensor) for value in vars(inputs).values())
        assert inputs.bytes_written == 2 * 256 * (8 + 16) * 4
        first = inputs.pop("net.0")
        rows = samples[0]["hidden_states"].reshape(-1, 8)
        picks = [int((i + 0.5) * 600 / 256) for i in range(256)]
        assert torch.equal(first[0], rows[picks])
        hidden = model[1](model[0](samples[1]["hidden_states"])).reshape(-1, 16)
        assert torch.equal(inputs.pop("net.2")[1], hidden[picks])
    assert torch.equal(outputs[0], model(samples[0]["hidden_states"]))


@linux_only
def test_a_shared_file_mapped_weight_is_released_once_nothing_else_uses_it(tmp_path: Path) -> None:
    from diffquant.models.memory import FilePageReleaser

    save_file({"w": torch.arange(2**20, dtype=torch.float32)}, str(tmp_path / "w.safetensors"))
    weight = torch.nn.Parameter(load_file(str(tmp_path / "w.safetensors"))["w"], requires_grad=False)
    assert torch.equal(weight, torch.arange(2**20, dtype=torch.float32))  # resident
    home = weight.data  # what a held block keeps
    releaser = FilePageReleaser()
    releaser.add(weight)
    assert releaser.released_bytes == 0
    del home
    releaser.flush()
    assert weight.nbytes - 2 * 4096 <= releaser.released_bytes <= weight.nbytes
    releaser.add(torch.ones(2**20))  # anonymous: never waited for
    assert releaser._waiting == []


@pytest.mark.parametrize("zero_point", [False, True])
def test_quantize_affine_in_slices_gives_the_codes_of_one_piece(monkeypatch, zero_point: bool) -> None:
    """Large weights are quantized in row slices (no whole-weight float temporary); each code is
    still clamp(round_half_even(x / s) + zp): compared with that formula written out, bit for bit."""
    from diffquant.quant.formats import affine

    monkeypatch.setattr(affine, "_SLICE_ELEMENTS", 64)  # so a small tensor takes the sliced path
    torch.manual_seed(3)
    x = torch.randn(37, 5, 16) * 3
    x[4, 1, 2], x[9, 0, 0], x[20, 3, 7] = float("nan"), float("inf"), -float("inf")
    scale = x.nan_to_num(0.0, 1.0, -1.0).abs().amax(-1, keepdim=True) / 7 + 1e-3
    zp = torch.randint(-3, 3, scale.shape, dtype=torch.int32) if zero_point else None
    assert affine._row_slicer(x, scale, zp) is not None
    expected = torch.nan_to_num(torch.round(x / scale), nan=0.0)
    expected = torch.clamp(expected + (zp.float() if zp is not None else 0.0), -8, 7).to(torch.int8)
    assert torch.equal(affine.quantize_affine(x, scale, zp, -8, 7, torch.int8), expected)
    per_tensor = torch.tensor(0.05)
    assert torch.equal(affine.quantize_affine(x, per_tensor, None, -128, 127),
                       torch.clamp(torch.nan_to_num(torch.round(x / per_tensor), nan=0.0), -128, 127).to(torch.int32))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_block_formats_in_row_slices_give_the_codes_and_scales_of_one_piece(monkeypatch, fmt: str) -> None:
    """NVFP4 / MXFP4 weights larger than two slices are quantized in row slices (their float and
    bucketize temporaries are one slice's): codes and block scales equal one whole-tensor call's,
    NaN / inf blocks and an all-zero row included."""
    from diffquant.quant.formats import blocks, mxfp4, nvfp4

    torch.manual_seed(4)
    x = torch.randn(37, 64) * torch.logspace(-3, 3, 37).unsqueeze(1)
    x[4, 2], x[9, 17], x[20, 33] = float("nan"), float("inf"), -float("inf")
    x[30] = 0.0
    quantize = (lambda t: nvfp4.nvfp4_quantize(t, torch.tensor(0.37))) if fmt == "nvfp4" else mxfp4.mxfp4_quantize
    whole = quantize(x)
    monkeypatch.setattr(blocks.in_row_slices, "__defaults__", (64,))  # 1 row per slice
    module = nvfp4 if fmt == "nvfp4" else mxfp4
    calls = []
    one_call = module._quantize_blocks
    monkeypatch.setattr(module, "_quantize_blocks", lambda *args: calls.append(args[0].shape[0]) or one_call(*args))
    sliced = quantize(x)
    assert calls == [1] * 37
    assert len(whole) == len(sliced) == 2
    for a, b in zip(whole, sliced):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    # Dequantized in row slices straight into bf16: the bits of the float32 result cast once.
    dequantize = (lambda c, s, dtype: nvfp4.nvfp4_dequantize(c, s, torch.tensor(0.37), dtype)) if fmt == "nvfp4" else mxfp4.mxfp4_dequantize
    reference = dequantize(*whole, torch.float32).to(torch.bfloat16)
    monkeypatch.setattr(blocks.rows_into, "__defaults__", (64,))
    sliced_rows = dequantize(*whole, torch.bfloat16)
    assert sliced_rows.dtype == torch.bfloat16 and torch.equal(sliced_rows.view(torch.int16), reference.view(torch.int16))
