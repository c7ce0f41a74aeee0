# ruff: noqa: N803  (kernel arguments follow Triton's convention: pointers and constexprs in capitals)
"""Attention with iRPE in Triton: flash attention whose logits gather the encodings' small per-row tables.

``triton_rpe_attention`` computes what ``irpe_attention.rpe_attention`` computes (Wu et al., "Rethinking and Improving
Relative Position Encoding for Vision Transformer", ICCV 2021, Eq. 18; Dao et al., "FlashAttention", 2022, for the
structure) without any ``L x L`` tensor in memory:

* the forward runs over tiles of ``BLOCK_M`` query rows x ``BLOCK_N`` keys with an online softmax; each tile's logits
  are ``q k^T * scale`` (``tl.dot``) plus, per term on keys, ``table[b, h, i, ids[i, j]]`` and, per term on queries,
  ``table[b, h, j, ids[j, i]]``, gathered from the ``(B|1, H|1, L, nb)`` per-row tables (``irpe.per_row_table``) by
  int32 bucket ids: ``BLOCK_M * BLOCK_N`` id loads and table loads per term and tile, against the ``2 * BLOCK_M *
  BLOCK_N * d`` multiply-adds of ``q k^T``;
* encodings on values add ``bucket_sum(P) @ W_v``. The kernel makes a second pass over the keys after the online
  softmax, recomputing each tile's probabilities from the rows' final log-sum-exp and adding them into the rows'
  ``(L, nb)`` bucket sums with atomic adds; ``@ W_v`` is then one small matmul. Accumulating the sums in the first
  pass instead would need rescaling them whenever a row's maximum moves (a read-modify-write of ``BLOCK_M * nb``
  values per tile) and a second pass is the cheaper and exact choice: it costs one more ``q k^T`` per tile (on tensor
  cores) and ``BLOCK_M * BLOCK_N`` atomic adds per values term, whereas a one-hot reduction in registers would cost
  ``BLOCK_M * BLOCK_N * nb`` operations on CUDA cores per tile;
* the backward recomputes the probabilities from ``q, k`` and the saved ``(B, H, L)`` log-sum-exp, one program per
  block of keys (``dk``, ``dv`` in registers, ``dq`` by atomic adds), and gives each table's gradient by atomic adds
  of the logits' gradient into ``(B, H, L, nb)`` buffers (the adjoint of the gather); the values terms' part of
  ``dP`` is a gather from ``dO @ W_v^T`` (``(B, H, L, nb)``), their weights' gradient ``bucket_sum(P)^T @ dO``.

Saved for backward: ``q, k, v``, the output, the ``(B, H, L)`` log-sum-exp, the weights and the int32 bucket ids
``(terms, L, L)`` (no batch or head dimension); the per-row tables are recomputed (``q @ W``, small).

Queries whose keys are all masked by ``key_padding_mask`` get zero attention and return zeros (a softmax over no key
is empty), rather than NaN; their gradients are zero too.

The kernels run compiled on CUDA tensors, and in Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1`` was
set before Triton was imported (a testing tool: thousands of times slower than any CPU path; tests/conftest.py sets it
on machines without a GPU). The mode is one per process: Triton's own library functions are compiled or interpreted
from its import on, and the kernels here follow it. Copy this file with ``irpe.py`` and ``rpe_ops/``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch

import irpe
from irpe import FusedTerm
from irpe_attention import autocast_disabled

try:
    import triton
    import triton.language as tl
except ImportError as _err:  # Triton is optional: the other attention paths run without it
    triton = tl = None
    _TRITON_ERROR = f"Triton is not installed ({_err}); `pip install triton` (it comes with PyTorch's CUDA wheels)"
    LOG2E = 1.4426950408889634
else:
    _TRITON_ERROR = ""
    LOG2E = tl.constexpr(1.4426950408889634)  # the kernels work in base 2 (exp2 and log2 are the GPU's native ones)

__all__ = ["interpreting", "triton_available", "triton_rpe_attention", "triton_usable"]


def triton_available() -> tuple[bool, str]:
    """Whether Triton can be imported, and why not."""
    return (triton is not None), _TRITON_ERROR


def interpreting() -> bool:
    """Whether Triton runs in its interpreter in this process: set by ``TRITON_INTERPRET=1`` before Triton is first
    imported, which makes Triton's own library functions (``tl.zeros``, ``tl.sum``...) interpreted ones; the kernels
    here follow that choice, so the mode is fixed for the process."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

    return isinstance(tl.zeros, InterpretedFunction)


