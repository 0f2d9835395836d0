"""Cross-phase prediction: from one contrast phase of a multiphase CT exam, predict every phase.

A multiphase exam (non-contrast, arterial and portal venous series of one patient in one visit)
shows the same anatomy with organ-specific enhancement: kidneys, spleen, liver and vessels change
brightness between phases, fat, lung and bone do not. Predicting every phase from any one of them
makes the network recognise each organ whatever its brightness in the phase it is shown. That is
the invariance a segmenter fine-tuned on a few labeled series lacks when a test series comes from
a phase none of them had (docs/evidence.md: on the phantoms, a kidney is found far less often in
such series). The pool is unlabeled and abundant: every contrast CT exam holds several series.

Groups: the store's cases with the same ``group_key`` (``subject_id``; use a study id where one
patient has several visits), one case per ``phase_key`` value (``contrast``). The phases of a
group must share spacing and orientation (one preprocessing plan gives that) and differ by a whole
number of voxels in position; each crop is read at the same world position in every phase, via
the cases' affines. A group needs at least two phases.

The network predicts, per phase, the change from the input (the input is added back), so
copying the input is free and the loss measures the enhancement map: where each enhancing organ
is and by how much it changes. ``baseline_loss`` is the loss of copying the input into every
phase (no change): a model below it predicts enhancement it was not shown.

Predicting the other phases does not by itself make the encoder see an organ the same way in
every phase: its features may still carry the phase. ``contrast > 0`` adds a dense cross-phase
contrast (InfoNCE over the deepest encoder map, as DenseCL and PixPro do across augmented views):
the feature at one position in one phase must pick out the same position in another phase of
the exam among every position of the batch. The two series are voxel-aligned, so the positives
are exact; the phase is the only thing that differs between them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from umit.data.dataset import StoreCropDataset, crop_start_range
from umit.data.store import Store
from umit.data.transforms import AugmentConfig, apply_augment, draw_augment_params
from umit.errors import InputError
from umit.models.heads import feature_dim, feature_map
from umit.ssl.genesis import DensePretext

__all__ = ["CrossPhase3D", "PhaseGroupCrops", "phase_groups"]


def phase_groups(
    store: Store,
    cases: Sequence[str],
    group_key: str = "subject_id",
    phase_key: str = "contrast",
    phases: Sequence[str] | None = None,
) -> tuple[list[str], dict[str, list[str | None]]]:
    """The phases and, per group with at least two of them, its case of each phase (or None).

    Groups come in the order of their first case id. Not in the order of their keys: a
    ``subject_id`` is a keyed hash whose key is drawn per catalog, so its order would change the
    validation hold-out and the data order from one ingest of the same exams to the next.

    Raises:
        InputError: naming the store when a case lacks the keys, a group holds two cases of one
            phase, or no group has two phases.
    """
    index = store.index
    found: dict[str, dict[str, str]] = {}
    for c in cases:
        group, phase = index[c].get(group_key), index[c].get(phase_key)
        if group is None or phase is None:
            raise InputError(
                store.prep_dir,
                f"case {c} has no {group_key!r} or {phase_key!r} in the store index; "
                f"method=cross_phase pairs the series of one exam by them",
            )
        slot = found.setdefault(str(group), {})
        if str(phase) in slot:
            raise InputError(
                store.prep_dir,
                f"{group_key} {group} has two {phase_key}={phase} series ({slot[str(phase)]}, "
                f"{c}); group by a study id if one subject has several visits",
            )
        slot[str(phase)] = c
    names = list(phases) if phases is not None else sorted({p for g in found.values() for p in g})
    groups = {
        g: [slot.get(p) for p in names]
        for g, slot in sorted(found.items(), key=lambda kv: min(kv[1].values()))
        if sum(p in slot for p in names) >= 2
    }
    if not groups:
        raise InputError(
            store.prep_dir,
            f"no {group_key} has series of two {phase_key} phases among {names}; "
            f"method=cross_phase needs multiphase exams (e.g. umit phantoms phases=[...])",
        )
    return names, groups


def _voxel_offset(store: Store, ref: str, other: str) -> np.ndarray:
    """Integer voxel offset of ``other``'s grid from ``ref``'s (same spacing and orientation)."""
    a, b = store.case(ref).affine, store.case(other).affine
    if not np.allclose(a[:3, :3], b[:3, :3], rtol=1e-4, atol=1e-4):
        raise InputError(
            store.prep_dir,
            f"series {ref} and {other} of one exam differ in spacing or orientation; "
            f"preprocess them with one plan",
        )
    # voxel v of ref is at world a @ v; in other's grid: b^-1 @ a @ v = v + offset
    offset = (np.linalg.inv(b) @ a[:, 3])[:3]
    if not np.allclose(offset, np.rint(offset), atol=1e-3):
        raise InputError(
            store.prep_dir,
            f"series {ref} and {other} of one exam are shifted by {offset.round(3).tolist()} "
            f"voxels, not a whole number; resample them onto one grid",
        )
    return np.rint(offset).astype(np.int64)


class PhaseGroupCrops(torch.utils.data.Dataset):
    """Random crops of multiphase exams: one phase as input, every phase as target.

    Item: ``image`` (1, D, H, W) of the input phase (with the intensity and noise of ``augment``),
    ``target`` (P, D, H, W) of every phase at the same world position (zeros where a phase is
    missing), ``present`` (P,) bool, ``phase`` the input's index. Flips apply to both.
    """

    def __init__(
        self,
        prep_dir: str | Path,
        crop_size: Sequence[int],
        groups: Mapping[str, Sequence[str | None]],
        samples_per_group: int = 1,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        chunk_cache: str | Path | None = None,
    ):
        self.groups = [list(v) for v in groups.values()]  # in the order given
        if not self.groups:
            raise ValueError("no exam groups to sample from")
        cases = [c for g in self.groups for c in g if c is not None]
        self.crops = StoreCropDataset(
            prep_dir, crop_size, cases=cases, seed=seed, with_label=False, chunk_cache=chunk_cache
        )
        store = self.crops.store
        if any(len(store.index[c]["shape"]) != 4 or store.index[c]["shape"][0] != 1 for c in cases):
            raise InputError(store.prep_dir, "method=cross_phase needs a one-channel store")
        self.refs = [next(c for c in g if c is not None) for g in self.groups]
        self.offsets = [
            [None if c is None else _voxel_offset(store, ref, c) for c in g]
            for ref, g in zip(self.refs, self.groups, strict=True)
        ]
        self.samples_per_group = int(samples_per_group)
        self.seed = int(seed)
        self.augment = augment or AugmentConfig(
            flip_prob=0.0, intensity_scale=0.0, intensity_shift=0.0
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.groups) * self.samples_per_group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        g = index // self.samples_per_group
        group, offsets = self.groups[g], self.offsets[g]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        lo, hi = crop_start_range(
            self.crops.store.index[self.refs[g]]["shape"][1:], self.crops.crop_size
        )
        start = rng.integers(lo, hi + 1)
        present = [c is not None for c in group]
        phase = int(rng.choice(np.flatnonzero(present)))
        target = torch.zeros((len(group), *self.crops.crop_size), dtype=torch.float32)
        for p, (case, off) in enumerate(zip(group, offsets, strict=True)):
            if case is not None:
                target[p] = self.crops.read_crop(case, start + off)["image"][0]
        # flips move the targets with the input; intensity and noise change the input only
        params = draw_augment_params(rng, self.augment, 1)
        out = apply_augment({"image": target[phase : phase + 1], "label": target}, params)
        return {
            "image": out["image"],
            "target": out["label"],
            "present": torch.tensor(present),
            "phase": phase,
        }


def _zero_output_layer(net: nn.Module, channels: int) -> None:
    """Zero the last convolution with ``channels`` outputs: training starts at "no change",
    the copy baseline, instead of at random enhancement maps."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.out_channels == channels]
    if convs:
        nn.init.zeros_(convs[-1].weight)
        if convs[-1].bias is not None:
            nn.init.zeros_(convs[-1].bias)


