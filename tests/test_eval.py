"""Metrics against hand-computed values, and the two PIL figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffquant.eval import image_grid, image_to_tensor, layer_sqnr_plot, psnr, sqnr_db, ssim
from diffquant.eval.metrics import SSIM_WIN_SIZE, _gaussian_window
from diffquant.eval.plots import PALETTE, _nice_ticks

# --- SQNR ----------------------------------------------------------------------------------------

# (reference, approx, expected dB, why)
SQNR_CASES = [
    ([3.0, 4.0], [3.0, 4.5], 20.0, "signal 25, noise 0.25"),
    ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], 10 * math.log10(4), "signal 4, noise 1"),
    ([2.0, 0.0], [0.0, 0.0], 0.0, "noise equals signal"),
    ([1.0, -1.0], [1.0, -1.0], math.inf, "identical: no noise"),
    ([0.0, 0.0], [0.0, 0.0], math.inf, "both zero: no noise"),
    ([0.0, 0.0], [0.0, 1e-3], -math.inf, "zero reference, nonzero error"),
]


@pytest.mark.parametrize("reference, approx, expected, why", SQNR_CASES, ids=[c[3] for c in SQNR_CASES])
def test_sqnr_known_values(reference, approx, expected, why):
    got = sqnr_db(torch.tensor(reference), torch.tensor(approx))
    assert got == pytest.approx(expected, abs=1e-12) if math.isfinite(expected) else got == expected


def test_sqnr_nan_propagates():
    assert math.isnan(sqnr_db(torch.tensor([1.0, 2.0]), torch.tensor([1.0, math.nan])))


def test_sqnr_is_scale_invariant_and_accepts_any_dtype():
    ref = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64)
    approx = ref + torch.tensor([[0.1, 0.0], [-0.1, 0.2]], dtype=torch.float64)
    base = sqnr_db(ref, approx)
    assert sqnr_db(ref * 1000, approx * 1000) == pytest.approx(base, abs=1e-9)
    assert sqnr_db(torch.tensor([3, 4]), torch.tensor([3, 5])) == pytest.approx(10 * math.log10(25))
    assert sqnr_db(ref.bfloat16(), ref.bfloat16()) == math.inf


def test_sqnr_accumulates_in_float64_so_half_inputs_do_not_overflow():
    # 300² = 90000 overflows float16 (max 65504); accumulating in the input dtype would give inf/inf.
    ref = torch.full((64,), 300.0, dtype=torch.float16)
    approx = ref.clone()
    approx[0] = 301.0
    assert sqnr_db(ref, approx) == pytest.approx(10 * math.log10(64 * 300.0**2 / 1.0))


def test_sqnr_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        sqnr_db(torch.zeros(3), torch.zeros(4))


# --- PSNR ----------------------------------------------------------------------------------------


def test_psnr_of_mse_001_is_20_db():
    a = torch.zeros(3, 8, 8, dtype=torch.float64)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-9)


def test_psnr_uint8_uses_data_range_255():
    a = torch.zeros(8, 8, 3, dtype=torch.uint8)
    b = torch.full((8, 8, 3), 25, dtype=torch.uint8)  # MSE 625
    assert psnr(a, b, data_range=255) == pytest.approx(10 * math.log10(255**2 / 625))


def test_psnr_uint8_with_unit_range_is_refused_with_the_fix():
    a = torch.zeros(8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="pass data_range=255"):
        psnr(a, a)


def test_psnr_of_pil_images_uses_unit_range():
    black = Image.new("L", (8, 8), 0)
    grey = Image.new("L", (8, 8), 51)  # 51/255 = 0.2 -> MSE 0.04 -> 10 log10(25)
    assert psnr(black, grey) == pytest.approx(10 * math.log10(25))
    assert psnr(grey, grey) == math.inf


# --- SSIM ----------------------------------------------------------------------------------------


def test_gaussian_window_matches_scipy_taps():
    # scipy.ndimage._gaussian_kernel1d(sigma=1.5, radius=int(3.5 * 1.5 + 0.5) = 5)
    x = np.arange(-5, 6, dtype=np.float64)
    taps = np.exp(-0.5 * (x / 1.5) ** 2)
    taps /= taps.sum()
    assert SSIM_WIN_SIZE == 11
    np.testing.assert_allclose(_gaussian_window(11, 1.5)[0, 0].numpy(), np.outer(taps, taps), rtol=1e-15)
    assert float(_gaussian_window(11, 1.5).sum()) == pytest.approx(1.0, abs=1e-15)


def test_ssim_of_identical_images_is_one():
    img = torch.rand(3, 24, 20, generator=torch.Generator().manual_seed(0))
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("mu1, mu2, data_range", [(0.2, 0.6, 1.0), (0.5, 0.55, 1.0), (10.0, 200.0, 255.0)])
def test_ssim_of_constant_images_is_the_luminance_term(mu1, mu2, data_range):
    # Variances and covariance are 0, so the contrast-structure term is C2 / C2 = 1.
    c1 = (0.01 * data_range) ** 2
    expected = (2 * mu1 * mu2 + c1) / (mu1**2 + mu2**2 + c1)
    a = torch.full((3, 16, 16), mu1, dtype=torch.float64)
    b = torch.full((3, 16, 16), mu2, dtype=torch.float64)
    assert ssim(a, b, data_range=data_range) == pytest.approx(expected, rel=1e-12)


def _ssim_brute_force(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Window by window, straight from Wang et al. 2004 eq. 13 with Gaussian weights (no conv)."""
    x = np.arange(-5, 6, dtype=np.float64)
    taps = np.exp(-0.5 * (x / 1.5) ** 2)
    w = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for ch in range(a.shape[0]):
        for i in range(a.shape[1] - 10):
            for j in range(a.shape[2] - 10):
                pa, pb = a[ch, i : i + 11, j : j + 11], b[ch, i : i + 11, j : j + 11]
                mu_a, mu_b = (w * pa).sum(), (w * pb).sum()
                var_a = (w * (pa - mu_a) ** 2).sum()
                var_b = (w * (pb - mu_b) ** 2).sum()
                cov = (w * (pa - mu_a) * (pb - mu_b)).sum()
                scores.append(
                    ((2 * mu_a * mu_b + c1) * (2 * cov + c2))
                    / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
                )
    return float(np.mean(scores))