def triton_usable(device: torch.device | None) -> tuple[bool, str]:
    """Whether the kernels can run on tensors of ``device``, and why not.

    CUDA tensors need Triton. CPU tensors run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton
    is imported), a testing tool thousands of times slower than the CPU paths, so never taken without being asked for;
    in that mode CUDA tensors are interpreted too (copied to the host and back).
    """
    available, why = triton_available()
    if not available:
        return False, why
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

    if isinstance(_fwd_kernel, InterpretedFunction) != interpreting():
        return False, (
            "TRITON_INTERPRET changed between the imports of Triton and of rpe_ops.triton_attention: set it (or not) "
            "before either is imported"
        )
    if device is None:
        return False, "the tensors' device is unknown"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return True, ""
    if device.type == "cpu":
        return False, (
            "CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 before Triton is first imported "
            "(slow: for tests)"
        )
    return False, f"the Triton kernel runs on CUDA tensors (and CPU ones in Triton's interpreter), not on {device}"


# ----------------------------------------------------------------------------------------------------------------
# Kernels. Shapes: q, k, v, o (B, H, L, D) with unit stride along D; tables (B|1, H|1, L, nb) with unit stride along
# nb (strides 0 for broadcast dimensions); ids (terms, L, L) int32, with each term's bucket offset in the combined
# table already added; LSE (B, H, L) float32 in base 2; MASK (B, L) uint8, 1 = masked key.
# ----------------------------------------------------------------------------------------------------------------


def _tile_logits(
    q, k, scale, offs_m, offs_n, tile_ok, keep, seq_len, tk_rows, IK, tq_cols, IQT,
    NUM_K: tl.constexpr, NUM_Q: tl.constexpr,
):  # fmt: skip
    """The base-2 logits of a tile, ``(BLOCK_M, BLOCK_N)`` float32: ``q k^T * scale`` plus, per term on keys,
    ``table[b, h, i, ids[i, j]]`` from the queries' table rows ``tk_rows`` and, per term on queries,
    ``table[b, h, j, ids[j, i]]`` from the keys' rows ``tq_cols`` (``IQT`` holds those ids transposed); ``-inf`` where a
    key is masked or past L (``keep``). Each term costs a tile of int32 id loads and a tile of gathered table loads."""
    s = tl.dot(q, tl.trans(k)) * scale
    ids_off = offs_m[:, None] * seq_len + offs_n[None, :]
    for u in tl.static_range(NUM_K):
        ids = tl.load(IK + u * seq_len * seq_len + ids_off, mask=tile_ok, other=0)
        s += tl.load(tk_rows[:, None] + ids, mask=tile_ok, other=0.0)
    for u in tl.static_range(NUM_Q):
        ids = tl.load(IQT + u * seq_len * seq_len + ids_off, mask=tile_ok, other=0)
        s += tl.load(tq_cols[None, :] + ids, mask=tile_ok, other=0.0)
    return tl.where(keep[None, :], s * LOG2E, float("-inf"))


def _kept_keys(MASK, b, seq_len, offs_n, HAS_MASK: tl.constexpr):
    """``(BLOCK_N,)``: the keys that exist (``< L``) and are not masked."""
    keep = offs_n < seq_len
    if HAS_MASK:
        keep = keep & (tl.load(MASK + b * seq_len + offs_n, mask=keep, other=1) == 0)
    return keep


