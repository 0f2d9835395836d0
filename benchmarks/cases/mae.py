"""MAE pretraining step: our ``MAE3D`` vs MONAI ``MaskedAutoEncoderViT``, same configuration.

Both encode only the visible 25 % of the patches (MONAI's MAE gathers them before its blocks too),
then decode all tokens; the step is forward + masked-patch MSE (per-patch normalised targets, the
same code for both) + backward; the AdamW step is identical for both and left out (timed once,
foreach and fused, as ``info.adamw_step_s``). MONAI's weights are converted into ours, so on the same
input and mask both give the same prediction (``max_abs_diff``). Differences: our attention is
``scaled_dot_product_attention`` (MONAI's ViT materialises ``softmax(q kᵀ)`` with ``einsum``); our
masking draws ``torch.rand`` + ``argsort`` (MONAI: ``torch.multinomial`` and a scatter of mask
tokens into a full-size copy); our patch embedding projects only the visible patches (one GEMM on
the gathered patches) where MONAI convolves the whole volume and discards 75 % of the tokens.
The kept tokens are the same up to float rounding. The ablation side ``ours_full_embed`` is ours
with the full convolution + gather, which isolates that saving.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from benchmarks.cases._common import eval_output, n_params, quiet, time_adamw_step, train_step
from benchmarks.harness import Case, Side

SIZES: dict[str, dict[str, Any]] = {
    # a few seconds: the harness test
    "tiny": {"img": 32, "patch": 16, "width": 48, "depth": 2, "heads": 3,
             "dec_width": 48, "dec_depth": 1, "dec_heads": 3, "batch": 1},
    "small": {"img": 64, "patch": 16, "width": 384, "depth": 12, "heads": 6,
              "dec_width": 192, "dec_depth": 4, "dec_heads": 6, "batch": 1},
    # the issue: 96³, patch 16, ViT-B, mask 0.75, batch 1; decoder = MONAI's default width,
    # depth and heads (384, 4, 12) with a 4x MLP (ours always uses 4x)
    "full": {"img": 96, "patch": 16, "width": 768, "depth": 12, "heads": 12,
             "dec_width": 384, "dec_depth": 4, "dec_heads": 12, "batch": 1},
}  # fmt: skip
MASK_RATIO = 0.75


def _monai(c: dict[str, Any]):
    from monai.networks.nets import MaskedAutoEncoderViT

    return MaskedAutoEncoderViT(
        in_channels=1, img_size=c["img"], patch_size=c["patch"], hidden_size=c["width"],
        mlp_dim=4 * c["width"], num_layers=c["depth"], num_heads=c["heads"],
        masking_ratio=MASK_RATIO, decoder_hidden_size=c["dec_width"],
        decoder_mlp_dim=4 * c["dec_width"], decoder_num_layers=c["dec_depth"],
        decoder_num_heads=c["dec_heads"], pos_embed_type="sincos",
        decoder_pos_embed_type="sincos", qkv_bias=True,
    )  # fmt: skip


def convert_monai_mae_state_dict(sd: dict[str, torch.Tensor], depth: int, dec_depth: int) -> dict:
    """MONAI ``MaskedAutoEncoderViT`` keys -> :class:`umit.ssl.mae.MAE3D` keys."""
    from umit.models.monai_compat import convert_monai_vit_state_dict

    enc = {}
    for k, v in sd.items():
        if k.startswith(("cls_token", "patch_embedding.")) or k.startswith("blocks."):
            enc[re.sub(rf"^blocks\.{depth}\.", "norm.", k)] = v
    out = {f"encoder.{k}": v for k, v in convert_monai_vit_state_dict(enc).items()}
    for k, v in sd.items():
        if k.startswith("decoder_blocks.") and "cross_attn" not in k:
            k = re.sub(rf"^decoder_blocks\.{dec_depth}\.", "decoder_norm.", k)
            for old, new in ((".attn.out_proj.", ".attn.proj."), (".mlp.linear1.", ".mlp.fc1."),
                             (".mlp.linear2.", ".mlp.fc2.")):  # fmt: skip
                k = k.replace(old, new)
            out[k] = v
        elif k.startswith(("decoder_embed.", "decoder_pred.")):
            out[k] = v
        elif k == "mask_tokens":
            out["mask_token"] = v
    return out


def _ours(c: dict[str, Any], ref=None):
    from umit.models import ViT3D
    from umit.models.monai_compat import vit3d_args_from_monai
    from umit.ssl.mae import MAE3D

    args = vit3d_args_from_monai(
        1, c["img"], c["patch"], hidden_size=c["width"], mlp_dim=4 * c["width"],
        num_layers=c["depth"], num_heads=c["heads"], pos_embed_type="sincos",
        classification=True, qkv_bias=True,
    )  # fmt: skip
    args.update(num_classes=0)
    enc = ViT3D(**args)
    mae = MAE3D(enc, 1, c["dec_width"], c["dec_depth"], c["dec_heads"], MASK_RATIO)
    mae.decoder_norm.eps = 1e-5  # MONAI's LayerNorm default (ours 1e-6): same numerics
    if ref is not None:
        sd = convert_monai_mae_state_dict(ref.state_dict(), c["depth"], c["dec_depth"])
        missing, unexpected = mae.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"MAE weight mapping: missing={missing} unexpected={unexpected}")
    return mae


def _masked_mse(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, patch) -> torch.Tensor:
    from umit.ssl.mae import patchify

    target = patchify(x, patch)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def _full_embed(self, x, grid, keep):
    """The plain path: convolve every patch, then keep the visible tokens (MONAI's order)."""
    full = self.proj(x).flatten(2).transpose(1, 2)  # (B, C, d, h, w) -> (B, L, C)
    return torch.gather(full, 1, keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]))


