"""SlidingWindowInferer: equal to MONAI's sliding_window_inference, to a full pass, and to manual TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from umit.inference import SlidingWindowInferer, num_windows, window_starts
from umit.inference.sliding_window import importance_profiles

monai_inferers = pytest.importorskip("monai.inferers")


def small_net(k: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, k, 1)
    ).eval()


def monai_swi(x, roi, model, **kw) -> torch.Tensor:
    with torch.no_grad():
        return monai_inferers.sliding_window_inference(x, roi, 2, model, **kw)


# (input shape, roi, overlap, mode, sigma_scale): the Gaussian with sigma 0.125 has MONAI's 1e-3
# floor active (weight-sum ring); constant and sigma 1.0 are separable (1-D weight sums).
CASES = [
    ((2, 1, 40, 33, 27), (16, 16, 16), 0.5, "gaussian", 0.125),
    ((1, 1, 20, 9, 31), (16, 12, 8), (0.25, 0.5, 0.6), "constant", 0.125),
    ((1, 1, 37, 30, 20), (16, 16, 16), 0.5, "gaussian", 1.0),
    ((1, 1, 10, 9, 8), (16, 16, 16), 0.5, "gaussian", 0.125),  # smaller than the ROI: padded
    ((1, 1, 24, 18, 30), (12, 18, 10), 0.0, "gaussian", 0.125),  # no overlap, roi == size on y
]


@pytest.mark.parametrize(("shape", "roi", "overlap", "mode", "sigma"), CASES)
def test_matches_monai(shape, roi, overlap, mode, sigma):
    model = small_net()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ref = monai_swi(x, roi, model, overlap=overlap, mode=mode, sigma_scale=sigma)
    for axis in (None, 0, 1, 2):
        kw = dict(overlap=overlap, mode=mode, sigma_scale=sigma, sw_batch_size=3, slab_axis=axis)
        out = SlidingWindowInferer(roi, **kw)(model, x)
        assert out.shape == ref.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        labels = SlidingWindowInferer(roi, output="argmax", **kw)(model, x)
        assert labels.shape == (shape[0], *shape[2:]) and labels.dtype == torch.uint8
        assert torch.equal(labels.long(), ref.argmax(1))


def test_probability_outputs_match_monai_softmax():
    model = small_net(k=4)
    x = torch.randn(1, 1, 30, 26, 22, generator=torch.Generator().manual_seed(2))
    ref = torch.softmax(monai_swi(x, (16, 16, 16), model, overlap=0.5, mode="gaussian"), 1)
    kw = dict(overlap=0.5, activation="softmax")
    p16 = SlidingWindowInferer(16, output="float16", **kw)(model, x)
    assert p16.dtype == torch.float16
    torch.testing.assert_close(p16.float(), ref, atol=1e-3, rtol=0)
    p8 = SlidingWindowInferer(16, output=torch.uint8, **kw)(model, x)
    assert p8.dtype == torch.uint8
    assert (p8.float() - ref * 255).abs().max() <= 0.5 + 1e-3
    sig = SlidingWindowInferer(16, overlap=0.5, activation="sigmoid")(model, x)
    logits = monai_swi(x, (16, 16, 16), model, overlap=0.5, mode="gaussian")
    torch.testing.assert_close(sig, torch.sigmoid(logits), atol=1e-6, rtol=1e-5)


def test_equals_full_pass_when_the_volume_fits():
    model = small_net()
    x = torch.randn(2, 1, 16, 12, 20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
    out = SlidingWindowInferer((16, 12, 20), sw_batch_size=2)(model, x)
    torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-5)
    # Smaller than the ROI: equal to the full pass over the symmetrically padded volume.
    out = SlidingWindowInferer((19, 15, 20))(model, x)
    with torch.no_grad():
        padded = model(F.pad(x, (0, 0, 1, 2, 1, 2)))
    torch.testing.assert_close(out, padded[:, :, 1:17, 1:13, :], atol=1e-6, rtol=1e-5)


def test_tta_flips_equal_manual_average():
    model = small_net()
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    flips = [(0,), (1, 2), (0, 1, 2)]
    with torch.no_grad():
        manual = model(x)
        for axes in flips:
            dims = [a + 2 for a in axes]
            manual = manual + torch.flip(model(torch.flip(x, dims)), dims)
    manual = manual / (1 + len(flips))
    out = SlidingWindowInferer(16, tta_flips=flips)(model, x)
    torch.testing.assert_close(out, manual, atol=1e-6, rtol=1e-5)

    # Over several windows: equal to the plain inferer applied to the TTA-averaged model.
    def tta_model(w):
        y = model(w)
        for axes in flips:
            dims = [a + 2 for a in axes]
            y = y + torch.flip(model(torch.flip(w, dims)), dims)
        return y / (1 + len(flips))

    x = torch.randn(1, 1, 30, 20, 24, generator=torch.Generator().manual_seed(5))
    a = SlidingWindowInferer(16, tta_flips=flips, sw_batch_size=2)(model, x)
    b = SlidingWindowInferer(16, sw_batch_size=2)(tta_model, x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_window_grid_is_monais():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for size, roi, ov in [((512, 512, 300), (96, 96, 96), 0.5), ((40, 9, 31), (16, 9, 8), 0.25)]:
        interval = _get_scan_interval(size, roi, 3, (ov,) * 3)
        slices = dense_patch_slices(size, roi, interval)
        assert num_windows(size, roi, ov) == len(slices)
        for d in range(3):
            assert window_starts(size[d], roi[d], ov) == sorted({s[d].start for s in slices})


def test_importance_map_is_monais():
    from monai.data.utils import compute_importance_map

    for mode, sigma in [("gaussian", 0.125), ("gaussian", 1.0), ("constant", 0.125)]:
        w, factors = importance_profiles((16, 12, 8), mode, (sigma,) * 3)
        ref = compute_importance_map((16, 12, 8), mode=mode, sigma_scale=sigma)
        assert torch.equal(w, ref)
        assert (factors is None) == (mode == "gaussian" and sigma == 0.125)


def test_numpy_input_batch_and_label_dtype():
    model = small_net(k=2)
    x = np.random.default_rng(0).normal(size=(2, 1, 20, 18, 16)).astype(np.float32)
    out = SlidingWindowInferer(12, overlap=0.25, output="argmax")(model, x)
    assert out.shape == (2, 20, 18, 16) and out.dtype == torch.uint8
    assert set(out.unique().tolist()) <= {0, 1}
    # The batch items are independent: item 1 alone gives the same labels.
    alone = SlidingWindowInferer(12, overlap=0.25, output="argmax")(model, x[1:])
    assert torch.equal(out[1:], alone)
    # Integer images are cast window by window.
    ints = torch.randint(-100, 100, (1, 1, 20, 18, 16), dtype=torch.int16)
    a = SlidingWindowInferer(12, overlap=0.25)(model, ints)
    b = SlidingWindowInferer(12, overlap=0.25)(model, ints.float())
    torch.testing.assert_close(a, b)


def test_deep_supervision_outputs_use_the_first():
    model = small_net()
    x = torch.randn(1, 1, 20, 20, 20)
    a = SlidingWindowInferer(16)(lambda w: [model(w), model(w)[:, :, ::2]], x)
    b = SlidingWindowInferer(16)(model, x)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(roi_size=0), "roi_size"),
        (dict(roi_size=16, overlap=1.0), "overlap"),
        (dict(roi_size=16, mode="median"), "mode"),
        (dict(roi_size=16, output="uint8"), "activation"),
        (dict(roi_size=16, output="int7"), "output"),
        (dict(roi_size=16, precision="fp8"), "precision"),
        (dict(roi_size=16, sw_batch_size=0), "sw_batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlidingWindowInferer(**kwargs)


def test_bad_inputs():
    model = small_net()
    with pytest.raises(ValueError, match="spatial axes"):
        SlidingWindowInferer((16, 16, 16))(model, torch.randn(1, 1, 20, 20))
    with pytest.raises(ValueError, match="model output shape"):
        SlidingWindowInferer(16)(lambda w: w[:, :, ::2], torch.randn(1, 1, 20, 20, 20))
    with pytest.raises(ValueError, match="slab_axis"):
        SlidingWindowInferer(16, slab_axis=3)(model, torch.randn(1, 1, 20, 20, 20))


def test_bf16_autocast_runs_close():
    model = small_net()
    x = torch.randn(1, 1, 20, 20, 20, generator=torch.Generator().manual_seed(6))
    a = SlidingWindowInferer(16, precision="bf16")(model, x)
    b = SlidingWindowInferer(16)(model, x)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)


def test_inplace_argmax_takes_the_first_maximum():
    from umit.inference.sliding_window import _argmax0_

    x = torch.randn(6, 7, 9, generator=torch.Generator().manual_seed(7))
    x[:, 0, 0] = 1.0  # a six-way tie -> channel 0
    x[4, 1, 1] = x[2, 1, 1] = 50.0  # a two-way tie -> channel 2
    out = _argmax0_(x.clone())
    assert out.dtype == torch.float32
    assert torch.equal(out.long(), x.argmax(0))
    assert out[0, 0] == 0 and out[1, 1] == 2
