"""Attention with iRPE: the paper's formulation and fused, memory-efficient paths.

:func:`rpe_attention` computes ``softmax(q k^T * scale + rpe_k + rpe_q^T) @ v + rpe_v`` for the encoding modules of
``irpe.py`` (``build_rpe``), along one of these paths (see :func:`resolve_attn_impl`):

* ``'math'``: the paper's explicit formulation through the modules' own ``forward``; keeps the ``(B, H, L, L)``
  probabilities for backward. The reference, and the path of attention dropout.
* ``'sdpa'``: PyTorch's fused ``scaled_dot_product_attention`` with the bias as a constant mask; encodings on values
  from probabilities recomputed block by block of query rows; a backward that recomputes instead of keeping anything
  ``L x L`` (plain PyTorch: its numbers are tested on CPU tensors; CUDA's default).
* ``'flex'``: FlexAttention with a ``score_mod`` (queries and keys only; compiled on CUDA).
* ``'ops'``: the fused CPU kernel of ``rpe_ops`` (CPU's default where it is built).

The fused paths read each encoding's weight and bucket ids from the modules (``fused_terms``) and its per-row table
from ``irpe``'s one definition of it; the lookups run on the backend argument's choice (``irpe.use_backend``,
``IRPE_BACKEND``), and ``'torch'`` runs no compiled code on any path. Copy this file with ``irpe.py``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
from torch import nn

import irpe
from irpe import FusedTerm, iRPE, iRPE_Cross, rpe_bucket_sum, rpe_index

__all__ = ["ATTN_IMPLS", "resolve_attn_impl", "rpe_attention"]

ATTN_IMPLS = ("auto", "math", "sdpa", "flex", "ops")


def _autocast_disabled(device_type: str):
    """Autocast off for ``device_type`` (the fused path manages its dtypes itself); a no-op where autocast does not
    exist (the meta device) or is off already (no autocast region, which torch.export.load would reject)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _term_table(term: FusedTerm, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-row bucket values of a term of :func:`rpe_attention` (a query term is looked up with the keys)."""
    return irpe.per_row_table(term.weight, term.is_bias, k if term.is_query else q, scale)


def _bias_rows(
    terms: Sequence[FusedTerm], tables: Sequence[torch.Tensor], i0: int, i1: int, backend: str
) -> torch.Tensor | None:
    """Rows ``i0:i1`` of the additive logit bias of all terms, ``(b|1, H|1, i1 - i0, Lk)``, from the terms' per-row
    tables (:func:`_term_table`); ``None`` without terms."""
    bias = None
    for term, table in zip(terms, tables):
        if term.is_query:  # looked up with the keys: (b, H, Lk, rows), transposed onto the logits
            part = rpe_index(table, term.index[:, i0:i1].contiguous(), backend).transpose(2, 3)
        else:
            part = rpe_index(table[:, :, i0:i1], term.index[i0:i1], backend)
        bias = part if bias is None else bias + part
    return bias


# Work tensors of the sdpa path (a batch slice, or a block of its query rows, of the (B, H, L, L) logits) hold about
# this many bytes: this bounds the memory of the temporaries (and keeps them closer to the caches) while keeping the
# kernels large.
_FUSED_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are recomputed in float32 (softmax and its backward are sensitive to rounding)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunk_bytes(device: torch.device) -> int:
    return _FUSED_CHUNK_BYTES.get(device.type, 256 << 20)


def _batch_chunks(q: torch.Tensor) -> list[tuple[int, int]]:
    """Slices ``(b0, b1)`` of the batch whose ``(b1 - b0, H, L, L)`` work tensors (in the work dtype) fit the chunk
    size; at least one sample each."""
    B, H, L, _ = q.shape
    if torch.compiler.is_compiling():
        return [(0, B)]  # one slice: a loop over a symbolic batch would fix it to the traced size
    per_sample = H * L * L * _work_dtype(q.dtype).itemsize
    step = max(1, _chunk_bytes(q.device) // max(per_sample, 1))
    return [(start, min(start + step, B)) for start in range(0, B, step)]


def _row_blocks(q: torch.Tensor, batch: int, num_keys: int) -> list[tuple[int, int]]:
    """Blocks ``(i0, i1)`` of query rows whose ``(batch, H, i1 - i0, num_keys)`` work tensors fit the chunk size: all
    rows at once unless a single sample's logits exceed it (large L)."""
    H, L = q.size(1), q.size(2)
    rows = max(1, _chunk_bytes(q.device) // max(batch * H * num_keys * _work_dtype(q.dtype).itemsize, 1))
    return [(start, min(start + rows, L)) for start in range(0, L, rows)]


def _table_backward(
    term: FusedTerm, grad_table: torch.Tensor, x: torch.Tensor, scale: float, grad_weight: torch.Tensor
) -> torch.Tensor | None:
    """Back through :func:`_term_table`: adds the weight's gradient to ``grad_weight`` and returns ``x``'s (``None``
    for a bias term, whose table does not depend on ``x``).

    Args:
        grad_table: gradient of the term's table, ``(b, H, L, nb)`` (or anything that sums to the bias' shape).
        x: the tensor the table was looked up with (``k`` for a query term, ``q`` otherwise), ``(b, H, L, d)``.
    """
    if term.is_bias:
        Hm, nb = term.weight.shape
        grad_weight += grad_table.sum_to_size(1, Hm, 1, nb).view(Hm, nb)
        return None
    dx = torch.matmul(grad_table, (term.weight * scale).transpose(-2, -1))  # (b, H, L, d)
    grad_w = torch.matmul(x.transpose(-2, -1), grad_table).mul_(scale)  # (b, H, d, nb)
    grad_weight += grad_w.sum(0).sum_to_size(term.weight.shape)
    return dx


def _values_term(value_terms: Sequence[FusedTerm], probs: torch.Tensor, i0: int, i1: int, backend: str) -> torch.Tensor:
    """What the encodings on values add to rows ``i0:i1`` of the output, ``(b, H, rows, d)``, from those rows of the
    probabilities ``(b, H, rows, Lk)`` (:func:`irpe.encode_values`, the modules' own formula)."""
    out = None
    for term in value_terms:
        part = irpe.encode_values(probs, term.index[i0:i1], term.weight, backend)
        out = part if out is None else out.add_(part)
    return out


class _RPEBiasAttention(torch.autograd.Function):
    """Attention with the iRPE terms, fused and memory-efficient: ``P @ v + sum_u bucket_sum(P, index_u) @ W_u`` with
    ``P = softmax(q k^T * scale + bias)``, ``bias`` from the terms on queries and keys, ``W_u`` the encodings on values.

    The forward runs PyTorch's fused ``scaled_dot_product_attention`` with the bias as a constant mask, batch slice
    by batch slice, for ``P @ v``. With encodings on values it then recomputes ``P`` block by block of query rows
    (softmax of complete rows, so each block is exact on its own) and adds its bucket sums times ``W_u``. Nothing
    beyond ``q, k, v`` and the output is kept for backward: the backward recomputes the tables (``q @ W``, small),
    the bias and the probabilities block by block (as flash attention does), and gives the encodings' gradients
    through bucket sums of the logits' gradient (q/k terms) and of the probabilities (values terms). No
    ``(B, H, L, L)`` tensor lives from forward to backward, and the temporaries of either pass are bounded by the
    block size (``_FUSED_CHUNK_BYTES``; the forward's mask holds one batch slice).

    This is plain PyTorch: its numbers are tested on CPU tensors, and on CUDA it serves ``impl='auto'``.
    """

    @staticmethod
    def forward(
        ctx, q, k, v, scale: float, kinds: tuple[tuple[bool, bool], ...], num_values: int, backend: str, *tensors
    ):
        n = len(kinds)
        weights, indices = tensors[:n], tensors[n : 2 * n]
        value_weights, value_indices = tensors[2 * n : 2 * n + num_values], tensors[2 * n + num_values :]
        work = _work_dtype(q.dtype)
        terms = [FusedTerm(w.to(work), i, *kind) for w, i, kind in zip(weights, indices, kinds)]
        value_terms = [FusedTerm(w.to(work), i, False, False) for w, i in zip(value_weights, value_indices)]
        outs = []
        with _autocast_disabled(q.device.type), torch.no_grad():
            for b0, b1 in _batch_chunks(q):
                qc, kc = q[b0:b1], k[b0:b1]
                qw, kw = qc.to(work), kc.to(work)
                tables = [_term_table(term, qw, kw, scale) for term in terms]
                bias = _bias_rows(terms, tables, 0, q.size(2), backend)
                mask = None if bias is None else bias.to(q.dtype)
                out = nn.functional.scaled_dot_product_attention(qc, kc, v[b0:b1], attn_mask=mask, scale=scale)
                if value_terms:
                    out = out.to(work)
                    for i0, i1 in _row_blocks(q, b1 - b0, k.size(2)):
                        logits = torch.matmul(qw[:, :, i0:i1], kw.transpose(-2, -1)).mul_(scale)  # (b, H, rows, L)
                        if bias is not None:
                            logits += bias[:, :, i0:i1]
                        probs = torch.softmax(logits, dim=-1)
                        out[:, :, i0:i1] += _values_term(value_terms, probs, i0, i1, backend)
                    out = out.to(q.dtype)
                outs.append(out)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        ctx.save_for_backward(q, k, v, out, *tensors)
        ctx.scale, ctx.kinds, ctx.num_values, ctx.backend = scale, kinds, num_values, backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, *saved = ctx.saved_tensors
        n, nv = len(ctx.kinds), ctx.num_values
        work = _work_dtype(q.dtype)
        terms = [FusedTerm(w.to(work), i, *kind) for w, i, kind in zip(saved[:n], saved[n : 2 * n], ctx.kinds)]
        value_terms = [
            FusedTerm(w.to(work), i, False, False) for w, i in zip(saved[2 * n : 2 * n + nv], saved[2 * n + nv :])
        ]
        scale, backend = ctx.scale, ctx.backend
        grads_qkv = []
        grad_weights = [torch.zeros_like(term.weight) for term in terms]
        grad_value_weights = [torch.zeros_like(term.weight) for term in value_terms]
        with _autocast_disabled(q.device.type):
            for b0, b1 in _batch_chunks(q):
                qc, kc, vc = (t[b0:b1].to(work) for t in (q, k, v))
                oc, gc = out[b0:b1].to(work), grad_out[b0:b1].to(work)
                tables = [_term_table(term, qc, kc, scale) for term in terms]  # (b|1, H|Hm, L, nb), small
                dq = torch.empty_like(qc)
                dk, dv = torch.zeros_like(kc), torch.zeros_like(vc)
                query_grad_tables: dict[int, torch.Tensor] = {}  # query terms: summed over the row blocks
                for i0, i1 in _row_blocks(q, b1 - b0, k.size(2)):
                    qb, gb = qc[:, :, i0:i1], gc[:, :, i0:i1]
                    logits = torch.matmul(qb, kc.transpose(-2, -1)).mul_(scale)  # (b, H, rows, L)
                    bias = _bias_rows(terms, tables, i0, i1, backend)
                    probs = torch.softmax(logits if bias is None else logits.add_(bias), dim=-1)
                    del logits, bias
                    # rowsum(P * dP) = dO . O, O including the values terms (their dP is dO . W_u[bucket])
                    delta = (gb * oc[:, :, i0:i1]).sum(-1, keepdim=True)  # (b, H, rows, 1)
                    grad_probs = torch.matmul(gb, vc.transpose(-2, -1))  # (b, H, rows, L)
                    for term, grad_weight in zip(value_terms, grad_value_weights):
                        index = term.index[i0:i1]
                        grad_probs += rpe_index(torch.matmul(gb, term.weight.transpose(-2, -1)), index, backend)
                        sums = rpe_bucket_sum(probs, index, term.weight.size(1), backend)  # (b, H, rows, nb)
                        grad_weight += torch.matmul(sums.transpose(-2, -1), gb).sum(0).sum_to_size(grad_weight.shape)
                    grad_logits = grad_probs.sub_(delta).mul_(probs)  # (b, H, rows, L)
                    dv += torch.matmul(probs.transpose(-2, -1), gb)
                    del probs
                    dq[:, :, i0:i1] = torch.matmul(grad_logits, kc).mul_(scale)
                    dk += torch.matmul(grad_logits.transpose(-2, -1), qb).mul_(scale)
                    for t, (term, grad_weight) in enumerate(zip(terms, grad_weights)):
                        nb = term.weight.size(-1)
                        if term.is_query:  # the table's rows are the keys: its gradient sums over the row blocks
                            g = grad_logits.transpose(2, 3)
                            if term.is_bias:
                                g = g.sum_to_size(1, term.weight.size(0), *g.shape[2:])
                            index = term.index[:, i0:i1].contiguous()
                            grad_table = rpe_bucket_sum(g, index, nb, backend)  # (b|1, H|Hm, L, nb)
                            if t in query_grad_tables:
                                query_grad_tables[t] += grad_table
                            else:
                                query_grad_tables[t] = grad_table
                            continue
                        g = grad_logits
                        if term.is_bias:  # the table is the bias row repeated over batch (and heads when shared)
                            g = g.sum_to_size(1, term.weight.size(0), *g.shape[2:])
                        grad_table = rpe_bucket_sum(g, term.index[i0:i1], nb, backend)  # (b|1, H|Hm, rows, nb)
                        dx = _table_backward(term, grad_table, qb, scale, grad_weight)
                        if dx is not None:
                            dq[:, :, i0:i1] += dx
                for t, grad_table in query_grad_tables.items():
                    dx = _table_backward(terms[t], grad_table, kc, scale, grad_weights[t])
                    if dx is not None:
                        dk += dx
                grads_qkv.append((dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)))
        grad_q, grad_k, grad_v = grads_qkv[0] if len(grads_qkv) == 1 else (torch.cat(g) for g in zip(*grads_qkv))
        grad_weights = [g.to(w.dtype) for g, w in zip(grad_weights, saved[:n])]
        grad_value_weights = [g.to(w.dtype) for g, w in zip(grad_value_weights, saved[2 * n : 2 * n + nv])]
        no_index_grads = [None] * n, [None] * nv
        non_tensors = (None, None, None, None)  # scale, kinds, num_values, backend
        return (
            grad_q,
            grad_k,
            grad_v,
            *non_tensors,
            *grad_weights,
            *no_index_grads[0],
            *grad_value_weights,
            *no_index_grads[1],
        )


def _flex_attention_fn(device: torch.device):
    """FlexAttention: compiled on CUDA (it is only fast compiled), eager elsewhere."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - torch < 2.5
        raise ValueError(f"attn_impl='flex' needs torch.nn.attention.flex_attention (torch >= 2.5): {err}") from None
    return _compiled_flex_attention(flex_attention) if device.type == "cuda" else flex_attention


@functools.cache
def _compiled_flex_attention(flex_attention):
    """``torch.compile(flex_attention)``, once per process."""
    return torch.compile(flex_attention, dynamic=False)


def _flex_rpe_attention(q, k, v, scale: float, terms: Sequence[FusedTerm]) -> torch.Tensor:
    """FlexAttention whose ``score_mod`` adds ``table[b, h, i, index[i, j]]``: no ``L x L`` bias ever exists."""
    tables = [_term_table(term, q, k, scale) for term in terms]  # (B|1, H|1, L, nb), differentiable

    def pick(table: torch.Tensor, b, h):
        return table[b if table.size(0) > 1 else 0, h if table.size(1) > 1 else 0]

    def score_mod(score, b, h, q_idx, kv_idx):
        for term, table in zip(terms, tables):
            if term.is_query:
                score = score + pick(table, b, h)[kv_idx, term.index[kv_idx, q_idx]]
            else:
                score = score + pick(table, b, h)[q_idx, term.index[q_idx, kv_idx]]
        return score

    return _flex_attention_fn(q.device)(q, k, v, score_mod=score_mod, scale=scale)


def _ops_attention_usable(device: torch.device | None) -> tuple[bool, str]:
    """Whether the fused CPU kernel of ``rpe_ops`` can run attention on ``device``, and why not."""
    if device is not None and device.type != "cpu":
        return False, f"it is a CPU kernel and the tensors are on {device}"
    ops, error = irpe.compiled_ops()
    if ops is None:
        return False, f"the compiled rpe_ops are unavailable ({error}); {irpe.BUILD_HINT}"
    if not ops.has_attention_kernel():
        return False, f"the loaded rpe_ops predate the current attention kernel; rebuild them: {irpe.BUILD_HINT}"
    return True, ""


def _check_impl(impl: str) -> None:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTN_IMPLS}")


def resolve_attn_impl(
    impl: str, has_rpe_v: bool, dropout_p: float, device: torch.device | None = None, backend: str | None = None
) -> str:
    """The path :func:`rpe_attention` takes: ``'math'``, ``'sdpa'``, ``'flex'`` or ``'ops'``.

    ``'auto'`` takes the fastest exact path: on CPU the fused ``rpe_ops`` kernel (``'ops'``) when it is built and the
    backend is not ``'torch'``, ``'sdpa'`` elsewhere (CUDA included); both serve encodings on values without keeping
    the probabilities. With attention dropout, which needs its mask in backward, ``'auto'`` takes the paper's explicit
    formulation (``'math'``). An explicit path runs as asked or raises.

    Args:
        impl: one of :data:`ATTN_IMPLS`.
        has_rpe_v: whether there is an encoding on values.
        dropout_p: attention dropout probability of this call.
        device: the tensors' device (``None``: unknown, never the CPU kernel).
        backend: ``'auto'``, ``'torch'`` or ``'ops'``; ``None``: ``irpe.default_backend()``.

    Raises:
        ValueError: an unknown ``impl``, or an explicit one that cannot run here (with the reason and what can).
    """
    _check_impl(impl)
    backend = irpe.resolve_backend(backend)
    if impl == "auto":
        if dropout_p > 0:
            return "math"
        fused_cpu = device is not None and backend != "torch" and _ops_attention_usable(device)[0]
        return "ops" if fused_cpu else "sdpa"
    if impl == "math":
        return "math"
    if dropout_p > 0:
        raise ValueError(
            f"attn_impl={impl!r} cannot apply attention dropout (dropout_p={dropout_p:g}): its mask is needed in "
            "backward; use attn_impl='auto' or 'math', or no attention dropout"
        )
    if impl == "ops":
        if backend == "torch":
            raise ValueError(
                "attn_impl='ops' is the compiled kernel of rpe_ops, but the iRPE backend is 'torch' (IRPE_BACKEND or "
                "irpe.use_backend): use attn_impl='auto' or 'sdpa'"
            )
        usable, why = _ops_attention_usable(device)
        if not usable:
            raise ValueError(f"attn_impl='ops' cannot run: {why}; use attn_impl='auto' or 'sdpa'")
    if impl == "flex" and has_rpe_v:
        raise ValueError(
            "attn_impl='flex' cannot encode values (FlexAttention cannot give the probabilities' bucket sums): "
            "use attn_impl='auto' or 'sdpa'"
        )
    return impl


def _ops_rpe_attention(
    q, k, v, scale: float, terms: Sequence[FusedTerm], value_terms: Sequence[FusedTerm] = ()
) -> torch.Tensor:
    """The fused CPU kernel of ``rpe_ops``: it takes the encodings' weights (values' included) and computes their
    tables itself, one ``(b, h)`` at a time, so nothing beyond ``q, k, v``, the output and the rows' ``(B, H, L)``
    log-sum-exps is kept for backward, and no ``(B, H, L, nb)`` table is allocated either. Half types run in float32
    (as PyTorch's CPU attention accumulates); autograd goes through the op's registered backward."""
    dtype = q.dtype
    work = _work_dtype(dtype)
    with _autocast_disabled(q.device.type):
        out, _ = irpe.compiled_ops()[0].rpe_attention(
            q.to(work),
            k.to(work),
            v.to(work),
            [term.weight.to(work) for term in terms],
            [term.index for term in terms],
            [term.is_query for term in terms],
            scale,
            [term.weight.to(work) for term in value_terms],
            [term.index for term in value_terms],
        )
    return out.to(dtype)


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
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with iRPE, in the order of the paper.

    ``attn = (q * scale) @ k^T + rpe_k(q * scale) + rpe_q(k * scale)^T``, softmax, dropout, ``out = attn @ v +
    rpe_v(attn)``. Every implementation computes the same function (up to float rounding); see
    :func:`resolve_attn_impl` for which one runs.

    Args:
        q, k, v: ``(B, H, L, head_dim)``, not scaled.
        rpe_q, rpe_k, rpe_v: the modules from :func:`irpe.build_rpe` (``None`` where unused).
        height, width: the patch grid; ``L - height * width`` leading tokens are the configured skip tokens.
        scale: logit scale, ``head_dim ** -0.5`` by default.
        dropout_p: attention dropout probability (pass 0 in eval mode).
        impl: ``'auto'``, ``'math'`` (explicit probabilities), ``'sdpa'`` (fused forward, recomputing backward;
            values terms from probabilities recomputed block by block), ``'flex'`` (FlexAttention with a
            ``score_mod``; compiled on CUDA; no encoding on values) or ``'ops'`` (the fused CPU kernel of
            ``rpe_ops``, values terms included).
        backend: the lookups' backend on every path (``'torch'``: no compiled code); ``None``:
            ``irpe.default_backend()``.

    Returns:
        ``(B, H, L, head_dim)``.
    """
    scale = q.size(-1) ** -0.5 if scale is None else scale
    if rpe_q is None and rpe_k is None and rpe_v is None and impl != "math":  # plain attention, dropout included
        _check_impl(impl)
        return nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    backend = irpe.resolve_backend(backend)
    path = resolve_attn_impl(impl, rpe_v is not None, dropout_p, q.device, backend)
    if path == "math":
        return _math_rpe_attention(q, k, v, rpe_q, rpe_k, rpe_v, height, width, scale, dropout_p, backend)
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
        return _flex_rpe_attention(q, k, v, scale, terms)
    if path == "ops":
        return _ops_rpe_attention(q, k, v, scale, terms, value_terms)
    kinds = tuple((term.is_bias, term.is_query) for term in terms)
    weights, indices = [term.weight for term in terms], [term.index for term in terms]
    value_weights, value_indices = [term.weight for term in value_terms], [term.index for term in value_terms]
    return _RPEBiasAttention.apply(
        q, k, v, scale, kinds, len(value_terms), backend, *weights, *indices, *value_weights, *value_indices
    )


def _math_rpe_attention(
    q, k, v, rpe_q, rpe_k, rpe_v, height, width, scale: float, dropout_p: float, backend: str
) -> torch.Tensor:
    """The paper's explicit formulation, through the modules' own ``forward``: keeps the probabilities."""
    q = q * scale
    attn = torch.matmul(q, k.transpose(-2, -1))  # (B, H, L, L)
    if rpe_k is not None:
        attn = attn + rpe_k(q, height, width, backend=backend)
    if rpe_q is not None:
        attn = attn + rpe_q(k * scale, height, width, backend=backend).transpose(2, 3)
    attn = nn.functional.dropout(attn.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
    out = torch.matmul(attn, v)
    if rpe_v is not None:
        out = out + rpe_v(attn, height, width, backend=backend)
    return out