def test_ssim_matches_a_window_by_window_reference():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 15, 18, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(3, 15, 18, generator=g, dtype=torch.float64)).clamp(0, 1)
    expected = _ssim_brute_force(a.numpy(), b.numpy(), 1.0)
    assert 0.3 < expected < 0.99  # a case far from both 0 and 1
    assert ssim(a, b) == pytest.approx(expected, rel=1e-10)


def test_ssim_is_the_same_for_chw_hwc_uint8_and_pil():
    g = torch.Generator().manual_seed(2)
    a = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8)
    b = (a.to(torch.int16) + torch.randint(-20, 21, (16, 16, 3), generator=g)).clamp(0, 255).to(torch.uint8)
    hwc = ssim(a, b, data_range=255)
    assert ssim(a.permute(2, 0, 1), b.permute(2, 0, 1), data_range=255) == pytest.approx(hwc, rel=1e-12)
    pil = ssim(Image.fromarray(a.numpy()), Image.fromarray(b.numpy()))
    assert pil == pytest.approx(hwc, rel=1e-9)
    assert hwc < 1.0


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity  # the reference, from the test extra

    g = torch.Generator().manual_seed(3)
    a = torch.rand(24, 20, 3, generator=g, dtype=torch.float64)
    b = (a + 0.05 * torch.randn(24, 20, 3, generator=g, dtype=torch.float64)).clamp(0, 1)
    expected = structural_similarity(
        a.numpy(), b.numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, channel_axis=-1,
    )
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(3, 10, 32), torch.zeros(3, 10, 32))


# --- image_to_tensor -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3), ("RGBA", 4), ("P", 3), ("CMYK", 3)])
def test_image_to_tensor_is_chw_float_in_unit_range(mode, channels):
    t = image_to_tensor(Image.new(mode, (5, 2)))
    assert t.shape == (channels, 2, 5) and t.dtype == torch.float32
    red = image_to_tensor(Image.new("RGB", (1, 1), (255, 51, 0)))
    assert red.flatten().tolist() == pytest.approx([1.0, 0.2, 0.0])


# --- plots ---------------------------------------------------------------------------------------


def _solid(colour: tuple[int, int, int], size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


COLOURS = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (220, 180, 0), (120, 0, 160), (0, 150, 150)]


