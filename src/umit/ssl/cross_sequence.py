"""Cross-sequence MRI pretraining: predict a held-out sequence from the others.

Each sample of a multi-channel MRI crop (T1, T2, FLAIR, T1c, ... in the store's normalised
intensity space) hides one sequence, the target: drawn at random per sample, or fixed
(``target="FLAIR"``). With ``mask_ratio < 1`` only that fraction of the target's
``mask_patch``-cubes is hidden (masked patches of the missing sequence; the rest of it stays
visible). Hidden voxels are NaN, which :class:`umit.models.absent.AbsentChannels` turns into a
learned fill value and, for encoders with a linear input projection, a learned token embedding
of the absent channel. The encoder (any registered one, through the feature API) feeds a light
decoder: the deepest feature map upsampled like Models Genesis and a 3³ output convolution, plus
(``input_skip``) a 1x1x1 convolution of the filled input: a voxelwise linear mix of the
available sequences at full resolution, which the encoder-decoder path corrects with context a
stride-16 feature map can carry. It predicts every channel; the loss (L1 or MSE) is taken
on the hidden voxels of each sample's target.

``baseline_loss`` is the trivial baseline: the nearest available sequence after a per-sample
affine intensity match (least squares ``a * source + b`` to the target, the best-fitting source
kept), scored with the same loss on the same voxels. A model below it has learned more than a
global intensity mapping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from umit.models.absent import AbsentChannels, token_width
from umit.models.heads import feature_map
from umit.ssl.genesis import upsampling_decoder

__all__ = [
    "CrossSequence3D",
    "intensity_matched",
    "psnr",
    "ssim3d",
]


def intensity_matched(
    x: torch.Tensor, target: int, where: torch.Tensor | None = None
) -> torch.Tensor:
    """The trivial prediction of channel ``target`` of one (C, D, H, W) volume.

    Every other channel is mapped by the least-squares affine fit ``a * x_s + b`` to the target
    (over the voxels ``where``, default all) and the best-fitting one is returned, (D, H, W).
    """
    C = x.shape[0]
    sel = torch.ones_like(x[0], dtype=torch.bool) if where is None else where.bool()
    y = x[target][sel].double()
    best, best_err = None, math.inf
    for s in range(C):
        if s == target:
            continue
        src = x[s][sel].double()
        var = src.var(unbiased=False)
        a = ((src - src.mean()) * (y - y.mean())).mean() / var if var > 1e-12 else src.new_zeros(())
        b = y.mean() - a * src.mean()
        err = float(((a * src + b - y) ** 2).mean())
        if err < best_err:
            best_err = err
            best = (a * x[s].double() + b).to(x.dtype)
    assert best is not None, "a target needs at least one other channel"
    return best


def psnr(
    pred: torch.Tensor,
    ref: torch.Tensor,
    data_range: float | None = None,
    mask: torch.Tensor | None = None,
) -> float:
    """Peak signal-to-noise ratio in dB over ``mask`` (default all voxels); ``data_range``
    defaults to the reference's max - min there."""
    if mask is not None:
        pred, ref = pred[mask.bool()], ref[mask.bool()]
    rng = float(ref.max() - ref.min()) if data_range is None else data_range
    mse = float(((pred.double() - ref.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(rng**2 / mse)


def ssim3d(
    pred: torch.Tensor,
    ref: torch.Tensor,
    data_range: float | None = None,
    win: int = 7,
    mask: torch.Tensor | None = None,
) -> float:
    """Mean structural similarity of two (D, H, W) volumes (uniform ``win``³ window, the
    population statistics, K1 = 0.01, K2 = 0.03, as skimage's ``structural_similarity`` with
    ``use_sample_covariance=False``), over the windows that fit, or those centred in ``mask``;
    ``data_range`` defaults to the reference's max - min (in ``mask``)."""
    sel = ref if mask is None else ref[mask.bool()]
    rng = float(sel.max() - sel.min()) if data_range is None else data_range
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    x = pred.double()[None, None]
    y = ref.double()[None, None]

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(t, win, stride=1)

    mx, my = mean(x), mean(y)
    vx = mean(x * x) - mx * mx
    vy = mean(y * y) - my * my
    cxy = mean(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    s = s[0, 0]  # (D - win + 1, H - win + 1, W - win + 1): one value per window that fits
    if mask is None:
        return float(s.mean())
    h = win // 2
    centre = mask.bool()[h : h + s.shape[0], h : h + s.shape[1], h : h + s.shape[2]]
    return float(s[centre].mean())


class CrossSequence3D(nn.Module):
    """Held-out sequence prediction around any encoder with the feature API.

    Args:
        encoder: encoder with ``forward_intermediates`` and ``feature_info`` (ViT, Swin, CNN).
        channel_names: the sequences, in channel order (at least two).
        target: the sequence always hidden; None draws one per sample.
        mask_ratio: fraction of the target's patches hidden (1: the whole sequence).
        mask_patch: edge of a hidden cube in voxels, with ``mask_ratio < 1``.
        decoder_dim: width of the first decoder stage (halved per upsampling, at least 8).
        loss: ``l1`` or ``mse``, in the normalised intensity space of the store.
        input_skip: add a 1x1x1 convolution of the filled input to the output.
    """

    def __init__(
        self,
        encoder: nn.Module,
        channel_names: Sequence[str],
        target: str | None = None,
        mask_ratio: float = 1.0,
        mask_patch: int = 8,
        decoder_dim: int = 64,
        loss: str = "l1",
        input_skip: bool = True,
    ):
        super().__init__()
        names = [str(n) for n in channel_names]
        if len(names) < 2:
            raise ValueError(f"cross-sequence prediction needs at least two sequences, got {names}")
        if target is not None and target not in names:
            raise ValueError(f"target sequence {target!r} is not one of the channels {names}")
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio!r}")
        if loss not in ("l1", "mse"):
            raise ValueError(f"loss must be 'l1' or 'mse', got {loss!r}")
        self.channel_names = names
        self.in_chans = len(names)
        self.target = target
        self.target_index = None if target is None else names.index(target)
        self.mask_ratio = mask_ratio
        self.mask_patch = int(mask_patch)
        self.loss_name = loss
        self.input_skip = input_skip
        self.encoder = encoder
        self.absent = AbsentChannels(self.in_chans, token_width(encoder))
        self.absent.attach(encoder)
        self.decoder, width = upsampling_decoder(encoder, decoder_dim)
        self.out = nn.Conv3d(width, self.in_chans, 3, padding=1)
        # a voxelwise linear map of the (filled) sequences: the global intensity mixing, which
        # the encoder-decoder path then corrects with context
        self.skip = nn.Conv3d(self.in_chans, self.in_chans, 1) if input_skip else None
        self.model_name = "cross_sequence3d"
        self.model_args = {
            "encoder": getattr(encoder, "model_name", type(encoder).__name__),
            "encoder_args": getattr(encoder, "model_args", {}),
            "channel_names": names,
            "target": target,
            "mask_ratio": mask_ratio,
            "mask_patch": self.mask_patch,
            "decoder_dim": decoder_dim,
            "loss": loss,
            "input_skip": input_skip,
        }

    def no_weight_decay(self) -> set[str]:
        enc = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return {f"encoder.{n}" for n in enc} | {"absent.fill", "absent.embed"}

    # ------------------------------------------------------------------ hiding
    def draw_targets(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) index of each sample's hidden sequence."""
        if self.target_index is not None:
            return torch.full((batch,), self.target_index, dtype=torch.long)
        return torch.randint(0, self.in_chans, (batch,), generator=generator)

    def draw_hidden(
        self, batch: int, shape: Sequence[int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, D, H, W) bool: the hidden voxels of each sample's target (at least one cube)."""
        if self.mask_ratio >= 1.0:
            return torch.ones(batch, *shape, dtype=torch.bool)
        p = self.mask_patch
        grid = [-(-s // p) for s in shape]
        n = grid[0] * grid[1] * grid[2]
        k = max(1, round(self.mask_ratio * n))
        order = torch.rand(batch, n, generator=generator).argsort(dim=1)
        cubes = torch.zeros(batch, n, dtype=torch.bool)
        cubes.scatter_(1, order[:, :k], True)
        cubes = cubes.view(batch, *grid)  # (B, gd, gh, gw) -> voxels
        full = cubes.repeat_interleave(p, 1).repeat_interleave(p, 2).repeat_interleave(p, 3)
        return full[:, : shape[0], : shape[1], : shape[2]]

    def hide(self, x: torch.Tensor, targets: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The input with each sample's hidden target voxels set to NaN (absent)."""
        B, C = x.shape[:2]
        onehot = F.one_hot(targets, C).bool().view(B, C, 1, 1, 1).to(x.device)
        return x.masked_fill(onehot & hidden.unsqueeze(1).to(x.device), float("nan"))

    # ------------------------------------------------------------------ prediction
    def predict(self, x_hidden: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) with NaN where hidden -> predicted (B, C, D, H, W), every channel."""
        filled = self.absent(x_hidden)
        y = self.decoder(feature_map(self.encoder, filled))
        y = F.interpolate(y, size=filled.shape[2:], mode="trilinear", align_corners=False)
        y = self.out(y)
        return y if self.skip is None else y + self.skip(filled)

    def _loss(self, pred: torch.Tensor, ref: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        diff = (pred.float() - ref.float()).abs() if self.loss_name == "l1" else None
        if diff is None:
            diff = (pred.float() - ref.float()) ** 2
        w = where.float()
        return (diff * w).sum() / w.sum().clamp_min(1.0)

    def baseline(
        self, x: torch.Tensor, targets: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """(B, D, H, W): each sample's intensity-matched nearest other sequence."""
        return torch.stack(
            [intensity_matched(x[b], int(targets[b]), hidden[b]) for b in range(x.shape[0])]
        )

    def forward(
        self, batch: Any, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``batch``: (B, C, D, H, W) crops or a mapping with ``"image"``; returns the loss dict."""
        x = batch["image"] if isinstance(batch, Mapping) else batch
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected (B, {self.in_chans}, D, H, W) input, got {tuple(x.shape)}")
        B = x.shape[0]
        targets = self.draw_targets(B, generator)
        hidden = self.draw_hidden(B, x.shape[2:], generator).to(x.device)
        pred = self.predict(self.hide(x, targets, hidden))
        idx = torch.arange(B, device=x.device)
        t = targets.to(x.device)
        pred_t, ref_t = pred[idx, t], x[idx, t]  # (B, D, H, W)
        loss = self._loss(pred_t, ref_t, hidden)
        with torch.no_grad():
            base = self._loss(self.baseline(x.detach(), targets, hidden), ref_t, hidden)
        return {"loss": loss, "baseline_loss": base, "pred": pred_t.detach(), "targets": targets}

    @torch.no_grad()
    def synthesize(
        self,
        volume: torch.Tensor,
        target: int,
        roi: Sequence[int],
        pad_value: float | Sequence[float] = 0.0,
    ) -> torch.Tensor:
        """Whole (C, D, H, W) volume -> (D, H, W) prediction of channel ``target`` from the
        others, tile by tile. Tiles of ``roi`` cover the volume, the last one along an axis
        shifted back to end at the border (overlaps take the later tile); an axis shorter than
        ``roi`` is padded with ``pad_value`` (per channel)."""
        C, *shape = volume.shape
        size = [max(s, r) for s, r in zip(shape, roi, strict=True)]
        pads = [float(pad_value)] * C if isinstance(pad_value, (int, float)) else pad_value
        x = torch.stack([volume.new_full(size, float(p)) for p in pads])
        x[:, : shape[0], : shape[1], : shape[2]] = volume
        x[target] = float("nan")
        out = torch.zeros(size, dtype=volume.dtype, device=volume.device)
        starts = [sorted({*range(0, n - r, r), n - r}) for n, r in zip(size, roi, strict=True)]
        for i in starts[0]:
            for j in starts[1]:
                for k in starts[2]:
                    sl = (slice(i, i + roi[0]), slice(j, j + roi[1]), slice(k, k + roi[2]))
                    out[sl] = self.predict(x[(slice(None), *sl)][None])[0, target]
        return out[: shape[0], : shape[1], : shape[2]]


def foreground(volume: torch.Tensor, target: int, tol: float = 0.02) -> torch.Tensor:
    """(D, H, W) bool: voxels where some channel other than ``target`` differs by more than
    ``tol`` from its value at the corner voxel (the background: air, or the constant outside a
    skull-stripped brain), i.e. the imaged head as the available sequences show it."""
    other = [c for c in range(volume.shape[0]) if c != target]
    return torch.stack([(volume[c] - volume[c, 0, 0, 0]).abs() > tol for c in other]).any(0)


def population_match(store: Any, cases: Sequence[str], target: int) -> tuple[int, float, float]:
    """The trivial prediction of channel ``target`` that never sees the target of a scored case.

    For every other channel ``s``, the least-squares affine map ``a * x_s + b`` to the target is
    fitted on the pooled :func:`foreground` voxels of ``cases`` (training subjects); the channel
    with the smallest pooled squared error there is kept. Returns ``(s, a, b)``.
    """
    return population_matches(store, cases, [target])[target]


def population_matches(
    store: Any, cases: Sequence[str], targets: Sequence[int]
) -> dict[int, tuple[int, float, float]]:
    """:func:`population_match` of every target in ``targets``, reading each case once."""
    if not cases:
        raise ValueError("population_match needs at least one fitting case")
    sums: dict[tuple[int, int], np.ndarray] = {}  # (t, s) -> [n, Σx, Σy, Σx², Σxy, Σy²]
    for c in cases:
        vol = np.asarray(store.case(c).read(), np.float64)
        for t in targets:
            mask = foreground(torch.from_numpy(vol), t).numpy()
            y = vol[t][mask]
            for s in range(vol.shape[0]):
                if s != t:
                    x = vol[s][mask]
                    row = np.array([x.size, x.sum(), y.sum(), x @ x, x @ y, y @ y])
                    sums[(t, s)] = sums.get((t, s), 0) + row
    best: dict[int, tuple[float, int, float, float]] = {}
    for (t, s), (n, sx, sy, sxx, sxy, syy) in sums.items():
        var = sxx / n - (sx / n) ** 2
        a = (sxy / n - sx * sy / n**2) / var if var > 1e-12 else 0.0
        b = sy / n - a * sx / n
        # mean of (a x + b - y)^2 from the sums
        err = (a * a * sxx + 2 * a * b * sx + b * b * n - 2 * a * sxy - 2 * b * sy + syy) / n
        if t not in best or err < best[t][0]:
            best[t] = (err, s, float(a), float(b))
    assert set(best) == set(targets), "a target needs at least one other channel"
    return {t: (s, a, b) for t, (_, s, a, b) in best.items()}


def synthesis_scores(
    module: CrossSequence3D,
    store: Any,
    cases: Sequence[str],
    roi: Sequence[int],
    fit_cases: Sequence[str] = (),
) -> dict[str, Any]:
    """PSNR / SSIM of each sequence predicted from the others on whole ``cases`` of a store,
    against two trivial predictions:

    * ``baseline``: the intensity-matched nearest other sequence, the affine map fitted on the
      scored case's own target (an oracle: it reads the target);
    * ``population`` (with ``fit_cases``): :func:`population_match` fitted on the training
      subjects ``fit_cases``, which never reads a scored case's target.

    Scored over :func:`foreground` (the oracle's fit too). Returns per target sequence the
    per-case scores and their means (``model_psnr``, ``baseline_psnr``, ``population_psnr``,
    SSIM and L1 alike); data range = the reference's in the foreground.
    """
    was = module.training
    module.eval()
    device = next(module.parameters()).device
    targets = [module.target_index] if module.target_index is not None else range(module.in_chans)
    out: dict[str, Any] = {"cases": list(cases), "roi": list(roi), "targets": {}}
    fits = population_matches(store, fit_cases, list(targets)) if fit_cases else {}
    for t in targets:
        pop = fits.get(t)
        rows = []
        for c in cases:
            case = store.case(c)
            vol = torch.from_numpy(case.read().astype("float32")).to(device)
            pad = [float(p) for p in case.pad_values] if case.pad_values else 0.0
            mask = foreground(vol, t)
            ref = vol[t]
            guesses = {
                "model": module.synthesize(vol, t, roi, pad).float(),
                "baseline": intensity_matched(vol, t, mask).float(),
            }
            if pop is not None:
                guesses["population"] = pop[1] * vol[pop[0]] + pop[2]
            row: dict[str, Any] = {"case": c, "voxels": int(mask.sum())}
            for name, guess in guesses.items():
                row[f"{name}_psnr"] = psnr(guess, ref, mask=mask)
                row[f"{name}_ssim"] = ssim3d(guess, ref, mask=mask)
                row[f"{name}_l1"] = float((guess - ref).abs()[mask].mean())
            rows.append(row)
        keys = [k for k in rows[0] if k not in ("case", "voxels")] if rows else []
        out["targets"][module.channel_names[t]] = {
            "per_case": rows,
            **{k: sum(r[k] for r in rows) / len(rows) for k in keys},
        }
        if pop is not None:
            out["targets"][module.channel_names[t]]["population_fit"] = {
                "source": module.channel_names[pop[0]],
                "a": pop[1],
                "b": pop[2],
                "cases": len(fit_cases),
            }
    module.train(was)
    return out
