"""Print the iRPE model zoo table (Markdown, or JSON with ``--json``), computed from our models.

#Params and MACs are counted on the meta device (no memory, no weights), for one 224x224 image:

* ``#Params(M)``: every parameter, iRPE lookup tables included.
* ``MACs(M)``: multiply-accumulates of the convolution, linear layers and matrix products, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2), patch embedding and head included, with the iRPE
  terms counted as the original implementation computes them: ``q @ table`` (``H * L * d * nb`` per encoding on
  queries/keys) and, on values, the product of the attention with the materialised ``(L, L, d)`` table
  (``H * L * L * d``). Element-wise work (LayerNorm, softmax, GELU, the lookups) is not counted, which is why these
  figures come out 0.2-0.6 % below the published ones.
* ``MACs ours(M)``: what this implementation actually multiplies. It differs only for encodings on values, which
  sum the attention per bucket first and then multiply ``(L, nb) @ (nb, d)`` (``H * L * nb * d``).

Published #Params, MACs and top-1/top-5 come from ``rpe_models.MODEL_ZOO`` (the original authors' ImageNet-1k
results); the plain DeiT-T/S/B rows (``--baselines``) are timm's own ``deit_*`` models. Usage:
``python tools/model_zoo.py [--json] [--baselines]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import Attention
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import irpe  # noqa: E402
import rpe_models  # noqa: E402

BASELINES = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")


def build_on_meta(name: str) -> nn.Module:
    """Build the zoo model or timm baseline ``name`` on the meta device (shapes only)."""
    # MACs are counted on the paper's explicit attention ('math'): a fused kernel is one opaque op to the counter.
    with torch.device("meta"):
        if name in rpe_models.MODEL_ZOO:
            return rpe_models.create_irpe_deit(name, attn_impl="math")
        if name in BASELINES:
            model = timm.create_model(name)
            for module in model.modules():
                if isinstance(module, Attention):
                    module.fused_attn = False  # timm's explicit q @ k^T and attn @ v
            return model
    raise ValueError(f"unknown model {name!r}")


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def _value_encodings(model: nn.Module) -> list[irpe.iRPE]:
    """Every single-table iRPE module on values (a cross encoding has two)."""
    return [m for m in model.modules() if isinstance(m, irpe.iRPE) and not m.transposed]


def count_macs(model: nn.Module, img_size: tuple[int, int] = (224, 224)) -> tuple[int, int]:
    """MACs of one image through ``model``: ``(original convention, ours)`` (see the module docstring).

    Args:
        model: a model on the meta device (or any device; a real forward then runs).
        img_size: ``(height, width)`` of the image.
    """
    device = model.cls_token.device
    x = torch.empty(1, model.patch_embed.proj.in_channels, *img_size, device=device)  # (1, C, H_img, W_img)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    ours = counter.get_total_flops() // 2
    grid_h, grid_w = img_size[0] // model.patch_embed.patch_size[0], img_size[1] // model.patch_embed.patch_size[1]
    L = model.num_prefix_tokens + grid_h * grid_w
    original = ours
    for module in _value_encodings(model):
        heads = model.blocks[0].attn.num_heads
        d = module.head_dim
        # ours: (1, H, L, nb) @ (Hm, nb, d); original: (1, H, L, L) x (L, L, d) with the table materialised
        original += heads * L * L * d - heads * L * module.num_buckets * d
    return original, ours


def _rpe_marks(name: str) -> tuple[str, str, str]:
    if name not in rpe_models.MODEL_ZOO:
        return "", "", ""
    on = rpe_models.MODEL_ZOO[name].rpe_on
    return tuple("✔" if w in on else "" for w in "qkv")


def zoo_rows(names: Sequence[str] | None = None, baselines: bool = False) -> list[dict[str, Any]]:
    """One dict per model with our counts and the published figures.

    Args:
        names: models to include; default: all of :data:`rpe_models.MODEL_ZOO` (plus the 224 baselines if
            ``baselines``).
        baselines: add the plain DeiT-T/S/B rows when ``names`` is not given.
    """
    if names is None:
        names = list(rpe_models.MODEL_ZOO)
        if baselines:
            names = [*BASELINES, *names]
    rows = []
    for name in names:
        model = build_on_meta(name)
        params = count_params(model)
        macs, macs_ours = count_macs(model)
        entry = rpe_models.MODEL_ZOO.get(name)
        rpe_q, rpe_k, rpe_v = _rpe_marks(name)
        rows.append(
            {
                "name": name,
                "rpe_q": bool(rpe_q),
                "rpe_k": bool(rpe_k),
                "rpe_v": bool(rpe_v),
                "params": params,
                "params_m": round(params / 1e6, 2),
                "macs": macs,
                "macs_m": round(macs / 1e6, 1),
                "macs_ours_m": round(macs_ours / 1e6, 1),
                "released": entry.released if entry else True,
                "checkpoint": (rpe_models.MODEL_ZOO_URL + f"{name}.pth") if entry else _timm_url(name),
                "published_params_m": entry.params_m if entry else None,
                "published_macs_m": entry.macs_m if entry else None,
                "top1": entry.top1 if entry else None,
                "top5": entry.top5 if entry else None,
                "source": rpe_models.PUBLISHED_SOURCE if entry and entry.top1 is not None else None,
            }
        )
    return rows


def _timm_url(name: str) -> str:
    """The release URL in timm's pretrained cfg of ``name`` (DeiT's own file)."""
    return timm.models.get_pretrained_cfg(name).url


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table with a note on conventions and sources."""
    header = (
        "| Model | RPE-Q | RPE-K | RPE-V | #Params(M) | MACs(M) | MACs ours(M) | published #Params(M) / MACs(M) "
        "| Top-1 (%) | Top-5 (%) | Checkpoint |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        published = f"{_fmt(r['published_params_m'], '.2f')} / {_fmt(r['published_macs_m'], 'd')}"
        mark = {True: "✔", False: ""}
        lines.append(
            f"| {r['name']} | {mark[r['rpe_q']]} | {mark[r['rpe_k']]} | {mark[r['rpe_v']]} | {r['params_m']:.2f} "
            f"| {r['macs_m']:.0f} | {r['macs_ours_m']:.0f} | {published} | {_fmt(r['top1'], '.1f')} "
            f"| {_fmt(r['top5'], '.1f')} | {'released' if r['released'] else '-'} |"
        )
    lines += [
        "",
        "MACs for one 224x224 image: convolution, linear layers and matrix products (iRPE terms as the original "
        "computes them); 'MACs ours' is what this implementation multiplies (cheaper iRPE on values).",
        f"Published figures and Top-1/Top-5: {rpe_models.PUBLISHED_SOURCE}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of Markdown")
    parser.add_argument("--baselines", action="store_true", help="add the plain DeiT-T/S/B rows")
    parser.add_argument("models", nargs="*", help="only these models (default: the whole zoo)")
    args = parser.parse_args(argv)
    rows = zoo_rows(args.models or None, baselines=args.baselines)
    print(json.dumps(rows, indent=2) if args.json else format_markdown(rows))


if __name__ == "__main__":
    main()