def _fwd_kernel(
    Q, K, V, OUT, LSE, SV, TK, IK, TQ, IQT, IV, MASK,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol, stride_tkb, stride_tkh, stride_tkl, stride_tqb, stride_tqh, stride_tql,
    num_heads, seq_len, head_dim, nbv, scale,
    NUM_K: tl.constexpr, NUM_Q: tl.constexpr, NUM_V: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per block of query rows: the online softmax over key tiles, then (values terms) a second pass.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_len
    d_ok = offs_d < head_dim
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    tk_rows = TK + b * stride_tkb + h * stride_tkh + offs_m * stride_tkl  # (BLOCK_M,) table rows of the queries
    tq_base = TQ + b * stride_tqb + h * stride_tqh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row maximum of the base-2 logits
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(logit - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
        keep = _kept_keys(MASK, b, seq_len, offs_n, HAS_MASK)
        s = _tile_logits(
            q, k, scale, offs_m, offs_n, row_ok[:, None] & col_ok[None, :], keep,
            seq_len, tk_rows, IK, tq_base + offs_n * stride_tql, IQT, NUM_K, NUM_Q,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: exp2(-inf - 0) = 0, no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    empty = l_i == 0.0  # every key masked: zero output, and lse = +inf so that recomputed probabilities are 0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(
        OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
        (acc / l_safe[:, None]).to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_ok)
    if NUM_V > 0:  # second pass: the rows' bucket sums of the final probabilities, for the encodings on values
        sv_rows = SV + pid_bh.to(tl.int64) * seq_len * nbv + offs_m * nbv
        for start_n in range(0, seq_len, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < seq_len
            tile_ok = row_ok[:, None] & col_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :])
            s = _tile_logits(
                q, k, scale, offs_m, offs_n, tile_ok, _kept_keys(MASK, b, seq_len, offs_n, HAS_MASK),
                seq_len, tk_rows, IK, tq_base + offs_n * stride_tql, IQT, NUM_K, NUM_Q,
            )  # fmt: skip
            p = tl.exp2(s - lse[:, None])
            for u in tl.static_range(NUM_V):
                ids = tl.load(IV + u * seq_len * seq_len + offs_m[:, None] * seq_len + offs_n[None, :], mask=tile_ok)
                tl.atomic_add(sv_rows[:, None] + ids, p, mask=tile_ok)


def _bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA, TK, IK, TQ, IQT, IV, GV, SV, DTK, DTQ, MASK,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol, stride_tkb, stride_tkh, stride_tkl, stride_tqb, stride_tqh, stride_tql,
    num_heads, seq_len, head_dim, nbk, nbq, nbv, scale,
    NUM_K: tl.constexpr, NUM_Q: tl.constexpr, NUM_V: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per block of keys; DQ, DK, DV (B, H, L, D) float32 contiguous; DTK, DTQ, SV, GV (B, H, L, nb)
    # float32 contiguous; DELTA (B, H, L) = rowsum(dO * O).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seq_len
    d_ok = offs_d < head_dim
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :], mask=kv_mask)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :], mask=kv_mask)
    keep = _kept_keys(MASK, b, seq_len, offs_n, HAS_MASK)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dq_base = DQ + bh * seq_len * head_dim
    tq_cols = TQ + b * stride_tqb + h * stride_tqh + offs_n * stride_tql  # (BLOCK_N,) table rows of the keys
    dtq_cols = DTQ + bh * seq_len * nbq + offs_n * nbq
    ids_stride = seq_len * seq_len
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, seq_len, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_len
        tile_ok = row_ok[:, None] & col_ok[None, :]
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dol + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * seq_len + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * seq_len + offs_m, mask=row_ok, other=0.0)
        tk_rows = TK + b * stride_tkb + h * stride_tkh + offs_m * stride_tkl
        s = _tile_logits(
            q, k, scale, offs_m, offs_n, tile_ok, keep, seq_len, tk_rows, IK, tq_cols, IQT, NUM_K, NUM_Q
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N); 0 for masked keys, empty rows and rows past L
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))  # dO . v_j, plus dO . W_u[ids[i, j]] per values term
        ids_off = offs_m[:, None] * seq_len + offs_n[None, :]
        for u in tl.static_range(NUM_V):
            ids = tl.load(IV + u * ids_stride + ids_off, mask=tile_ok, other=0)
            dp += tl.load(GV + bh * seq_len * nbv + offs_m[:, None] * nbv + ids, mask=tile_ok, other=0.0)
            tl.atomic_add(SV + bh * seq_len * nbv + offs_m[:, None] * nbv + ids, p, mask=tile_ok)
        ds = p * (dp - delta[:, None])  # gradient of the (natural-unit) logits
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dq = tl.dot(ds.to(k.dtype), k) * scale
        tl.atomic_add(dq_base + offs_m[:, None] * head_dim + offs_d[None, :], dq, mask=q_mask)
        for u in tl.static_range(NUM_K):  # the gather's adjoint: bucket sums of ds into the queries' table rows
            ids = tl.load(IK + u * ids_stride + ids_off, mask=tile_ok, other=0)
            tl.atomic_add(DTK + bh * seq_len * nbk + offs_m[:, None] * nbk + ids, ds, mask=tile_ok)
        for u in tl.static_range(NUM_Q):  # and into the keys' table rows
            ids = tl.load(IQT + u * ids_stride + ids_off, mask=tile_ok, other=0)
            tl.atomic_add(dtq_cols[None, :] + ids, ds, mask=tile_ok)
    out_off = bh * seq_len * head_dim + offs_n[:, None] * head_dim + offs_d[None, :]
    tl.store(DK + out_off, dk * scale, mask=kv_mask)
    tl.store(DV + out_off, dv, mask=kv_mask)