def _with_full_embed(fn):
    """Runs ``fn`` with the visible-patch GEMM replaced by the full convolution (the ablation)."""
    from umit.models.layers.patch_embed import PatchEmbed3d

    def run():
        saved = PatchEmbed3d._project_kept
        PatchEmbed3d._project_kept = _full_embed
        try:
            return fn()
        finally:
            PatchEmbed3d._project_kept = saved

    return run


def make(size: str = "full", device: str = "cpu") -> Case:
    c = SIZES[size]
    quiet()
    shape = (c["batch"], 1, c["img"], c["img"], c["img"])
    patch = (c["patch"],) * 3

    def build(side: str, reference_weights: bool = True) -> Side:
        torch.manual_seed(0)
        ref = _monai(c) if side == "monai" or reference_weights else None
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=gen).to(device)
        if side == "monai":
            model = ref.to(device)

            def loss() -> torch.Tensor:
                pred, mask = model(x)
                return _masked_mse(pred, x, mask.float(), patch)

            def output():
                torch.manual_seed(123)  # MONAI draws its mask with torch.multinomial
                return model(x)[0]

            return Side(train_step(model, loss), eval_output(model, output),
                        {"params": n_params(model)})  # fmt: skip
        if side not in ("ours", "ours_full_embed"):
            raise ValueError(f"unknown side {side!r}")
        mae = _ours(c, ref).to(device)
        del ref

        def output():
            from umit.ssl.masking import Masking

            torch.manual_seed(123)  # the same draw as MONAI's _masking, fed to our wrapper
            B, L = x.shape[0], mae.encoder.grid_size(x.shape[2:])
            L = L[0] * L[1] * L[2]
            keep = torch.multinomial(torch.ones(B, L), int((1 - MASK_RATIO) * L)).to(device)
            mask = torch.ones(B, L, device=device).scatter_(1, keep, 0.0)
            order = torch.cat([keep, mask.nonzero()[:, 1].view(B, -1)], 1)
            m = Masking(keep=keep, mask=mask, restore=order.argsort(1))
            grid = tuple(mae.encoder.grid_size(x.shape[2:]))
            return mae.forward_decoder(
                mae.encoder.forward_features(x, keep_indices=m.keep), m, grid
            )

        step = train_step(mae, lambda: mae(x)["loss"])
        if side == "ours_full_embed":
            return Side(_with_full_embed(step), None, {"params": n_params(mae)})
        info = {"params": n_params(mae)}
        if reference_weights:  # not in the peak-memory child: AdamW state would inflate it
            info["adamw_step_s"] = time_adamw_step(mae)
        return Side(step, eval_output(mae, output), info)  # fmt: skip

    return Case(
        name="mae",
        title="MAE pretraining step (fwd+bwd)",
        config={
            **c,
            "mask_ratio": MASK_RATIO,
            "mlp_ratio": 4,
            "input": list(shape),
            "device": device,
        },  # fmt: skip
        build=build,
        sides=("ours", "monai") if size == "tiny" else ("ours", "monai", "ours_full_embed"),
        reps={"tiny": 1, "small": 5, "full": 7}[size],
        warmup=1 if size == "tiny" else 2,
        notes=__doc__.split("\n\n", 1)[1].strip(),
    )