class CrossPhase3D(DensePretext):
    """Predict every phase of an exam from one: a whole dense network with one output channel
    per phase (``network=True``; its decoder is pretrained too), or an encoder behind the light
    upsampling decoder of :mod:`umit.ssl.genesis`.

    Args:
        encoder: an encoder with ``forward_intermediates``/``feature_info``, or with
            ``network=True`` a whole network built with ``in_chans=1`` and
            ``out_channels=len(phases)``.
        phases: the phase names, in target order.
        loss: ``mse`` (default) or ``l1`` on the store's normalised intensities, over present
            phases. The change is zero at most voxels; under L1 a network that cannot yet
            place the organs gains nothing from predicting any change, and stays at the copy.
        decoder_dim: width of the light decoder (unused with ``network=True``).
        network: whether ``encoder`` is a whole encoder-decoder network.
        contrast: weight of the dense cross-phase contrast (0: off, nothing extra is built or
            drawn). The loss is ``prediction + contrast * InfoNCE``.
        temperature: of the contrast's softmax.
        proj_dim: width of the contrast's projection (LayerNorm and a two-layer MLP on each
            position of the deepest encoder map; used only in pretraining, not saved with the
            network or encoder).
    """

    def __init__(
        self,
        encoder: nn.Module,
        phases: Sequence[str],
        loss: Literal["l1", "mse"] = "mse",
        decoder_dim: int = 64,
        network: bool = False,
        contrast: float = 0.0,
        temperature: float = 0.2,
        proj_dim: int = 64,
    ):
        super().__init__()
        self.phases = list(phases)
        if len(self.phases) < 2:
            raise ValueError(f"cross-phase prediction needs at least two phases, got {phases!r}")
        if loss not in ("l1", "mse"):
            raise ValueError(f"loss must be 'l1' or 'mse', got {loss!r}")
        if not contrast >= 0:
            raise ValueError(f"contrast must be a weight >= 0, got {contrast!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.contrast = float(contrast)
        self.temperature = float(temperature)
        self.loss_name = loss
        self.model_name = "cross_phase3d"
        n = len(self.phases)
        self._attach(
            encoder, network, n, decoder_dim, {"phases": self.phases, "loss": loss},
            "a cross-phase network must output one channel per phase",
        )  # fmt: skip
        _zero_output_layer(encoder if network else self, n)
        self.projector: nn.Module | None = None
        self._grids: dict[tuple[int, ...], tuple[int, ...]] = {}  # input size -> feature grid
        if self.contrast > 0:
            width = feature_dim(self.encoder)
            # per position: LayerNorm (the residual stream's scale and constant part would
            # otherwise decide the similarities), then an MLP
            self.projector = nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, width),
                nn.GELU(),
                nn.Linear(width, int(proj_dim)),
            )
            self.model_args.update(contrast=self.contrast, temperature=self.temperature)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) one phase -> (B, P, D, H, W) every phase: the input plus the
        predicted change of each phase. Most voxels do not enhance, so the output is that
        change (the enhancement map), not the image again: copying the input costs nothing, and
        what the network learns is where each organ is and how it enhances."""
        return x + self.dense_output(x)  # (B, 1, ...) broadcast over the P phases

    def _masked(
        self, pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor:
        err = (pred - target).abs() if self.loss_name == "l1" else (pred - target) ** 2
        w = present.to(err.dtype).view(*present.shape, 1, 1, 1)  # (B, P, 1, 1, 1)
        return (err * w).sum() / (w.sum() * err[0, 0].numel()).clamp_min(1.0)

    def forward(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``batch``: ``image`` (B, 1, ...), ``target`` (B, P, ...), ``present`` (B, P)."""
        x, target, present = batch["image"], batch["target"].float(), batch["present"].bool()
        n = len(self.phases)
        if x.ndim != 5 or x.shape[1] != 1 or target.shape[1] != n or present.shape[-1] != n:
            raise ValueError(
                f"expected image (B, 1, D, H, W), target (B, {n}, D, H, W) and present (B, {n}); "
                f"got {tuple(x.shape)}, {tuple(target.shape)}, {tuple(present.shape)}"
            )
        pred = self.predict(x).float()
        copy = x.float().expand_as(target)
        prediction = self._masked(pred, target, present)
        out = {
            "loss": prediction,
            "baseline_loss": self._masked(copy, target, present).detach(),
        }
        if self.projector is not None:
            phase = batch.get("phase")
            if phase is None:
                raise ValueError("contrast > 0 needs the batch's input 'phase' (B,)")
            other = self.other_phase(present, torch.as_tensor(phase).to(present.device), generator)
            view = target[torch.arange(len(x), device=x.device), other].unsqueeze(1).to(x.dtype)
            info, chance = self.dense_contrast(x, view, generator)
            out.update(
                loss=prediction + self.contrast * info,
                prediction_loss=prediction.detach(),
                contrast_loss=info.detach(),
                contrast_chance=chance,
            )
        return out

    @staticmethod
    def other_phase(
        present: torch.Tensor, phase: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per exam, a present phase other than its input ``phase``, uniformly: (B,) indices.

        Raises:
            ValueError: an exam with no second phase.
        """
        others = present.clone()
        others[torch.arange(len(phase), device=phase.device), phase.long()] = False
        if not bool(others.any(dim=1).all()):
            raise ValueError("every exam of a cross-phase batch needs a second phase present")
        u = torch.rand(others.shape, generator=generator, device="cpu").to(others.device)
        return torch.where(others, u, torch.full_like(u, -1.0)).argmax(dim=1)

    def _grid(self, size: tuple[int, ...]) -> tuple[int, ...]:
        """The deepest map's grid for an input of ``size``: probed once per size, in eval mode
        (no dropout draw, no batch-norm statistics) and without gradients."""
        cache = self._grids
        if size not in cache:
            was = self.encoder.training
            self.encoder.eval()
            with torch.no_grad():
                probe = torch.zeros((1, 1, *size), device=next(self.parameters()).device)
                cache[size] = tuple(feature_map(self.encoder, probe).shape[2:])
            self.encoder.train(was)
        return cache[size]

    def dense_contrast(
        self, a: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric InfoNCE between the projected deepest maps of two voxel-aligned phases.

        ``a``, ``b``: (B, 1, D, H, W). Each is cut to a sub-crop one feature stride smaller per
        axis, at offset 0 or one stride drawn per exam, axis and view; so a position's two
        features usually sit at different places of their grids, and a position embedding (or
        padding) cannot give the match away. Each position seen in both views is an anchor whose
        one positive is the same position in the other view; the negatives are every other
        position of the batch. Returns the loss and its chance level, log(positions of a view).

        Raises:
            ValueError: a crop less than two feature strides wide on some axis.
        """
        if self.projector is None:
            raise ValueError("dense_contrast needs a model built with contrast > 0")
        projector = self.projector
        size = tuple(a.shape[2:])
        grid = self._grid(size)
        stride = [s // g for s, g in zip(size, grid, strict=True)]
        if any(g < 2 or s % g for s, g in zip(size, grid, strict=True)):
            raise ValueError(
                f"the dense contrast needs crops of at least two whole feature strides per axis; "
                f"crop {tuple(size)} gives a {tuple(grid)} feature map"
            )
        n = a.shape[0]
        # (B, 2 views, 3 axes) offsets of 0 or 1 stride
        shift = torch.randint(0, 2, (n, 2, 3), generator=generator, device="cpu")
        sub = [s - st for s, st in zip(size, stride, strict=True)]

        def cut(x: torch.Tensor, view: int) -> torch.Tensor:
            out = []
            for i in range(n):
                o = [int(shift[i, view, k]) * stride[k] for k in range(3)]
                out.append(
                    x[i, :, o[0] : o[0] + sub[0], o[1] : o[1] + sub[1], o[2] : o[2] + sub[2]]
                )
            return torch.stack(out)

        def tokens(x: torch.Tensor) -> torch.Tensor:
            f = feature_map(self.encoder, x)  # (B, C, d, h, w)
            f = f.flatten(2).transpose(1, 2).flatten(0, 1)  # (B*L, C), in flatten order
            return F.normalize(projector(f).float(), dim=-1)  # (B*L, P)

        za, zb = tokens(cut(a, 0)), tokens(cut(b, 1))
        g = [s - 1 for s in grid]  # the sub-crop's grid: one position fewer per axis
        idx = torch.stack(
            torch.meshgrid(*[torch.arange(k) for k in g], indexing="ij"), dim=-1
        ).reshape(-1, 3)  # (L, 3) grid positions, in the order of flatten
        anchors_a, anchors_b = [], []
        for i in range(n):
            world = idx + shift[i, 0]  # a's positions in the full crop's grid
            pos_b = world - shift[i, 1]  # the same positions in b's grid
            ok = ((pos_b >= 0) & (pos_b < torch.tensor(g))).all(dim=1)
            flat_b = (pos_b[:, 0] * g[1] + pos_b[:, 1]) * g[2] + pos_b[:, 2]
            anchors_a.append(i * len(idx) + torch.nonzero(ok).squeeze(1))
            anchors_b.append(i * len(idx) + flat_b[ok])
        ia = torch.cat(anchors_a).to(za.device)
        ib = torch.cat(anchors_b).to(za.device)
        logits = za @ zb.T / self.temperature  # (B*L, B*L)
        info = 0.5 * (F.cross_entropy(logits[ia], ib) + F.cross_entropy(logits.T[ib], ia))
        chance = torch.tensor(float(np.log(len(zb))))
        return info, chance
