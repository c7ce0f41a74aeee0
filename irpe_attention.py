"""Attention with iRPE: the paper's formulation and fused, memory-efficient paths.

:func:`rpe_attention` computes ``softmax(q k^T * scale + rpe_k + rpe_q^T) @ v + rpe_v`` for the encoding modules of
``irpe.py`` (``build_rpe``), along one of these paths (see :func:`resolve_attn_impl`):

* ``'math'``: the paper's explicit formulation through the modules' own ``forward``; keeps the ``(B, H, L, L)``
  probabilities for backward. The reference, and the path of attention dropout.
* ``'sdpa'``: PyTorch's fused ``scaled_dot_product_attention`` with the bias as a constant mask, encodings on values
  and the backward from probabilities recomputed block by block of query rows: nothing ``L x L`` is kept.
* ``'flex'``: FlexAttention with a ``score_mod`` (queries and keys only; compiled on CUDA).
* ``'ops'``: the fused CPU kernel of ``rpe_ops`` (CPU's default where it is built).
* ``'triton'``: a flash-attention kernel in Triton (``rpe_ops/triton_attention.py``) that gathers the terms inside its
  tiles, values terms included; CUDA's default where Triton imports (CPU only under ``TRITON_INTERPRET=1``).

The fused paths take each encoding's weight and bucket ids from the modules (``fused_terms``). Inside ``with
rpe_ops.disabled():`` no path runs compiled code of ``rpe_ops``. Copy this file with ``irpe.py``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.attention.flex_attention import flex_attention
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import irpe
from irpe import FusedTerm, iRPE, iRPE_Cross, rpe_bucket_sum, rpe_index

__all__ = ["ATTN_IMPLS", "RPEMultiheadAttention", "resolve_attn_impl", "rpe_attention"]

ATTN_IMPLS = ("auto", "math", "sdpa", "flex", "ops", "triton")


def autocast_disabled(device_type: str):
    """Autocast off for ``device_type`` (the fused paths manage their dtypes themselves); a no-op where autocast does
    not exist (the meta device) or is off already (no autocast region, which torch.export.load would reject)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _term_table(term: FusedTerm, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-row bucket values of a term of :func:`rpe_attention` (a query term is looked up with the keys)."""
    return irpe.per_row_table(term.weight, term.is_bias, k if term.is_query else q, scale)


def _bias_rows(terms: Sequence[FusedTerm], tables: Sequence[torch.Tensor], i0: int, i1: int) -> torch.Tensor | None:
    """Rows ``i0:i1`` of the additive logit bias of all terms, ``(b|1, H|1, i1 - i0, Lk)``, from the terms' per-row
    tables (:func:`_term_table`); ``None`` without terms."""
    bias = None
    for term, table in zip(terms, tables):
        if term.is_query:  # looked up with the keys: (b, H, Lk, rows), transposed onto the logits
            part = rpe_index(table, term.index[:, i0:i1].contiguous()).transpose(2, 3)
        else:
            part = rpe_index(table[:, :, i0:i1], term.index[i0:i1])
        bias = part if bias is None else bias + part
    return bias


# Work tensors of the sdpa path (a batch slice, or a block of its query rows, of the (B, H, L, L) logits) hold about
# this many bytes: this bounds the memory of the temporaries (and keeps them closer to the caches) while keeping the
# kernels large.
_FUSED_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}  # other devices: as CUDA


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are recomputed in float32 (softmax and its backward are sensitive to rounding)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _batch_chunks(q: torch.Tensor) -> list[tuple[int, int]]:
    """Slices ``(b0, b1)`` of the batch whose ``(b1 - b0, H, L, L)`` work tensors (in the work dtype) fit the chunk
    size; at least one sample each."""
    B, H, L, _ = q.shape
    if torch.compiler.is_compiling():
        return [(0, B)]  # one slice: a loop over a symbolic batch would fix it to the traced size
    per_sample = H * L * L * _work_dtype(q.dtype).itemsize
    step = max(1, _FUSED_CHUNK_BYTES.get(q.device.type, 256 << 20) // max(per_sample, 1))
    return [(start, min(start + step, B)) for start in range(0, B, step)]


def _row_blocks(q: torch.Tensor, batch: int, num_keys: int) -> list[tuple[int, int]]:
    """Blocks ``(i0, i1)`` of query rows whose ``(batch, H, i1 - i0, num_keys)`` work tensors fit the chunk size: all
    rows at once unless a single sample's logits exceed it (large L)."""
    H, L = q.size(1), q.size(2)
    per_row = batch * H * num_keys * _work_dtype(q.dtype).itemsize
    rows = max(1, _FUSED_CHUNK_BYTES.get(q.device.type, 256 << 20) // max(per_row, 1))
    return [(start, min(start + rows, L)) for start in range(0, L, rows)]


def _table_backward(
    term: FusedTerm, grad_table: torch.Tensor, x: torch.Tensor, scale: float, grad_weight: torch.Tensor
) -> torch.Tensor | None:
    """Back through :func:`_term_table` from its gradient ``grad_table`` ``(b, H, L, nb)`` (or anything that sums to
    a bias' shape): adds the weight's gradient to ``grad_weight`` and returns that of ``x`` ``(b, H, L, d)``, the
    tensor the table was computed from (``None`` for a bias term, whose table does not depend on ``x``)."""
    if term.is_bias:
        Hm, nb = term.weight.shape
        grad_weight += grad_table.sum_to_size(1, Hm, 1, nb).view(Hm, nb)
        return None
    dx = torch.matmul(grad_table, (term.weight * scale).transpose(-2, -1))  # (b, H, L, d)
    grad_w = torch.matmul(x.transpose(-2, -1), grad_table).mul_(scale)  # (b, H, d, nb)
    grad_weight += grad_w.sum(0).sum_to_size(term.weight.shape)
    return dx


def _additive_mask(
    key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor
) -> torch.Tensor | None:
    """The masks of :func:`rpe_attention` (shapes there; ``q, k`` give them and the device) as one additive mask
    ``(B|1, H|1, Lq|1, Lk)`` for the logits, or ``None``.

    A bool True (a key a query may not attend to) becomes ``-inf``; a float mask is added as it is. A key padding mask
    alone gives ``(B, 1, 1, Lk)``: nothing ``Lq x Lk`` is allocated for it. The result is a constant (detached), in
    the dtype the paths compute in (float32 for half types: the sum of two masks then rounds once).

    Raises:
        ValueError: a mask of another shape, dtype or device.
    """
    B, H, Lq, Lk = q.size(0), q.size(1), q.size(2), k.size(2)
    parts = []
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, Lk):
            raise ValueError(
                f"key_padding_mask must have shape (batch, keys) = ({B}, {Lk}), got {tuple(key_padding_mask.shape)}"
            )
        parts.append(("key_padding_mask", key_padding_mask.view(B, 1, 1, Lk)))
    if attn_mask is not None:
        full = (B, H, Lq, Lk)
        if attn_mask.dim() == 2 and attn_mask.shape == (Lq, Lk):
            attn_mask = attn_mask.view(1, 1, Lq, Lk)
        elif attn_mask.dim() != 4 or any(n not in (1, m) for n, m in zip(attn_mask.shape, full)):
            raise ValueError(
                f"attn_mask must have shape (queries, keys) = ({Lq}, {Lk}) or one broadcastable to (batch, heads, "
                f"queries, keys) = {full} (each size 1 or full), got {tuple(attn_mask.shape)}; nn.MultiheadAttention's "
                "(batch * heads, queries, keys) reshapes to the latter"
            )
        parts.append(("attn_mask", attn_mask.expand(*attn_mask.shape[:3], Lk)))
    mask = None
    for name, part in parts:
        if part.dtype != torch.bool and not part.is_floating_point():
            raise ValueError(
                f"{name} must be bool (True: masked, as nn.MultiheadAttention) or floating point (added to the "
                f"logits), got {part.dtype}"
            )
        if part.device != q.device:
            raise ValueError(f"the masks must be on the device of the queries ({q.device}), got {part.device}")
        part = part.detach()
        if part.dtype == torch.bool:
            part = torch.zeros(part.shape, dtype=_work_dtype(q.dtype), device=q.device).masked_fill_(
                part, float("-inf")
            )
        else:
            part = part.to(_work_dtype(q.dtype))
        mask = part if mask is None else mask + part
    return mask


def _mask_slice(mask: torch.Tensor | None, dim: int, start: int, stop: int) -> torch.Tensor | None:
    """Entries ``start:stop`` of an additive mask ``(B|1, H|1, Lq|1, Lk)`` along ``dim`` (0: samples, 2: query
    rows); all of it where it broadcasts along ``dim``."""
    return mask if mask is None or mask.size(dim) == 1 else mask.narrow(dim, start, stop - start)


def _masked_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the keys where a row whose logits are all ``-inf`` (every key masked) gives zeros, not NaN: what
    ``F.scaled_dot_product_attention`` gives such a row, and no NaN for its gradients either."""
    dead = logits.amax(-1, keepdim=True) == float("-inf")  # (..., rows, 1)
    return torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


class _RPEBiasAttention(torch.autograd.Function):
    """Attention with the iRPE terms, fused and memory-efficient: ``P @ v + sum_u bucket_sum(P, index_u) @ W_u`` with
    ``P = softmax(q k^T * scale + bias + mask)``, ``bias`` from the terms on queries and keys, ``mask`` an additive
    attention mask (:func:`_additive_mask`, or ``None``), ``W_u`` the encodings on values. A row whose keys are all
    masked gives zeros (as PyTorch's fused attention), and zero gradients.

    The forward runs PyTorch's fused ``scaled_dot_product_attention`` with the bias as a constant mask, batch slice
    by batch slice, for ``P @ v``; with encodings on values it recomputes ``P`` block by block of query rows (complete
    rows: each block is exact) and adds its bucket sums times ``W_u``. Only ``q, k, v`` and the output are kept for
    backward, which recomputes the tables (``q @ W``, small), the bias and the probabilities block by block (as flash
    attention does) and gives the encodings' gradients through bucket sums of the logits' gradient (q/k terms) and of
    the probabilities (values terms). The temporaries of either pass are bounded by ``_FUSED_CHUNK_BYTES``.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, kinds: tuple, num_values: int, mask: torch.Tensor | None, *tensors):
        """``kinds``: ``(is_bias, is_query)`` of each term on queries and keys; ``tensors``: the weight and the ids
        of each of these terms, then of each of the ``num_values`` terms on values."""
        work = _work_dtype(q.dtype)
        terms, value_terms = _RPEBiasAttention.terms(kinds, num_values, tensors, work)
        outs = []
        with autocast_disabled(q.device.type), torch.no_grad():
            for b0, b1 in _batch_chunks(q):
                qc, kc = q[b0:b1], k[b0:b1]
                qw, kw = qc.to(work), kc.to(work)
                tables = [_term_table(term, qw, kw, scale) for term in terms]
                bias = _bias_rows(terms, tables, 0, q.size(2))  # (b|1, H|1, L, L)
                mc = _mask_slice(mask, 0, b0, b1)  # (b|1, H|1, L|1, L)
                if mc is not None:
                    bias = mc if bias is None else bias + mc
                sdpa_mask = None if bias is None else bias.to(q.dtype)
                out = nn.functional.scaled_dot_product_attention(qc, kc, v[b0:b1], attn_mask=sdpa_mask, scale=scale)
                if mc is not None:  # rows with every key masked: zeros, whichever convention SDPA's kernel follows
                    out = out.masked_fill((mc == float("-inf")).all(-1, keepdim=True), 0.0)
                if value_terms:
                    out = out.to(work)
                    for i0, i1 in _row_blocks(q, b1 - b0, k.size(2)):
                        logits = torch.matmul(qw[:, :, i0:i1], kw.transpose(-2, -1)).mul_(scale)  # (b, H, rows, L)
                        if bias is not None:
                            logits += _mask_slice(bias, 2, i0, i1)
                        probs = torch.softmax(logits, dim=-1) if mask is None else _masked_softmax(logits)
                        for term in value_terms:  # the modules' own formula, on these rows of the probabilities
                            out[:, :, i0:i1] += irpe.encode_values(probs, term.index[i0:i1], term.weight)
                    out = out.to(q.dtype)
                outs.append(out)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        ctx.save_for_backward(q, k, v, out, mask, *tensors)
        ctx.scale, ctx.kinds, ctx.num_values = scale, kinds, num_values
        ctx.disabled = irpe.rpe_ops is not None and irpe.rpe_ops.is_disabled()  # the backward runs as this forward
        return out

    @staticmethod
    def terms(kinds: tuple, num_values: int, tensors, work: torch.dtype) -> tuple[list[FusedTerm], list[FusedTerm]]:
        """The terms on queries and keys and those on values from :meth:`forward`'s arguments, weights in ``work``."""
        all_kinds = (*kinds, *[(False, False)] * num_values)
        terms = [FusedTerm(w.to(work), i, *kind) for w, i, kind in zip(tensors[0::2], tensors[1::2], all_kinds)]
        return terms[: len(kinds)], terms[len(kinds) :]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, mask, *saved = ctx.saved_tensors
        work, scale = _work_dtype(q.dtype), ctx.scale
        terms, value_terms = _RPEBiasAttention.terms(ctx.kinds, ctx.num_values, saved, work)
        grads_qkv = []
        grad_weights = [torch.zeros_like(term.weight) for term in terms]
        grad_value_weights = [torch.zeros_like(term.weight) for term in value_terms]
        disabled = irpe.rpe_ops.disabled() if ctx.disabled else contextlib.nullcontext()
        with autocast_disabled(q.device.type), disabled:
            for b0, b1 in _batch_chunks(q):
                qc, kc, vc = (t[b0:b1].to(work) for t in (q, k, v))
                oc, gc = out[b0:b1].to(work), grad_out[b0:b1].to(work)
                mc = _mask_slice(mask, 0, b0, b1)
                tables = [_term_table(term, qc, kc, scale) for term in terms]  # (b|1, H|Hm, L, nb), small
                dq = torch.empty_like(qc)
                dk, dv = torch.zeros_like(kc), torch.zeros_like(vc)
                query_grad_tables: dict[int, torch.Tensor] = {}  # query terms: summed over the row blocks
                for i0, i1 in _row_blocks(q, b1 - b0, k.size(2)):
                    qb, gb = qc[:, :, i0:i1], gc[:, :, i0:i1]
                    logits = torch.matmul(qb, kc.transpose(-2, -1)).mul_(scale)  # (b, H, rows, L)
                    bias = _bias_rows(terms, tables, i0, i1)
                    if bias is not None:
                        logits += bias
                    if mc is not None:
                        logits += _mask_slice(mc, 2, i0, i1)
                    probs = torch.softmax(logits, dim=-1) if mc is None else _masked_softmax(logits)
                    del logits, bias
                    # rowsum(P * dP) = dO . O, O including the values terms (their dP is dO . W_u[bucket])
                    delta = (gb * oc[:, :, i0:i1]).sum(-1, keepdim=True)  # (b, H, rows, 1)
                    grad_probs = torch.matmul(gb, vc.transpose(-2, -1))  # (b, H, rows, L)
                    for term, grad_weight in zip(value_terms, grad_value_weights):
                        index = term.index[i0:i1]
                        grad_probs += rpe_index(torch.matmul(gb, term.weight.transpose(-2, -1)), index)
                        sums = rpe_bucket_sum(probs, index, term.weight.size(1))  # (b, H, rows, nb)
                        grad_weight += torch.matmul(sums.transpose(-2, -1), gb).sum(0).sum_to_size(grad_weight.shape)
                    grad_logits = grad_probs.sub_(delta).mul_(probs)  # (b, H, rows, L)
                    dv += torch.matmul(probs.transpose(-2, -1), gb)
                    del probs
                    dq[:, :, i0:i1] = torch.matmul(grad_logits, kc).mul_(scale)
                    dk += torch.matmul(grad_logits.transpose(-2, -1), qb).mul_(scale)
                    for t, (term, grad_weight) in enumerate(zip(terms, grad_weights)):
                        nb = term.weight.size(-1)
                        g = grad_logits.transpose(2, 3) if term.is_query else grad_logits
                        if term.is_bias:  # the table is the bias row repeated over batch (and heads when shared)
                            g = g.sum_to_size(1, term.weight.size(0), *g.shape[2:])
                        if term.is_query:  # the table's rows are the keys: its gradient sums over the row blocks
                            grad_table = rpe_bucket_sum(g, term.index[:, i0:i1].contiguous(), nb)  # (b|1, H|Hm, L, nb)
                            query_grad_tables[t] = query_grad_tables.get(t, 0) + grad_table
                            continue
                        grad_table = rpe_bucket_sum(g, term.index[i0:i1], nb)  # (b|1, H|Hm, rows, nb)
                        dx = _table_backward(term, grad_table, qb, scale, grad_weight)
                        if dx is not None:
                            dq[:, :, i0:i1] += dx
                for t, grad_table in query_grad_tables.items():
                    dx = _table_backward(terms[t], grad_table, kc, scale, grad_weights[t])
                    if dx is not None:
                        dk += dx
                grads_qkv.append((dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)))
        grad_q, grad_k, grad_v = grads_qkv[0] if len(grads_qkv) == 1 else (torch.cat(g) for g in zip(*grads_qkv))
        grad_tensors = [None] * len(saved)  # the weights' gradients; the ids have none
        grad_tensors[0::2] = [g.to(w.dtype) for g, w in zip(grad_weights + grad_value_weights, saved[0::2])]
        return grad_q, grad_k, grad_v, None, None, None, None, *grad_tensors  # scale, kinds, num_values, mask: none