if triton is not None:  # decorated on import, in the mode Triton itself was imported in (see interpreting())
    _tile_logits = triton.jit(_tile_logits)
    _kept_keys = triton.jit(_kept_keys)
    _fwd_kernel = triton.jit(_fwd_kernel)
    _bwd_kernel = triton.jit(_bwd_kernel)


# ----------------------------------------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------------------------------------


def _launch_config(device: torch.device, head_dim: int) -> dict[str, int]:
    """Tile sizes and warps. On CUDA 64 x 64 tiles (a ``(64, d)`` block of q, k, v and dO each in registers or shared
    memory at d <= 64); 64 x 32 and 8 warps beyond. The interpreter takes 16 x 16 tiles so that small test sequences
    cross several tiles and a partial last one."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d)
    if block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=2)


def _stack_ids(indices: tuple[torch.Tensor, ...], offsets: tuple[int, ...], transpose: bool) -> torch.Tensor:
    """The terms' ``(L, L)`` bucket ids as the kernels read them: int32, each shifted by its term's offset into the
    concatenated buckets (transposed for terms on queries), stacked ``(U, L, L)``."""
    ids = [(index.t() if transpose else index).to(torch.int32) + offset for index, offset in zip(indices, offsets)]
    return torch.stack(ids).contiguous()


# The modules' bucket ids are one shared, read-only tensor per grid and config (irpe's ids cache), so their stacked
# int32 form is made once per process rather than at every step of every layer (and one copy is saved for
# backward, not one per layer). The cache keeps its keys alive, so a tensor's identity is a safe key.
_stacked_ids = functools.lru_cache(maxsize=32)(_stack_ids)


class _Combined:
    """The terms of one kind (on keys, on queries or on values) as the kernels take them: their bucket ids stacked
    ``(U, L, L)`` int32, each term's offset into the concatenated buckets added, and each term's bucket span."""

    def __init__(self, terms: Sequence[FusedTerm], device: torch.device, transpose: bool, values: bool) -> None:
        self.spans: list[tuple[int, int]] = []
        offset = 0
        for term in terms:
            # q/k: contextual (Hm, d, nb) or bias (Hm, nb); values: (Hm, nb, d)
            nb = term.weight.size(-2) if values else term.weight.size(-1)
            self.spans.append((offset, offset + nb))
            offset += nb
        self.num_buckets = offset
        if not terms:
            self.ids = torch.zeros(1, dtype=torch.int32, device=device)
            return
        stack = _stack_ids if torch.compiler.is_compiling() else _stacked_ids
        self.ids = stack(tuple(term.index for term in terms), tuple(a for a, _ in self.spans), transpose)


def _tables(terms: Sequence[FusedTerm], x: torch.Tensor, scale: float) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The terms' per-row tables (float32) concatenated along the buckets, ``(B|1, H|1, L, nb_total)``, and the
    strides ``(batch, head, row)`` the kernel indexes them with (0 along a broadcast dimension)."""
    parts = [irpe.per_row_table(term.weight.float(), term.is_bias, x, scale) for term in terms]
    batch = max(p.size(0) for p in parts)
    heads = max(p.size(1) for p in parts)
    table = torch.cat([p.expand(batch, heads, *p.shape[2:]) for p in parts], dim=-1)  # (B|1, H|1, L, nb_total)
    strides = tuple(0 if table.size(i) == 1 else table.stride(i) for i in range(3))
    return table, strides


