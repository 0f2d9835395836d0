"""``umit explain``: where a model looks, as maps on the input's own grid.

For each input the model's saved plan is applied in memory exactly as ``umit predict`` does
(:func:`umit.preprocess.apply.apply_plan`), the model runs on one window of the store grid, and
the map computed on that window is pasted back into the store grid and mapped onto the input grid
with :func:`umit.preprocess.resample.restore_original` (nearest neighbour, as predict masks are),
so a map written with the input's affine overlays the input voxel for voxel.

Methods:

* ``attention`` (ViT encoders, UNETR, ViT classifiers): per-head and head-mean attention of one
  layer from a query token (the class token, or the token holding a voxel named in world mm),
  plus attention rollout over all layers. Token ``(a, b, c)`` of the patch grid covers window
  voxels ``[a*pd, (a+1)*pd) x ...``, so a token's value fills its patch.
* ``gradcam`` (CNNs, Swin, anything with ``feature_info``): Grad-CAM at the encoder's deepest
  level, of the predicted (or ``target_class``) logit for classifiers, or of the sum of one
  class's logits over its predicted region in the window for segmentation models.

The window: a classifier's centred input (``roi_size``, as ``umit predict`` feeds it); for a
segmentation model the ``roi_size`` window centred on the query voxel (on the image centre for
``query=cls``), shifted to lie inside the image where it fits.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from umit.config import UmitConfig, save_config
from umit.data.io import write_image
from umit.data.meta import ImageMeta
from umit.data.plan import Plan
from umit.errors import InputError, UmitError
from umit.explain.attention import (
    attention_layers,
    attention_rollout,
    record_attention,
    record_window_attention,
)
from umit.explain.gradcam import gradcam
from umit.inference.predict import find_inputs, input_name, load_channels
from umit.inference.segment import full_resolution
from umit.models.swin3d import SwinBlock3D
from umit.preprocess.apply import apply_plan
from umit.preprocess.resample import restore_original
from umit.train.checkpoint import InferenceSpec, load_model
from umit.utils.fileio import atomic_write_json

log = logging.getLogger(__name__)

Int3 = tuple[int, int, int]


class ExplainConfig(UmitConfig):
    """Settings of ``umit explain``."""

    inputs: Path
    """An image file, a DICOM series folder, or a folder of them (as ``umit predict``)."""
    model: Path
    """``best.pt`` from ``umit finetune`` (segmentation or classification; carries the plan)."""
    out: Path = Path("explain")
    """Output folder: ``<name>_<map>.nii.gz``, ``<name>_overlay.png``, ``explain.json``."""
    method: Literal["auto", "attention", "gradcam"] = "auto"
    """``attention`` for ViT-based models, ``gradcam`` otherwise; ``auto`` picks by the model."""
    query: Literal["cls"] | tuple[float, float, float] = "cls"
    """Attention query: ``cls`` (the class token) or a point ``[x, y, z]`` in world RAS+ mm
    (the input affine's coordinates, as a NIfTI viewer shows them; for LPS-minded DICOM viewers
    negate x and y). For Grad-CAM it centres the window and picks the segmentation class."""
    layer: int = -1
    """Layer of the per-head and mean maps (negatives count from the last)."""
    rollout_residual: float = Field(default=0.5, ge=0, lt=1)
    """Identity weight mixed into every layer of the rollout (the skip connection)."""
    target_class: int | str | None = None
    """Grad-CAM: class (index or name) to explain; default the predicted class (classifiers), the
    class predicted at the query voxel or else the largest predicted foreground class
    (segmentation)."""
    png: bool = True
    """Write a PNG overlay of the main map: three planes through the query (or the map's peak)."""
    device: str = "cpu"
    """``cpu`` or ``cuda[:N]``."""

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "cls":
            raise ValueError(f"query must be 'cls' or [x, y, z] in mm, got {value!r}")
        return value


# ---------------------------------------------------------------------------------------------
# windows on the store grid
# ---------------------------------------------------------------------------------------------
def centred_offset(shape: Int3, roi: Int3) -> Int3:
    """Store index of window voxel 0 for the centred crop-or-pad (``centre_crop_or_pad``)."""
    return tuple(
        (n - s) // 2 if n >= s else -((s - n) // 2) for n, s in zip(shape, roi, strict=True)
    )  # type: ignore[return-value]


def window_offset(shape: Int3, roi: Int3, centre: Int3) -> Int3:
    """Store index of window voxel 0 for a window centred on ``centre``, kept inside the image
    where the image is larger than the window, centred on the image where it is smaller."""
    out = []
    for n, s, c in zip(shape, roi, centre, strict=True):
        out.append(min(max(c - s // 2, 0), n - s) if n >= s else -((s - n) // 2))
    return tuple(out)  # type: ignore[return-value]


def read_window(image: np.ndarray, offset: Int3, roi: Int3, pad: list[float]) -> np.ndarray:
    """(C, X, Y, Z) store image -> (C, *roi) window starting at ``offset`` (padded outside)."""
    C = image.shape[0]
    out = np.empty((C, *roi), np.float32)
    for c in range(C):
        out[c] = pad[c] if c < len(pad) else 0.0
    src, dst = _overlap(image.shape[1:], offset, roi)
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out


def paste_window(window_map: np.ndarray, shape: Int3, offset: Int3) -> np.ndarray:
    """(*roi) map -> (*shape) store-grid map, zeros outside the window."""
    full = np.zeros(shape, np.float32)
    src, dst = _overlap(shape, offset, window_map.shape)
    full[tuple(src)] = window_map[tuple(dst)]
    return full


def _overlap(shape, offset, roi) -> tuple[list[slice], list[slice]]:
    """Slices of the store image (src) and of the window (dst) that overlap."""
    src, dst = [], []
    for n, o, s in zip(shape, offset, roi, strict=True):
        lo, hi = max(o, 0), min(o + s, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    return src, dst


def tokens_to_window(values: np.ndarray, grid: Int3, patch: Int3) -> np.ndarray:
    """(L,) token values in raster order -> (*grid * patch) window map, each patch filled."""
    v = values.reshape(grid)  # (d·h·w,) -> (d, h, w)
    for axis, p in enumerate(patch):
        v = np.repeat(v, p, axis=axis)
    return v


def main_map_name(maps: dict[str, np.ndarray]) -> str:
    """The map a figure shows: the rollout when there is one, else the head mean, else
    Grad-CAM."""
    return next(k for k in ("rollout", "mean", "gradcam") if k in maps)


def world_to_store(point: tuple[float, float, float], affine: np.ndarray) -> np.ndarray:
    """World RAS+ mm -> continuous store index."""
    return (np.linalg.inv(affine) @ np.array([*point, 1.0]))[:3]


# ---------------------------------------------------------------------------------------------
# the explainer
# ---------------------------------------------------------------------------------------------
class Explainer:
    """A loaded model, its plan and spec; ``explain(path)`` maps one input."""

    def __init__(
        self,
        cfg: ExplainConfig,
        model: torch.nn.Module | None = None,
        ckpt: dict[str, Any] | None = None,
    ):
        """``model`` and ``ckpt`` (from :func:`load_model` of ``cfg.model``) when the caller has
        them loaded already (``umit evaluate``'s report); else they are loaded here."""
        self.cfg = cfg
        if model is None or ckpt is None:
            model, ckpt = load_model(cfg.model)
        self.model = model
        if not ckpt.get("plan"):
            raise InputError(cfg.model, "the model file carries no preprocessing plan")
        self.plan = Plan.model_validate(ckpt["plan"])
        spec = InferenceSpec.model_validate(ckpt["spec"])
        self.task = spec.task
        self.roi: Int3 = tuple(int(s) for s in spec.roi_size)  # type: ignore[assignment]
        self.class_names = list(spec.class_names)
        self.label_names = dict(spec.label_names)
        self.device = torch.device(cfg.device)
        self.model.to(self.device).eval()
        # the task model's encoder: not the attention of a harmonising front in front of it
        self.encoder = getattr(self.model, "encoder", self.model)
        has_attn = bool(attention_layers(self.encoder))
        has_windows = any(isinstance(m, SwinBlock3D) for m in self.encoder.modules())
        method = cfg.method
        if method == "auto":
            method = "attention" if has_attn or has_windows else "gradcam"
        if method == "attention" and not (has_attn or has_windows):
            raise InputError(
                cfg.model,
                f"{ckpt.get('model_name')} has no attention layer (a CNN): use method=gradcam",
            )
        self.method = method
        self.windows = method == "attention" and not has_attn  # Swin: window attention
        if method == "attention" and not self.windows:
            self.patch: Int3 = tuple(int(p) for p in self.encoder.patch_size)  # type: ignore[assignment]
            self.prefix = int(getattr(self.encoder, "num_prefix_tokens", 0))
            if cfg.query == "cls" and self.prefix < 1:
                raise InputError(
                    cfg.model,
                    f"{ckpt.get('model_name')} has no class token: give query=[x,y,z] (mm)",
                )

    # -------------------------------------------------------------------- one input
    def explain(self, path: Path) -> tuple[dict[str, np.ndarray], ImageMeta, dict[str, Any]]:
        """One input -> (maps on the input grid, the input's meta, a summary)."""
        arrays, meta = load_channels(path, self.plan)
        image, _, geom = apply_plan(arrays, meta.affine, self.plan, source=path)
        del arrays
        shape: Int3 = tuple(image.shape[1:])  # type: ignore[assignment]
        store_affine = np.asarray(geom["affine"])
        q_store = None
        if self.cfg.query != "cls":
            q_store = np.rint(world_to_store(self.cfg.query, store_affine)).astype(int)
            if np.any(q_store < 0) or np.any(q_store >= np.array(shape)):
                raise InputError(
                    path,
                    f"query {list(self.cfg.query)} mm lies outside the preprocessed image "
                    f"(store voxel {q_store.tolist()}, shape {list(shape)})",
                )
        win_maps, info, offset = self.explain_store(
            image, geom["pad_values"], q_store, source=path, query_text=f"{list(self.cfg.query)} mm"
        )
        maps = {}
        for name, m in win_maps.items():
            if m.ndim == 4:  # (heads, *roi) -> (i, j, k, heads)
                per = [restore_original(paste_window(h, shape, offset), geom)[0] for h in m]
                maps[name] = np.stack(per, axis=-1)
            else:
                maps[name] = restore_original(paste_window(m, shape, offset), geom)[0]
        main = maps[main_map_name(maps)]
        peak_idx = np.unravel_index(int(np.argmax(main)), main.shape)
        peak_world = (meta.affine @ np.array([*peak_idx, 1.0]))[:3]
        info.update(
            window_offset=list(offset),
            peak_voxel=[int(i) for i in peak_idx],
            peak_mm=[round(float(v), 3) for v in peak_world],
        )
        if q_store is not None:
            q_in = np.rint(np.linalg.inv(meta.affine) @ np.array([*self.cfg.query, 1.0]))[:3]
            info["query_voxel"] = [int(v) for v in q_in]
        return maps, meta, info

    def explain_store(
        self,
        image: np.ndarray,
        pad_values: list[float],
        q_store: np.ndarray | None = None,
        source: Path | str = "image",
        query_text: str | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any], Int3]:
        """Maps of one preprocessed image ``(C, X, Y, Z)`` on the store grid (a store case, or
        an input after ``apply_plan``), for the query voxel ``q_store`` (store index; None: the
        class token, or the image centre for a segmentation window).

        Returns:
            ``(maps on the model's window, info, the window's offset in the store grid)``: the
            maps are ``(*roi)`` (or ``(heads, *roi)`` for ``heads``); :func:`paste_window` puts
            them on the store grid.
        """
        shape: Int3 = tuple(image.shape[1:])  # type: ignore[assignment]
        if self.task == "classification":
            offset = centred_offset(shape, self.roi)
        else:
            centre = tuple(q_store) if q_store is not None else tuple(n // 2 for n in shape)
            offset = window_offset(shape, self.roi, centre)  # type: ignore[arg-type]
        q_win = None if q_store is None else np.asarray(q_store) - np.array(offset)
        if q_win is not None and (np.any(q_win < 0) or np.any(q_win >= np.array(self.roi))):
            raise InputError(
                source,
                f"query {query_text or f'voxel {np.asarray(q_store).tolist()}'} lies outside "
                f"the classifier's centred {list(self.roi)} input",
            )
        window = read_window(image, offset, self.roi, pad_values)
        x = torch.from_numpy(window)[None].to(self.device)
        if self.method == "attention" and self.windows:
            win_maps, info = self._window_attention(x, q_win)
        elif self.method == "attention":
            win_maps, info = self._attention(x, q_win)
        else:
            win_maps, info = self._gradcam(x, q_win)
        return win_maps, info, offset

    def _attention(
        self, x: torch.Tensor, q_win: np.ndarray | None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        grid: Int3 = tuple(int(n) for n in self.encoder.grid_size(x.shape[2:]))  # type: ignore[assignment]
        with torch.no_grad(), record_attention(self.encoder) as attn:
            self.model(x)
        n_tokens = self.prefix + int(np.prod(grid))
        attn = [a for a in attn if a.shape[-1] == n_tokens]  # the encoder's layers only
        if not attn:
            raise UmitError(f"no attention over {n_tokens} tokens was recorded")
        if q_win is None:
            q = 0
        else:
            t = tuple(int(v) // p for v, p in zip(q_win, self.patch, strict=True))
            q = self.prefix + (t[0] * grid[1] + t[1]) * grid[2] + t[2]
        layer = self.cfg.layer
        if not -len(attn) <= layer < len(attn):
            raise ValueError(f"layer={layer} out of range for {len(attn)} attention layers")
        a = attn[layer][0, :, q, self.prefix :].cpu().numpy()  # (heads, L) from query q
        roll = attention_rollout(attn, self.cfg.rollout_residual)[0, q, self.prefix :]
        roll = roll / roll.sum()
        maps = {
            "heads": np.stack([tokens_to_window(h, grid, self.patch) for h in a]),
            "mean": tokens_to_window(a.mean(0), grid, self.patch),
            "rollout": tokens_to_window(roll.cpu().numpy(), grid, self.patch),
        }
        info = {
            "method": "attention",
            "query_token": int(q),
            "layers": len(attn),
            "heads": int(a.shape[0]),
            "token_grid": list(grid),
            "patch": list(self.patch),
        }
        return maps, info

    def _window_attention(
        self, x: torch.Tensor, q_win: np.ndarray | None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Swin: each block's window attention (received, or the query token's row) on its token
        grid, resampled (nearest) to the window; ``mean`` over blocks and heads, ``heads`` of
        block ``layer``."""
        import torch.nn.functional as F

        query = None
        if q_win is not None:
            query = tuple((float(v) + 0.5) / n for v, n in zip(q_win, self.roi, strict=True))
        with torch.no_grad(), record_window_attention(self.encoder, query) as maps:
            self.model(x)
        layer = self.cfg.layer
        if not -len(maps) <= layer < len(maps):
            raise ValueError(f"layer={layer} out of range for {len(maps)} Swin blocks")
        up = [F.interpolate(m, size=self.roi, mode="nearest")[0] for m in maps]  # (heads, *roi)
        mean = torch.stack([u.mean(0) for u in up]).mean(0)
        out = {"heads": up[layer].cpu().numpy(), "mean": mean.cpu().numpy()}
        info = {
            "method": "window_attention",
            "query": "received" if query is None else "query_row",
            "layers": len(maps),
            "heads": int(up[layer].shape[0]),
            "token_grids": [list(m.shape[2:]) for m in maps],
        }
        return out, info

    def _gradcam(
        self, x: torch.Tensor, q_win: np.ndarray | None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        with torch.no_grad():
            out = full_resolution(self.model(x)).float()
        target = self._target_class(out, q_win)
        if self.task == "classification":

            def score(o):
                return full_resolution(o)[0, target]

        else:
            region = (out.argmax(1)[0] == target).float()
            if region.sum() == 0:  # nothing predicted: explain the class logit everywhere
                region = torch.ones_like(region)

            def score(o):
                return (full_resolution(o)[0, target] * region).sum()

        cam, _ = gradcam(self.model, x, score)
        return {"gradcam": cam.cpu().numpy()}, {"method": "gradcam", "target_class": target}

    def _target_class(self, out: torch.Tensor, q_win: np.ndarray | None) -> int:
        t = self.cfg.target_class
        names = self.class_names if self.task == "classification" else self.label_names
        if isinstance(t, str):
            lookup = {n: i for i, n in enumerate(names)} if isinstance(names, list) else names
            if t not in lookup:
                raise ValueError(f"target_class {t!r} is not one of {list(lookup)}")
            return int(lookup[t])
        if t is not None:
            if not 0 <= t < out.shape[1]:
                raise ValueError(f"target_class={t} out of range for {out.shape[1]} outputs")
            return int(t)
        if self.task == "classification":
            return int(out[0].argmax())
        pred = out.argmax(1)[0]
        if q_win is not None and int(pred[tuple(int(v) for v in q_win)]) > 0:
            return int(pred[tuple(int(v) for v in q_win)])
        counts = torch.bincount(pred.flatten(), minlength=out.shape[1])
        counts[0] = 0
        return int(counts.argmax()) if counts.sum() > 0 else 1


# ---------------------------------------------------------------------------------------------
# figures and the command
# ---------------------------------------------------------------------------------------------
def overlay_png(
    path: Path,
    image: np.ndarray,
    heat: np.ndarray,
    centre: tuple[int, int, int],
    title: str,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Path:
    """Three planes through ``centre`` (input voxel index): the image in grey, the map on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from umit.utils.fileio import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    vmax = float(heat.max()) or 1.0
    for ax, axis, name in zip(axes, range(3), ("i", "j", "k"), strict=True):
        sl = [slice(None)] * 3
        sl[axis] = int(centre[axis])
        img, hm = image[tuple(sl)].T, heat[tuple(sl)].T
        rest = [a for a in range(3) if a != axis]
        aspect = spacing[rest[1]] / spacing[rest[0]]  # rows are axis rest[1]
        ax.imshow(img, cmap="gray", origin="lower", aspect=aspect)
        ax.imshow(np.ma.masked_less_equal(hm, 0), cmap="jet", alpha=0.45, origin="lower",
                  vmin=0, vmax=vmax, aspect=aspect)  # fmt: skip
        ax.plot(centre[rest[0]], centre[rest[1]], "w+", ms=12)
        ax.set_title(f"{name} = {centre[axis]}")
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


def run(cfg: ExplainConfig) -> dict[str, Any]:
    """Explain every input; returns a summary (outputs, failures, seconds).

    Raises:
        InputError: a missing input or model, or a model that cannot be explained as asked.
        ValueError: a bad setting.
    """
    inputs = find_inputs(cfg.inputs)
    explainer = Explainer(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out, "explain_config.yaml")
    outputs, failures = [], {}
    t0 = time.perf_counter()
    for path in inputs:
        name = input_name(path)
        try:
            maps, meta, info = explainer.explain(path)
        except (UmitError, ValueError, OSError) as exc:
            failures[str(path)] = str(exc)
            log.error("explain: %s failed: %s", path, exc)
            continue
        row: dict[str, Any] = {"input": str(path), **info, "maps": {}}
        for kind, m in maps.items():
            target = cfg.out / f"{name}_{kind}.nii.gz"
            write_image(target, m.astype(np.float32), meta)
            row["maps"][kind] = str(target)
        if cfg.png:
            main = main_map_name(maps)
            centre = tuple(info.get("query_voxel") or info["peak_voxel"])
            arrays, meta_in = load_channels(path, explainer.plan)
            spacing = tuple(float(v) for v in np.linalg.norm(meta_in.affine[:3, :3], axis=0))
            shape = np.array(arrays[0].shape)
            centre = tuple(int(c) for c in np.clip(centre, 0, shape - 1))
            png = overlay_png(
                cfg.out / f"{name}_overlay.png", arrays[0], maps[main], centre,
                f"{name}: {main} ({explainer.method}), query {cfg.query}", spacing,
            )  # fmt: skip
            row["png"] = str(png)
        outputs.append(row)
    summary = {
        "method": explainer.method,
        "outputs": outputs,
        "failures": failures,
        "seconds": round(time.perf_counter() - t0, 3),
        "out": str(cfg.out),
    }
    atomic_write_json(cfg.out / "explain.json", summary)
    return summary