@functools.cache
def _flex_attention(device_type: str):
    """FlexAttention: compiled on CUDA (it is only fast compiled; once per process), eager elsewhere."""
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def _flex_rpe_attention(q, k, v, scale: float, terms: Sequence[FusedTerm], mask: torch.Tensor | None) -> torch.Tensor:
    """FlexAttention whose ``score_mod`` adds ``table[b, h, i, index[i, j]]`` (and ``mask[b, h, i, j]``, an additive
    mask ``(B|1, H|1, L|1, L)``): no ``L x L`` bias ever exists. A row whose keys are all masked gives zeros."""
    tables = [_term_table(term, q, k, scale) for term in terms]  # (B|1, H|1, L, nb), differentiable

    def pick(table: torch.Tensor, b, h):
        return table[b if table.size(0) > 1 else 0, h if table.size(1) > 1 else 0]

    def score_mod(score, b, h, q_idx, kv_idx):
        for term, table in zip(terms, tables):
            if term.is_query:
                score = score + pick(table, b, h)[kv_idx, term.index[kv_idx, q_idx]]
            else:
                score = score + pick(table, b, h)[q_idx, term.index[q_idx, kv_idx]]
        if mask is not None:
            score = score + pick(mask, b, h)[q_idx if mask.size(2) > 1 else 0, kv_idx]
        return score

    return _flex_attention(q.device.type)(q, k, v, score_mod=score_mod, scale=scale)