def _table_grads(
    term: FusedTerm, grad_table: torch.Tensor, x: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Back through ``irpe.per_row_table``: the weight's gradient and ``x``'s (``None`` for a bias term).

    Args:
        grad_table: ``(B, H, L, nb)`` float32, the gradient of the term's table.
        x: float32 ``(B, H, L, d)``, the tensor the table was computed from (keys for a term on queries).
    """
    weight = term.weight
    if term.is_bias:
        Hm, nb = weight.shape
        return grad_table.sum_to_size(1, Hm, 1, nb).view(Hm, nb), None
    w = weight.float()
    dx = torch.matmul(grad_table, (w * scale).transpose(-2, -1))  # (B, H, L, d)
    grad_w = torch.matmul(x.transpose(-2, -1), grad_table).mul_(scale).sum(0).sum_to_size(weight.shape)  # (Hm, d, nb)
    return grad_w, dx


def _check_inputs(q, k, v, terms, value_terms, key_padding_mask) -> None:
    if not (q.dim() == k.dim() == v.dim() == 4) or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"triton_rpe_attention: q, k, v must all be (B, H, L, head_dim) of one shape (self-attention), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"triton_rpe_attention: q, k, v must share one dtype of float16, bfloat16 or float32, got {q.dtype}, "
            f"{k.dtype}, {v.dtype}"
        )
    L = q.size(2)
    for term in (*terms, *value_terms):
        if term.index.shape != (L, L):
            raise ValueError(f"triton_rpe_attention: bucket ids {tuple(term.index.shape)} do not match L={L}")
    for term in value_terms:
        if term.is_bias or term.is_query or term.weight.dim() != 3:
            raise ValueError("triton_rpe_attention: an encoding on values is contextual, weight (Hm, nb, head_dim)")
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (q.size(0), L)
    ):
        raise ValueError(
            f"triton_rpe_attention: key_padding_mask must be bool (B, L) = ({q.size(0)}, {L}) with True for a masked "
            f"key, got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _alert_not_deterministic(caller: str) -> None:
    """What PyTorch does for its own nondeterministic kernels under ``torch.use_deterministic_algorithms(True)``: an
    error, or a warning with ``warn_only=True``. The kernels add with float atomics (the values terms' bucket sums,
    ``dq`` and the tables' gradients), so the last bits of those sums vary between runs."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{caller} adds with float atomics and has no deterministic implementation, but "
        "torch.use_deterministic_algorithms(True) is set; use attn_impl='math' for bitwise reproducible runs"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


class _TritonRPEAttention(torch.autograd.Function):
    """``P @ v + sum_u bucket_sum(P, ids_u) @ W_u`` with ``P = softmax(q k^T * scale + terms)``, in the kernels above.

    Tensor arguments after ``num_values``: the terms' weights, their ids, the values terms' weights and ids. Saves
    ``q, k, v``, the output, the ``(B, H, L)`` log-sum-exp, the weights and the ``(U, L, L)`` int32 ids; recomputes
    the per-row tables.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float, kinds: tuple[tuple[bool, bool], ...], num_values: int, *tensors):
        n = len(kinds)
        terms = [FusedTerm(w, i, *kind) for w, i, kind in zip(tensors[:n], tensors[n : 2 * n], kinds)]
        value_weights = tensors[2 * n : 2 * n + num_values]
        value_terms = [FusedTerm(w, i, False, False) for w, i in zip(value_weights, tensors[2 * n + num_values :])]
        key_terms = [t for t in terms if not t.is_query]
        query_terms = [t for t in terms if t.is_query]
        if value_terms:
            _alert_not_deterministic("the Triton iRPE attention's forward with encodings on values")
        device = q.device
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        combined = (
            _Combined(key_terms, device, transpose=False, values=False),
            _Combined(query_terms, device, transpose=True, values=False),
            _Combined(value_terms, device, transpose=False, values=True),
        )
        with autocast_disabled(device.type), torch.no_grad():
            out, lse, sums = _forward(q, k, v, mask, scale, key_terms, query_terms, combined)
            if value_terms:
                out = out + sum(
                    torch.matmul(sums[..., a:b], w.float()) for (a, b), w in zip(combined[2].spans, value_weights)
                )
                out = out.to(q.dtype)
        weights = [t.weight for t in terms]
        ids = [c.ids for c in combined]
        ctx.save_for_backward(q, k, v, out, lse, mask, *ids, *weights, *value_weights)  # the ids: (U, L, L) int32
        ctx.scale, ctx.kinds, ctx.num_values = scale, kinds, num_values
        ctx.spans = tuple(c.spans for c in combined)
        ctx.num_buckets = tuple(c.num_buckets for c in combined)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        _alert_not_deterministic("the Triton iRPE attention's backward")
        q, k, v, out, lse, mask, ids_k, ids_q, ids_v, *weights = ctx.saved_tensors
        n, nv, scale = len(ctx.kinds), ctx.num_values, ctx.scale
        weights, value_weights = weights[:n], weights[n:]
        terms = [FusedTerm(w, None, *kind) for w, kind in zip(weights, ctx.kinds)]  # the ids are in ids_k, ids_q
        key_terms = [t for t in terms if not t.is_query]
        query_terms = [t for t in terms if t.is_query]
        B, H, L, D = q.shape
        f32 = dict(dtype=torch.float32, device=q.device)
        with autocast_disabled(q.device.type), torch.no_grad():
            do = _last_dim_contiguous(grad_out)
            qf, kf = q.float(), k.float()
            tk, tk_strides = _tables(key_terms, qf, scale) if key_terms else (q, (0, 0, 0))
            tq, tq_strides = _tables(query_terms, kf, scale) if query_terms else (q, (0, 0, 0))
            nbk, nbq, nbv = ctx.num_buckets
            dof = do.float()
            delta = (dof * out.float()).sum(-1).contiguous()  # (B, H, L): rowsum(P * dP) = dO . O
            gv = (
                torch.cat([torch.matmul(dof, w.float().transpose(-2, -1)) for w in value_weights], -1).contiguous()
                if nv
                else q
            )  # (B, H, L, nbv): dO . W_u[bucket], gathered into dP
            dq = torch.zeros(B, H, L, D, **f32)
            dk, dv = torch.empty(B, H, L, D, **f32), torch.empty(B, H, L, D, **f32)
            dtk = torch.zeros(B, H, L, nbk, **f32) if key_terms else q
            dtq = torch.zeros(B, H, L, nbq, **f32) if query_terms else q
            sums = torch.zeros(B, H, L, nbv, **f32) if nv else q
            config = _launch_config(q.device, D)
            grid = (triton.cdiv(L, config["BLOCK_N"]), B * H)
            _bwd_kernel[grid](
                q, k, v, do, dq, dk, dv, lse, delta, tk, ids_k, tq, ids_q, ids_v, gv, sums, dtk, dtq,
                q if mask is None else mask,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *tk_strides, *tq_strides,
                H, L, D, nbk, nbq, nbv, scale,
                NUM_K=len(key_terms), NUM_Q=len(query_terms), NUM_V=nv, HAS_MASK=mask is not None, **config,
            )  # fmt: skip
            grad_weights = {}
            for group, grad_tables, x, dx_out, spans in (
                (key_terms, dtk, qf, dq, ctx.spans[0]),
                (query_terms, dtq, kf, dk, ctx.spans[1]),
            ):
                for term, (a, b) in zip(group, spans):
                    grad_w, dx = _table_grads(term, grad_tables[..., a:b], x, scale)
                    grad_weights[id(term)] = grad_w
                    if dx is not None:
                        dx_out += dx
            grad_values = [
                torch.matmul(sums[..., a:b].transpose(-2, -1), dof).sum(0).sum_to_size(w.shape).to(w.dtype)
                for (a, b), w in zip(ctx.spans[2], value_weights)
            ]  # bucket_sum(P)^T @ dO, (Hm, nb, d)
        grads = [grad_weights[id(t)].to(t.weight.dtype) for t in terms]
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None,
            *grads, *([None] * n), *grad_values, *([None] * nv),
        )  # fmt: skip


def _forward(q, k, v, mask, scale, key_terms, query_terms, combined):
    """Runs the forward kernel: the output (float32 when values terms follow, else q's dtype), the base-2 log-sum-exp
    ``(B, H, L)`` and the values terms' bucket sums ``(B, H, L, nbv)`` (``None`` without)."""
    B, H, L, D = q.shape
    ck, cq, cv = combined
    tk, tk_strides = _tables(key_terms, q.float(), scale) if key_terms else (q, (0, 0, 0))
    tq, tq_strides = _tables(query_terms, k.float(), scale) if query_terms else (q, (0, 0, 0))
    num_values = len(cv.spans)
    out = torch.empty(B, H, L, D, dtype=torch.float32 if num_values else q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    sums = torch.zeros(B, H, L, cv.num_buckets, dtype=torch.float32, device=q.device) if num_values else None
    config = _launch_config(q.device, D)
    grid = (triton.cdiv(L, config["BLOCK_M"]), B * H)
    _fwd_kernel[grid](
        q, k, v, out, lse, q if sums is None else sums, tk, ck.ids, tq, cq.ids, cv.ids, q if mask is None else mask,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *tk_strides, *tq_strides,
        H, L, D, cv.num_buckets, scale,
        NUM_K=len(key_terms), NUM_Q=len(query_terms), NUM_V=num_values, HAS_MASK=mask is not None, **config,
    )  # fmt: skip
    return out, lse, sums


def triton_rpe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    terms: Sequence[FusedTerm],
    value_terms: Sequence[FusedTerm] = (),
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with iRPE in the Triton kernels: ``softmax(q k^T * scale + terms) @ v + values terms``.

    Args:
        q, k, v: ``(B, H, L, head_dim)``, float16, bfloat16 or float32 (half types computed with float32
            accumulation, probabilities rounded to the half type before ``@ v`` as flash attention does), not scaled.
        scale: the logit scale (``head_dim ** -0.5``).
        terms: encodings on queries and keys (``irpe`` modules' ``fused_terms``; ``cross`` gives two per encoding).
        value_terms: contextual encodings on values.
        key_padding_mask: ``(B, L)`` bool, True for a key no query may attend to (``nn.MultiheadAttention``'s
            convention); a query whose keys are all masked returns zeros.

    Returns:
        ``(B, H, L, head_dim)`` in q's dtype.

    Raises:
        ValueError: Triton is missing, the tensors' device cannot run it (CPU needs ``TRITON_INTERPRET=1``), or the
            shapes and dtypes do not fit.
    """
    usable, why = triton_usable(q.device)
    if not usable:
        raise ValueError(f"the Triton attention kernel cannot run: {why}")
    _check_inputs(q, k, v, terms, value_terms, key_padding_mask)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    kinds = tuple((term.is_bias, term.is_query) for term in terms)
    return _TritonRPEAttention.apply(
        q, k, v, mask, scale, kinds, len(value_terms),
        *[t.weight for t in terms], *[t.index for t in terms],
        *[t.weight for t in value_terms], *[t.index for t in value_terms],
    )  # fmt: skip
