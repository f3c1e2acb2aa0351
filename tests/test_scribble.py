"""HyperSDScribblePreprocessor math (nodes/scribble_math.py), without ComfyUI."""
import pytest
import torch

from nodes import scribble_math as sm


def _canvas(h=48, w=64, background=1.0, stroke=0.0):
    img = torch.full((h, w, 3), background)
    img[20:23, 8:56] = stroke  # horizontal stroke
    img[5:40, 30:32] = stroke  # vertical stroke
    truth = torch.zeros(h, w)
    truth[20:23, 8:56] = 1
    truth[5:40, 30:32] = 1
    return img, truth


def test_both_polarities_give_white_lines_on_black_in_one_batch():
    dark_on_white, truth = _canvas(background=1.0, stroke=0.0)
    white_on_black, _ = _canvas(background=0.0, stroke=1.0)
    out = sm.scribble_lines(torch.stack([dark_on_white, white_on_black]))
    assert out.shape == (2, 48, 64, 3)
    assert torch.equal(out[0, ..., 0], truth)
    assert torch.equal(out[1, ..., 0], truth)
    assert torch.equal(out[..., 0], out[..., 2])


def test_explicit_polarity_overrides_auto():
    img, truth = _canvas(background=1.0, stroke=0.0)
    forced = sm.scribble_lines(img[None], polarity="light_lines_on_dark")
    assert torch.equal(forced[0, ..., 0], 1 - truth)  # treated the white canvas as strokes
    assert torch.equal(sm.scribble_lines(img[None], polarity="dark_lines_on_light")[0, ..., 0], truth)


def test_auto_uses_majority_when_border_is_ambiguous():
    img = torch.zeros(32, 32, 3)
    img[:, :16] = 1.0  # border mean is exactly 0.5 -> ambiguous
    img[4:28, 20:28] = 1.0  # more than half is bright -> light background, dark strokes
    gray = sm.to_gray(img[None])
    assert bool(sm.lines_are_dark(gray)[0])


def test_grayscale_and_rgba_inputs_and_odd_sizes():
    img, truth = _canvas(h=37, w=53)
    truth = truth[:37, :53]
    rgba = torch.cat([img, torch.ones(37, 53, 1)], -1)[None]
    assert torch.equal(sm.scribble_lines(rgba)[0, ..., 0], truth)
    one = img[None, ..., :1]
    assert torch.equal(sm.scribble_lines(one)[0, ..., 0], truth)


def test_thickness_dilates_by_exact_pixels():
    img = torch.zeros(1, 21, 21, 3)
    img[0, 10, 10] = 1.0
    out = sm.scribble_lines(img, polarity="light_lines_on_dark", thickness=2)[0, ..., 0]
    assert out.sum() == 25 and out[8:13, 8:13].sum() == 25


def test_gaussian_blur_matches_direct_2d_convolution_in_float64():
    torch.manual_seed(0)
    gray = torch.rand(2, 30, 25, dtype=torch.float64)
    sigma = 1.3
    radius = 4
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    k2 = torch.outer(g, g) / g.sum() ** 2
    padded = torch.nn.functional.pad(gray[:, None], (radius,) * 4, mode="reflect")
    ref = torch.nn.functional.conv2d(padded, k2[None, None])[:, 0]
    assert torch.allclose(sm.gaussian_blur(gray, sigma), ref, atol=1e-12)


def test_photo_sketch_marks_dark_outline_not_flat_regions():
    img = torch.full((1, 64, 64, 3), 0.8)
    img[0, 16:48, 16:48] = 0.6  # a darker square: its boundary is the edge
    img[0, 32, 5:60] = 0.1  # a thin dark line: strongest sketch stroke
    out = sm.scribble_lines(img, source="photo", threshold=0.3, dog_sigma=1.0)[0, ..., 0]
    assert out[32, 10:14].min() == 1  # the line is drawn
    assert out[0:8, 0:8].sum() == 0 and out[22:27, 36:44].sum() == 0  # flat areas stay black
    assert out.mean() < 0.2


def test_invalid_arguments_name_the_input():
    img = torch.zeros(1, 8, 8, 3)
    with pytest.raises(ValueError, match="polarity"):
        sm.scribble_lines(img, polarity="up")
    with pytest.raises(ValueError, match="source"):
        sm.scribble_lines(img, source="video")
    with pytest.raises(ValueError, match="IMAGE"):
        sm.scribble_lines(img[0])