def _compiled_usable(impl: str, device: torch.device | None) -> tuple[bool, str]:
    """Whether a compiled path of ``rpe_ops``, ``'ops'`` (the fused CPU kernel) or ``'triton'``, can run attention on
    ``device`` (``None``: on some device it serves), and why not."""
    ops = irpe.rpe_ops
    if impl == "ops" and device is not None and device.type != "cpu":
        return False, f"it is a CPU kernel and the tensors are on {device}"
    if ops is None or ops.is_disabled():
        return False, "inside rpe_ops.disabled()" if ops is not None else "the rpe_ops package is not importable"
    if impl == "triton":
        from rpe_ops import triton_attention  # noqa: PLC0415  (on first use: it imports Triton, which takes a moment)

        return triton_attention.triton_available() if device is None else triton_attention.triton_usable(device)
    if not ops.is_available():
        return False, ops.load_error()
    if not ops.has_attention_kernel():
        return False, f"the loaded rpe_ops predate the current attention kernel; rebuild them: {ops.BUILD_COMMAND}"
    return True, ""


def _check_impl(impl: str) -> None:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTN_IMPLS}")


def resolve_attn_impl(impl: str, has_rpe_v: bool, dropout_p: float, device: torch.device | None = None) -> str:
    """The path :func:`rpe_attention` takes: ``'math'``, ``'sdpa'``, ``'flex'``, ``'ops'`` or ``'triton'``.

    ``'auto'`` takes the fastest exact path: ``'ops'`` on CPU where it is built, ``'triton'`` on CUDA where Triton
    imports (:func:`rpe_attention` runs float64 and masks other than a bool key padding one on ``'sdpa'`` instead),
    ``'sdpa'`` elsewhere and inside ``rpe_ops.disabled()``; with attention dropout, whose mask backward needs, the
    explicit ``'math'``. An explicit path runs as asked or raises.

    Args:
        impl: one of :data:`ATTN_IMPLS`.
        has_rpe_v: whether there is an encoding on values.
        dropout_p: attention dropout probability of this call.
        device: the tensors' device (``None``: unknown, never the CPU kernel).

    Raises:
        ValueError: an unknown ``impl``, or an explicit one that cannot run here (with the reason and what can).
    """
    _check_impl(impl)
    if impl == "auto":
        if dropout_p > 0:
            return "math"
        if device is None:
            return "sdpa"
        if device.type == "cuda" and _compiled_usable("triton", None)[0]:
            return "triton"
        return "ops" if _compiled_usable("ops", device)[0] else "sdpa"
    if impl == "math":
        return "math"
    if dropout_p > 0:
        raise ValueError(
            f"attn_impl={impl!r} cannot apply attention dropout (dropout_p={dropout_p:g}): its mask is needed in "
            "backward; use attn_impl='auto' or 'math', or no attention dropout"
        )
    if impl in ("ops", "triton"):
        usable, why = _compiled_usable(impl, device)
        if not usable:
            raise ValueError(f"attn_impl={impl!r} cannot run: {why}; use attn_impl='auto' or 'sdpa'")
    if impl == "flex" and has_rpe_v:
        raise ValueError(
            "attn_impl='flex' cannot encode values (FlexAttention cannot give the probabilities' bucket sums): "
            "use attn_impl='auto' or 'sdpa'"
        )
    return impl