def test_image_grid_places_each_image_in_its_cell(tmp_path: Path):
    rows = [("bf16", [_solid(c) for c in COLOURS[:3]]), ("w8a8 minmax", [_solid(c) for c in COLOURS[3:]])]
    labels = [
        "seed 0: a misty pine forest at dawn, sunbeams through fog",
        "seed 1: a cat",
        "seed 2: a café",
    ]
    out = image_grid(rows, labels, tmp_path / "grid.png", min_cell=192)
    assert out == tmp_path / "grid.png"
    with Image.open(out) as img:
        img.load()
        assert img.format == "PNG"
        # 64 px images enlarged x3 to 192; pad 10, label column 150, gaps 6.
        assert img.width == 10 + 150 + 6 + 3 * 192 + 2 * 6 + 10
        cell_top = img.height - 10 - 2 * 192 - 6
        for r in range(2):
            for c in range(3):
                centre = (10 + 150 + 6 + c * 198 + 96, cell_top + r * 198 + 96)
                assert img.getpixel(centre) == COLOURS[3 * r + c]
        dark_text = int((np.asarray(img.crop((0, 0, img.width, cell_top))).max(axis=-1) < 100).sum())
        assert dark_text > 200  # header labels were drawn
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left behind


def test_image_grid_enlarges_tiny_images_without_blending(tmp_path: Path):
    tiny = Image.new("L", (2, 2))
    tiny.putdata([0, 255, 255, 0])
    out = image_grid([("tiny", [tiny])], ["seed 0"], tmp_path / "g.png", min_cell=64)
    with Image.open(out) as img:
        left, top = 10 + 150 + 6, img.height - 10 - 64
        values = {c for _, c in img.crop((left, top, left + 64, top + 64)).getcolors()}
    assert values == {(0, 0, 0), (255, 255, 255)}  # 32x32 blocks of exact pixels, nothing in between


def test_image_grid_rejects_a_row_with_the_wrong_number_of_images(tmp_path: Path):
    with pytest.raises(ValueError, match="one image per column"):
        image_grid([("a", [_solid(COLOURS[0])])], ["x", "y"], tmp_path / "g.png")


def _sqnr_series(n: int) -> dict[str, list[float]]:
    w8 = [30 + 5 * math.sin(i / 5) for i in range(n)]
    w4 = [v - 12 for v in w8]
    w8[3] = math.inf
    w4[10] = math.nan
    w4[20] = -math.inf
    return {"w8a8 minmax": w8, "w4a16 gptq": w4}


def test_layer_sqnr_plot_is_1200x600_with_a_colour_per_series(tmp_path: Path):
    n = 40
    names = [f"down_blocks.{i // 10}.attentions.0.transformer_blocks.0.attn1.to_q" for i in range(n)]
    out = layer_sqnr_plot(_sqnr_series(n), names, tmp_path / "sqnr.png", "UNet per-layer SQNR")
    with Image.open(out) as img:
        img.load()
        assert img.format == "PNG" and img.size == (1200, 600)
        colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    for hex_colour in PALETTE[:2]:
        rgb = tuple(int(hex_colour[k : k + 2], 16) for k in (1, 3, 5))
        assert rgb in colours
    assert len(colours) > 20  # not blank: anti-aliased text and lines
    assert [p.name for p in tmp_path.iterdir()] == ["sqnr.png"]


def test_layer_sqnr_plot_handles_all_nan_and_single_layer(tmp_path: Path):
    out = layer_sqnr_plot({"broken": [math.nan], "exact": [math.inf]}, ["conv_in"], tmp_path / "p.png", "t")
    with Image.open(out) as img:
        assert img.size == (1200, 600)


def test_layer_sqnr_plot_rejects_series_of_the_wrong_length(tmp_path: Path):
    with pytest.raises(ValueError, match="one value per layer name"):
        layer_sqnr_plot({"a": [1.0, 2.0]}, ["only_one"], tmp_path / "p.png", "t")


@pytest.mark.parametrize(
    "lo, hi, ticks",
    [
        (14.2, 37.9, [10, 15, 20, 25, 30, 35, 40]),
        (0.0, 1.0, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (20.0, 20.0, [19, 19.5, 20, 20.5, 21]),
    ],
)
def test_nice_ticks_enclose_the_data_on_a_round_step(lo, hi, ticks):
    got, _ = _nice_ticks(lo, hi)
    assert got == pytest.approx(ticks)