def _ops_rpe_attention(
    q, k, v, scale: float, terms: Sequence[FusedTerm], value_terms: Sequence[FusedTerm], mask: torch.Tensor | None
) -> torch.Tensor:
    """The fused CPU kernel of ``rpe_ops`` (``rpe_ops.rpe_attention``): it computes the terms' tables itself from
    their weights, and keeps only the rows' log-sum-exps for backward. Half types run in float32 (as PyTorch's CPU
    attention accumulates). ``mask``: additive ``(B|1, H|1, L|1, L)``, or ``None``."""
    work = _work_dtype(q.dtype)
    weights, ids = [t.weight.to(work) for t in terms], [t.index for t in terms]
    value_weights, value_ids = [t.weight.to(work) for t in value_terms], [t.index for t in value_terms]
    query_flags = [t.is_query for t in terms]
    mask = None if mask is None else mask.to(work)
    with autocast_disabled(q.device.type):
        out, _ = irpe.rpe_ops.rpe_attention(
            q.to(work), k.to(work), v.to(work), weights, ids, query_flags, scale, value_weights, value_ids, mask
        )
    return out.to(q.dtype)


def rpe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rpe_q: iRPE | iRPE_Cross | None = None,
    rpe_k: iRPE | iRPE_Cross | None = None,
    rpe_v: iRPE | iRPE_Cross | None = None,
    height: int | None = None,
    width: int | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with iRPE, in the order of the paper.

    ``attn = (q * scale) @ k^T + rpe_k(q * scale) + rpe_q(k * scale)^T + mask``, softmax, dropout, ``out = attn @ v +
    rpe_v(attn)``. Every implementation computes the same function (up to float rounding); see
    :func:`resolve_attn_impl` for which one runs.

    Masks follow ``nn.MultiheadAttention``: a bool True marks a key that a query may not attend to (the opposite of
    ``F.scaled_dot_product_attention``'s bool ``attn_mask``), a float mask is added to the logits; both are constants
    (no gradient). A masked key gets probability exactly zero and adds nothing to the encodings on values. A query
    whose keys are all masked gets a zero output row and zero gradients on every path (``nn.MultiheadAttention``'s
    fused attention gives the same; its ``need_weights=True`` path and inference fast path give NaN).

    Args:
        q, k, v: ``(B, H, L, head_dim)``, not scaled (``Lk != L`` keys and values only without encodings).
        rpe_q, rpe_k, rpe_v: the modules from :func:`irpe.build_rpe` (``None`` where unused).
        height, width: the patch grid; ``L - height * width`` leading tokens are the configured skip tokens.
        scale: logit scale, ``head_dim ** -0.5`` by default.
        dropout_p: attention dropout probability (pass 0 in eval mode).
        impl: one of :data:`ATTN_IMPLS` (the paths of this module's docstring; ``'triton'``: float16, bfloat16 and
            float32, a bool ``key_padding_mask`` only).
        key_padding_mask: ``(B, Lk)``, bool (True: a padding key) or float (added to every query's logits).
        attn_mask: ``(L, Lk)``, or 4-D broadcastable to ``(B, H, L, Lk)`` (each size 1 or full), bool or float.

    Returns:
        ``(B, H, L, head_dim)``.
    """
    scale = q.size(-1) ** -0.5 if scale is None else scale
    mask = _additive_mask(key_padding_mask, attn_mask, q, k)  # (B|1, H|1, L|1, Lk)
    if rpe_q is None and rpe_k is None and rpe_v is None and impl != "math":  # plain attention, dropout included
        _check_impl(impl)
        mask = None if mask is None else mask.to(q.dtype)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    _check_one_length(q, k)
    path = resolve_attn_impl(impl, rpe_v is not None, dropout_p, q.device)
    # the Triton kernel computes in float32 and takes a bool key padding mask only: 'auto' runs 'sdpa' otherwise
    triton_mask = attn_mask is None and (key_padding_mask is None or key_padding_mask.dtype == torch.bool)
    if path == "triton" and impl == "auto" and (q.dtype == torch.float64 or not triton_mask):
        path = "sdpa"
    if path == "math":
        return _math_rpe_attention(q, k, v, rpe_q, rpe_k, rpe_v, height, width, scale, dropout_p, mask)[0]
    terms = rpe_k.fused_terms(q, height, width) if rpe_k is not None else []
    if rpe_q is not None:
        terms += rpe_q.fused_terms(k, height, width, is_query=True)
    value_terms = rpe_v.fused_terms(q, height, width) if rpe_v is not None else []
    if path == "flex":
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError(
                "attn_impl='flex': FlexAttention has no backward on CPU in PyTorch; train with attn_impl='sdpa' "
                "(or 'auto') on CPU, or run flex on CUDA"
            )
        return _flex_rpe_attention(q, k, v, scale, terms, mask)
    if path == "ops":
        return _ops_rpe_attention(q, k, v, scale, terms, value_terms, mask)
    if path == "triton":
        if not triton_mask:
            raise ValueError(
                "attn_impl='triton' takes a bool key_padding_mask only (no attn_mask, no float mask): use "
                "attn_impl='auto' or 'sdpa'"
            )
        from rpe_ops.triton_attention import triton_rpe_attention  # noqa: PLC0415

        return triton_rpe_attention(q, k, v, scale, terms, value_terms, key_padding_mask=key_padding_mask)
    kinds = tuple((term.is_bias, term.is_query) for term in terms)
    tensors = [t for term in (*terms, *value_terms) for t in (term.weight, term.index)]
    return _RPEBiasAttention.apply(q, k, v, scale, kinds, len(value_terms), mask, *tensors)


def _check_one_length(q: torch.Tensor, k: torch.Tensor) -> None:
    """iRPE encodes positions within one grid: queries ``(B, H, L, d)`` and keys of another length are an error."""
    if q.size(2) != k.size(2):
        raise ValueError(
            f"iRPE encodes positions within one grid: queries and keys must have one length, got {q.size(2)} and "
            f"{k.size(2)} (attention between sequences of different lengths takes no iRPE modules)"
        )


def _math_rpe_attention(
    q, k, v, rpe_q, rpe_k, rpe_v, height, width, scale: float, dropout_p: float, mask=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's explicit formulation, through the modules' own ``forward``: the output ``(B, H, L, d)`` and the
    attention probabilities ``(B, H, L, Lk)`` it keeps for backward (after dropout, as ``nn.MultiheadAttention``
    returns them). ``mask``: additive ``(B|1, H|1, L|1, Lk)``, or ``None``."""
    q = q * scale
    attn = torch.matmul(q, k.transpose(-2, -1))  # (B, H, L, Lk)
    if rpe_k is not None:
        attn = attn + rpe_k(q, height, width)
    if rpe_q is not None:
        attn = attn + rpe_q(k * scale, height, width).transpose(2, 3)
    if mask is not None:
        attn = _masked_softmax(attn + mask.to(attn.dtype))
    else:
        attn = attn.softmax(dim=-1)
    attn = nn.functional.dropout(attn, p=dropout_p, training=dropout_p > 0)
    out = torch.matmul(attn, v)
    if rpe_v is not None:
        out = out + rpe_v(attn, height, width)
    return out, attn


class RPEMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with iRPE: a drop-in for self-attention over a feature map's grid (DETR's encoder).

    The constructor and :meth:`forward` take ``nn.MultiheadAttention``'s arguments (plus ``rpe_config``, ``attn_impl``
    and ``hw``) and return what it returns. The parameters carry its names and shapes (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``) beside the encodings' tables (``rpe_q``, ``rpe_k``,
    ``rpe_v``), which start at zero: a fresh module computes what ``nn.MultiheadAttention`` with the same weights and
    masks computes. An ``nn.MultiheadAttention`` state dict loads with ``load_state_dict(state, strict=False)``, whose
    ``missing_keys`` are then exactly the tables (``unexpected_keys`` empty): check that rather than ignore it.

    The sequence is the config's ``skip`` leading tokens followed by an ``H x W`` grid in row-major order (``hw``:
    DETR's ``src.flatten(2)``, skip 0). Where iRPE is configured the attention is self-attention: queries and keys of
    one length (anything else raises); with ``rpe_config=None`` (or a config with no encoding) any lengths work.

    Args (beside ``nn.MultiheadAttention``'s):
        add_bias_kv, add_zero_attn: unsupported (they append a key without a grid position); must be False.
        kdim, vdim: channels of keys and values; must be ``None`` or ``embed_dim`` (one packed projection).
        rpe_config: from :func:`irpe.get_rpe_config` (its ``skip`` counts the leading tokens without a grid
            position); ``None``: no encoding.
        attn_impl: the path of :func:`rpe_attention` when ``need_weights=False``; ``need_weights=True`` (the default,
            as in ``nn.MultiheadAttention``) needs the probabilities and always takes ``'math'``.

    Raises:
        ValueError: an unsupported argument, or an explicit ``attn_impl`` that cannot run with this configuration.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        rpe_config: irpe.RPEConfigs | None = None,
        attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be a positive multiple of num_heads={num_heads}")
        if add_bias_kv or add_zero_attn:
            raise ValueError(
                "RPEMultiheadAttention does not support add_bias_kv or add_zero_attn: the key they append has no "
                "position on the grid; add such tokens to the sequence and count them in the config's skip instead"
            )
        if kdim not in (None, embed_dim) or vdim not in (None, embed_dim):
            raise ValueError(
                f"RPEMultiheadAttention takes keys and values of embed_dim={embed_dim} channels (kdim={kdim}, "
                f"vdim={vdim}): iRPE encodes self-attention; project them to embed_dim first"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        _check_impl(attn_impl)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = self.vdim = embed_dim
        self.dropout, self.batch_first, self.attn_impl = float(dropout), batch_first, attn_impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        # the Linear that dynamic quantization leaves alone, as nn.MultiheadAttention's: forward reads its weight
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        modules = irpe.build_rpe(rpe_config, head_dim=self.head_dim, num_heads=num_heads)
        if attn_impl not in ("auto", "math") and any(m is not None for m in modules):  # fail here, not at a step
            resolve_attn_impl(attn_impl, modules[2] is not None, self.dropout, device=None)
        self.rpe_q, self.rpe_k, self.rpe_v = (m if m is None else m.to(**factory) for m in modules)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout:g}, "
            f"bias={self.in_proj_bias is not None}, batch_first={self.batch_first}, attn_impl={self.attn_impl}"
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        hw: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` over ``key`` and ``value``, as ``nn.MultiheadAttention.forward`` plus the grid ``hw``.

        Masks as in :func:`rpe_attention`: a query whose keys are all masked attends to nothing (zero weights; its
        output is ``out_proj``'s bias).

        Args:
            query, key, value: ``(L, B, E)``, ``(S, B, E)`` (``S = L`` where iRPE is configured), or batch first
                with ``batch_first``, or unbatched ``(L, E)``.
            key_padding_mask, attn_mask, average_attn_weights: as ``nn.MultiheadAttention``'s.
            need_weights: also return the attention weights; takes the explicit ``'math'`` path. Pass False for
                ``attn_impl``'s fused paths.
            is_causal: a hint that ``attn_mask`` is the causal mask: ``attn_mask`` must then be given (it is applied).
            hw: the grid ``(H, W)`` of the ``L - skip`` tokens after the config's skip tokens; ``None``: a square grid.

        Returns:
            ``(output, weights)`` as ``nn.MultiheadAttention``'s (``weights`` ``None`` unless ``need_weights``).
        """
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key and value must all be 3-D (batched) or all 2-D (unbatched), got "
                f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
            )
        if is_causal and attn_mask is None:
            raise ValueError("is_causal is a hint that attn_mask is the causal mask: pass that attn_mask too")
        batched = query.dim() == 3
        packed = query is key and key is value  # self-attention on one tensor: one projection
        if not batched:  # one sample, batch-first from here on
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, E = query.shape
        S = key.size(1)
        if self.embed_dim != E or key.shape != (B, S, E) or value.shape != (B, S, E):
            raise ValueError(
                f"expected query (batch, L, {self.embed_dim}) and key, value (batch, S, {self.embed_dim}) in the "
                f"module's layout, got {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)} (batch first)"
            )
        if attn_mask is not None and attn_mask.dim() == 3:  # (B * heads, L, S), as nn.MultiheadAttention's
            if attn_mask.shape != (B * self.num_heads, L, S):
                raise ValueError(
                    f"a 3-D attn_mask must have shape (batch * num_heads, L, S) = ({B * self.num_heads}, {L}, {S}), "
                    f"got {tuple(attn_mask.shape)}"
                )
            attn_mask = attn_mask.view(B, self.num_heads, L, S)
        q, k, v = self._project(query, key, value, packed)  # (B, H, L|S, d)
        height, width = (None, None) if hw is None else hw
        dropout_p = self.dropout if self.training else 0.0
        modules = (self.rpe_q, self.rpe_k, self.rpe_v)
        weights = None
        if need_weights:
            if any(m is not None for m in modules):
                _check_one_length(q, k)
            mask = _additive_mask(key_padding_mask, attn_mask, q, k)
            scale = self.head_dim**-0.5
            out, weights = _math_rpe_attention(q, k, v, *modules, height, width, scale, dropout_p, mask)
            weights = weights.mean(1) if average_attn_weights else weights  # (B, L, S) or (B, H, L, S)
        else:
            masks = {"key_padding_mask": key_padding_mask, "attn_mask": attn_mask}
            out = rpe_attention(q, k, v, *modules, height, width, dropout_p=dropout_p, impl=self.attn_impl, **masks)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, E))  # (B, L, E)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The heads' queries, keys and values ``(B, H, L|S, d)`` from batch-first inputs (``packed``: one tensor,
        projected by one product)."""
        w, b = self.in_proj_weight, self.in_proj_bias
        if packed:
            parts = nn.functional.linear(query, w, b).chunk(3, dim=-1)
        else:
            biases = (None, None, None) if b is None else b.chunk(3)
            parts = [nn.functional.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), w.chunk(3), biases)]
        return tuple(t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in parts)
