"""numba CPU backend of the fused retrieval-attention op (same contract as ``reference.py``).

Two kernels, both fusing block scoring, top-k selection and attention with an online softmax:

* decode (``C == 1``): one task per (batch row, KV head) under ``prange``; the group's G queries
  are scored against the block representatives, the top-k blocks picked, then sinks + selected
  blocks + local window are streamed tile by tile straight from the cache (no gather copy). The
  re-rotation of moved keys (see ``layout.py``) is applied to the *queries* instead:
  ``q . R(d) k == R(-d) q . k``, so a block costs G small rotations instead of S key rotations.
* prefill chunk (``C > 1``): a first ``prange`` over (row, KV head) computes the selection and the
  cos/sin tables of every moved region; a second ``prange`` runs over (row, KV head, tile of 48/G
  query positions x G heads), so a chunk of 512 queries makes ~100 balanced tasks. Each task
  streams the key tiles; keys of moved regions are re-rotated into a 64 x D scratch tile (L1),
  the local window is read in place with the causal mask applied only to the tiles that need it.

Inner loops are register-blocked (4 query rows x 4 keys for QK^T, 8 keys per pass for PV) and
written so that LLVM vectorises them (AVX2/AVX-512); ``exp`` is a vectorisable Cephes-style
``exp2`` polynomial (~2 ulp), scores are kept in log2 units (scale folded into the queries).

Data, zero copy: K/V/reps are passed as flat 1-D views of their storage plus element strides, so
the cache buffer (any batch/head strides, last dim contiguous) is read in place. fp32 tensors are
read directly; bf16 tensors are read in place as their raw 16-bit patterns and widened to fp32
in the kernel (exact; a shift), so bf16 costs no conversion pass over the cache. Only q (the
chunk) is converted to fp32 (``C x Hq x D`` elements), and the fp32 output is cast back to q's
dtype. Other dtypes (fp16, fp64) are declared unsupported (``auto`` then uses the reference).

Numerics: everything accumulates in fp32; re-rotated keys stay in fp32 (the reference rounds them
to the storage dtype, so bf16 results differ by a bf16 rounding of moved keys, well inside bf16
tolerance). Selection scores are accumulated in fp64 then rounded, ties go to the lower block
index (as the reference). Inputs must be finite (``fastmath``); NaN/inf in q/k/v give garbage,
not NaN.

Compilation: ``cache=True``, so only the first process on a machine compiles (~20 s for all four
specialisations: decode/prefill x fp32/bf16); later processes load the cache (< 1 s). The first
call of each specialisation in a process pays that load; ``warmup()`` does it up front.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .dispatch import register_backend
from .layout import OpParams

LOG2E = 1.4426950408889634
NEG = np.float32(-1.0e30)  # finite "minus infinity" (fastmath assumes no inf)
TK = 64                    # keys per tile
TQ_ROWS = 48               # query rows (positions x group heads) per prefill task
MR = 4                     # query rows per microkernel pass

_JIT = dict(cache=True, fastmath=True, nogil=True)


# ---------------------------------------------------------------------------------------------
# bit-level helpers (LLVM intrinsics: vectorisable, no calls)

@intrinsic
def _bits_to_f32(typingctx, x):
    """int32 bit pattern -> float32."""
    if x != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _bf16_to_f32(typingctx, x):
    """bf16 bit pattern (stored as int16) -> float32: zero-extend, shift left 16, bitcast."""
    if x != types.int16:
        return None

    def codegen(context, builder, signature, args):
        w = builder.zext(args[0], ir.IntType(32))
        w = builder.shl(w, ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(w, ir.FloatType())

    return types.float32(types.int16), codegen


def _ldf(a, i):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_ldf, inline="always")
def _ldf_ov(a, i):
    """Load element ``i`` of a flat fp32 array, or of a bf16 array stored as int16, as fp32."""
    if isinstance(a, types.Array) and a.dtype == types.float32:
        return lambda a, i: a[i]
    if isinstance(a, types.Array) and a.dtype == types.int16:
        return lambda a, i: _bf16_to_f32(a[i])
    return None


@njit(inline="always", **_JIT)
def _exp2(x):
    """2**x for x <= 0 (softmax); 0 below -126. Cephes exp2f polynomial, ~2 ulp."""
    xc = max(x, np.float32(-126.0))
    fi = np.floor(xc + np.float32(0.5))
    f = xc - fi
    p = np.float32(1.535336188319500e-4)
    p = p * f + np.float32(1.339887440266574e-3)
    p = p * f + np.float32(9.618437357674640e-3)
    p = p * f + np.float32(5.550332471162809e-2)
    p = p * f + np.float32(2.402264791363012e-1)
    p = p * f + np.float32(6.931472028550421e-1)
    p = p * f + np.float32(1.0)
    two = _bits_to_f32(np.int32((np.int32(fi) + np.int32(127)) << np.int32(23)))
    r = np.float32(p * two)
    return r if x >= np.float32(-126.0) else np.float32(0.0)


# ---------------------------------------------------------------------------------------------
# microkernels

@njit(**_JIT)
def _qk(Q, rows, K, kbase, ksp, nk, D, S):
    """S[r, j] = Q[r, :D] . K[kbase + j*ksp : +D] for r < rows (multiple of 4), j < nk."""
    for r in range(0, rows, 4):
        j = 0
        while j + 4 <= nk:
            o0 = kbase + j * ksp
            o1 = o0 + ksp
            o2 = o1 + ksp
            o3 = o2 + ksp
            s00 = s01 = s02 = s03 = np.float32(0.0)
            s10 = s11 = s12 = s13 = np.float32(0.0)
            s20 = s21 = s22 = s23 = np.float32(0.0)
            s30 = s31 = s32 = s33 = np.float32(0.0)
            for d in range(D):
                q0 = Q[r, d]
                q1 = Q[r + 1, d]
                q2 = Q[r + 2, d]
                q3 = Q[r + 3, d]
                k0 = _ldf(K, o0 + d)
                k1 = _ldf(K, o1 + d)
                k2 = _ldf(K, o2 + d)
                k3 = _ldf(K, o3 + d)
                s00 += q0 * k0
                s01 += q0 * k1
                s02 += q0 * k2
                s03 += q0 * k3
                s10 += q1 * k0
                s11 += q1 * k1
                s12 += q1 * k2
                s13 += q1 * k3
                s20 += q2 * k0
                s21 += q2 * k1
                s22 += q2 * k2
                s23 += q2 * k3
                s30 += q3 * k0
                s31 += q3 * k1
                s32 += q3 * k2
                s33 += q3 * k3
            S[r, j] = s00
            S[r, j + 1] = s01
            S[r, j + 2] = s02
            S[r, j + 3] = s03
            S[r + 1, j] = s10
            S[r + 1, j + 1] = s11
            S[r + 1, j + 2] = s12
            S[r + 1, j + 3] = s13
            S[r + 2, j] = s20
            S[r + 2, j + 1] = s21
            S[r + 2, j + 2] = s22
            S[r + 2, j + 3] = s23
            S[r + 3, j] = s30
            S[r + 3, j + 1] = s31
            S[r + 3, j + 2] = s32
            S[r + 3, j + 3] = s33
            j += 4
        while j < nk:
            o0 = kbase + j * ksp
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for d in range(D):
                k0 = _ldf(K, o0 + d)
                s0 += Q[r, d] * k0
                s1 += Q[r + 1, d] * k0
                s2 += Q[r + 2, d] * k0
                s3 += Q[r + 3, d] * k0
            S[r, j] = s0
            S[r + 1, j] = s1
            S[r + 2, j] = s2
            S[r + 3, j] = s3
            j += 1


@njit(**_JIT)
def _pv(P, rows, V, vbase, vsp, nk, D, O):
    """O[r, :D] += sum_j P[r, j] * V[vbase + j*vsp : +D] for r < rows, j < nk."""
    j = 0
    while j + 8 <= nk:
        o0 = vbase + j * vsp
        o1 = o0 + vsp
        o2 = o1 + vsp
        o3 = o2 + vsp
        o4 = o3 + vsp
        o5 = o4 + vsp
        o6 = o5 + vsp
        o7 = o6 + vsp
        for r in range(rows):
            p0 = P[r, j]
            p1 = P[r, j + 1]
            p2 = P[r, j + 2]
            p3 = P[r, j + 3]
            p4 = P[r, j + 4]
            p5 = P[r, j + 5]
            p6 = P[r, j + 6]
            p7 = P[r, j + 7]
            for d in range(D):
                O[r, d] += ((p0 * _ldf(V, o0 + d) + p1 * _ldf(V, o1 + d))
                            + (p2 * _ldf(V, o2 + d) + p3 * _ldf(V, o3 + d))) \
                    + ((p4 * _ldf(V, o4 + d) + p5 * _ldf(V, o5 + d))
                       + (p6 * _ldf(V, o6 + d) + p7 * _ldf(V, o7 + d)))
        j += 8
    while j < nk:
        o0 = vbase + j * vsp
        for r in range(rows):
            p0 = P[r, j]
            for d in range(D):
                O[r, d] += p0 * _ldf(V, o0 + d)
        j += 1


@njit(**_JIT)
def _softmax_step(S, rows, nk, m, l, O, D):
    """Online-softmax update with the scores S[:rows, :nk] (log2 units); S becomes P."""
    for r in range(rows):
        mt = NEG
        for j in range(nk):
            mt = max(mt, S[r, j])
        mo = m[r]
        mn = max(mo, mt)
        tot = np.float32(0.0)
        for j in range(nk):
            p = _exp2(S[r, j] - mn)
            S[r, j] = p
            tot += p
        if mn > mo:
            alpha = _exp2(mo - mn)
            l[r] = l[r] * alpha + tot
            for d in range(D):
                O[r, d] *= alpha
            m[r] = mn
        else:
            l[r] += tot


@njit(**_JIT)
def _causal_mask(S, rows, nk, kpos0, qpos0, G):
    """Row r is the query at position qpos0 + r // G; mask keys at positions > it."""
    for r in range(rows):
        first = qpos0 + r // G - kpos0 + 1  # first masked column
        if first < 0:
            first = 0
        for j in range(first, nk):
            S[r, j] = NEG


@njit(**_JIT)
def _rot_table(delta, invf, cs):
    """cs[:h] = cos, cs[h:] = sin of the fp32 angle delta * inv_freq (as the reference)."""
    h = invf.shape[0]
    df = np.float32(delta)
    for i in range(h):
        a = np.float32(df * invf[i])
        cs[i] = np.float32(math.cos(np.float64(a)))
        cs[h + i] = np.float32(math.sin(np.float64(a)))


@njit(**_JIT)
def _rotate_keys(K, kbase, ksp, nk, D, cs, Ks):
    """Ks[j] = rerotate(K[kbase + j*ksp]) with the table cs (rotate-half convention)."""
    h = D // 2
    for j in range(nk):
        o = kbase + j * ksp
        for i in range(h):
            a = _ldf(K, o + i)
            b = _ldf(K, o + h + i)
            c = cs[i]
            s = cs[h + i]
            Ks[j, i] = a * c - b * s
            Ks[j, h + i] = b * c + a * s


@njit(**_JIT)
def _rotate_queries(Q, rows, D, cs, Qr):
    """Qr = R(-delta) Q, so that Qr . k == Q . R(delta) k."""
    h = D // 2
    for r in range(rows):
        for i in range(h):
            a = Q[r, i]
            b = Q[r, h + i]
            c = cs[i]
            s = cs[h + i]
            Qr[r, i] = a * c + b * s
            Qr[r, h + i] = b * c - a * s


@njit(**_JIT)
def _select(qbar, R_, D, reps, rbase, rsj, rsr, nmid, nsel, scaling, bias, bi, has_bias, out):
    """Top-``nsel`` of the ``nmid`` block scores, ascending, ties to the lower index -> out."""
    sc = np.empty(nmid, np.float32)
    sf = np.float32(scaling)
    for j in range(nmid):
        best = -1.0e300
        for r in range(R_):
            o = rbase + j * rsj + r * rsr
            acc = 0.0
            for d in range(D):
                acc += np.float64(qbar[d]) * np.float64(_ldf(reps, o + d))
            best = max(best, acc)
        s = np.float32(np.float32(best) * sf)
        if has_bias:
            s = np.float32(s + bias[bi, j])
        sc[j] = s
    # the nsel-th largest value, then take everything above it and the lowest-index ties
    kth = np.partition(sc, nmid - nsel)[nmid - nsel]
    n_gt = 0
    for j in range(nmid):
        if sc[j] > kth:
            n_gt += 1
    need_eq = nsel - n_gt
    c = 0
    for j in range(nmid):
        s = sc[j]
        if s > kth:
            out[c] = j
            c += 1
        elif s == kth and need_eq > 0:
            out[c] = j
            c += 1
            need_eq -= 1


@njit(**_JIT)
def _layout(t, S, topk, sink, local):
    s_end = min(sink, t)
    nmid = max(0, (t - local - s_end) // S)
    return s_end, nmid, s_end + nmid * S, min(topk, nmid)


@njit(**_JIT)
def _group_selection(q, b, h, G, C, n, D, reps, rbase, rsj, rsr, R_, nmid, nsel, scaling,
                     bias, has_bias, sel_out):
    """Selection for one (row, KV head); mirrors the reference (take all when it fits)."""
    if nsel == nmid:
        for i in range(nsel):
            sel_out[i] = i
        return
    if nsel == 0:
        return
    acc = np.zeros(D, np.float64)
    for g in range(G):
        hq = h * G + g
        for i in range(C - n, C):
            for d in range(D):
                acc[d] += q[b, hq, i, d]
    qbar = np.empty(D, np.float32)
    for d in range(D):
        qbar[d] = np.float32(acc[d] / (G * n))
    _select(qbar, R_, D, reps, rbase, rsj, rsr, nmid, nsel, scaling, bias, b, has_bias, sel_out)


# ---------------------------------------------------------------------------------------------
# decode (C == 1)

@njit(parallel=True, **_JIT)
def _decode_kernel(q, kf, vf, ksb, ksh, ksp, vsb, vsh, vsp, repsf, rsb, rsh, rsj, rsr, R_,
                   lengths, n_new, S, topk, sink, local, scaling, invf, bias, has_bias,
                   out, selected):
    B, Hq, C, D = q.shape
    Hkv = selected.shape[1]
    G = Hq // Hkv
    rows = ((G + MR - 1) // MR) * MR
    qscale = np.float32(scaling * LOG2E)
    for task in prange(B * Hkv):
        b = task // Hkv
        h = task - b * Hkv
        n = n_new[b]
        if n == 0:
            continue
        L = lengths[b]
        t = L - n
        s_end, nmid, local_start, nsel = _layout(t, S, topk, sink, local)
        sel = selected[b, h]
        _group_selection(q, b, h, G, C, n, D, repsf, b * rsb + h * rsh, rsj, rsr, R_, nmid, nsel,
                         scaling, bias, has_bias, sel)
        Qs = np.zeros((rows, D), np.float32)
        for g in range(G):
            for d in range(D):
                Qs[g, d] = q[b, h * G + g, C - 1, d] * qscale
        Qr = np.zeros((rows, D), np.float32)
        cs = np.empty(D, np.float32)
        Sc = np.empty((rows, TK), np.float32)
        O = np.zeros((rows, D), np.float32)
        m = np.full(rows, NEG, np.float32)
        l = np.zeros(rows, np.float32)
        kb = b * ksb + h * ksh
        vb = b * vsb + h * vsh
        # regions: -1 = sinks, 0..nsel-1 = selected blocks, nsel = local window
        for reg in range(-1, nsel + 1):
            if reg == -1:
                p0 = 0
                cnt = s_end
                delta = (nmid - nsel) * S
            elif reg < nsel:
                blk = sel[reg]
                p0 = s_end + blk * S
                cnt = S
                delta = (nmid - nsel + reg - blk) * S
            else:
                p0 = local_start
                cnt = L - local_start
                delta = 0
            if cnt <= 0:
                continue
            if delta != 0:
                _rot_table(delta, invf, cs)
                _rotate_queries(Qs, rows, D, cs, Qr)
                Qx = Qr
            else:
                Qx = Qs
            for j0 in range(0, cnt, TK):
                nk = min(TK, cnt - j0)
                _qk(Qx, rows, kf, kb + (p0 + j0) * ksp, ksp, nk, D, Sc)
                _softmax_step(Sc, rows, nk, m, l, O, D)
                _pv(Sc, rows, vf, vb + (p0 + j0) * vsp, vsp, nk, D, O)
        for g in range(G):
            inv = np.float32(1.0) / l[g]
            for d in range(D):
                out[b, h * G + g, C - 1, d] = O[g, d] * inv


# ---------------------------------------------------------------------------------------------
# prefill chunk (C > 1)

@njit(parallel=True, **_JIT)
def _prefill_select(q, repsf, rsb, rsh, rsj, rsr, R_, lengths, n_new, S, topk, sink, local,
                    scaling, invf, bias, has_bias, selected, rot):
    """Phase 1: per (row, KV head) selection + cos/sin tables (slot 0 sinks, 1+i block i)."""
    B, Hq, C, D = q.shape
    Hkv = selected.shape[1]
    G = Hq // Hkv
    for task in prange(B * Hkv):
        b = task // Hkv
        h = task - b * Hkv
        n = n_new[b]
        if n == 0:
            continue
        t = lengths[b] - n
        s_end, nmid, local_start, nsel = _layout(t, S, topk, sink, local)
        sel = selected[b, h]
        _group_selection(q, b, h, G, C, n, D, repsf, b * rsb + h * rsh, rsj, rsr, R_, nmid, nsel,
                         scaling, bias, has_bias, sel)
        _rot_table((nmid - nsel) * S, invf, rot[b, h, 0])
        for i in range(nsel):
            _rot_table((nmid - nsel + i - sel[i]) * S, invf, rot[b, h, 1 + i])


@njit(parallel=True, **_JIT)
def _prefill_attend(q, kf, vf, ksb, ksh, ksp, vsb, vsh, vsp, lengths, n_new, S, topk, sink,
                    local, scaling, tq, tasks, selected, rot, out):
    """Phase 2: one task per (row, KV head, tile of tq query positions x G heads)."""
    B, Hq, C, D = q.shape
    Hkv = selected.shape[1]
    G = Hq // Hkv
    rows_max = ((tq * G + MR - 1) // MR) * MR
    qscale = np.float32(scaling * LOG2E)
    for ti in prange(tasks.shape[0]):
        b = tasks[ti, 0]
        h = tasks[ti, 1]
        i0 = tasks[ti, 2]
        n = n_new[b]
        L = lengths[b]
        t = L - n
        s_end, nmid, local_start, nsel = _layout(t, S, topk, sink, local)
        npos = min(tq, n - i0)
        rows = ((npos * G + MR - 1) // MR) * MR
        Qs = np.zeros((rows_max, D), np.float32)
        for pi in range(npos):
            ci = C - n + i0 + pi
            for g in range(G):
                for d in range(D):
                    Qs[pi * G + g, d] = q[b, h * G + g, ci, d] * qscale
        Sc = np.empty((rows_max, TK), np.float32)
        Ks = np.empty((TK, D), np.float32)
        O = np.zeros((rows_max, D), np.float32)
        m = np.full(rows_max, NEG, np.float32)
        l = np.zeros(rows_max, np.float32)
        kb = b * ksb + h * ksh
        vb = b * vsb + h * vsh
        qpos0 = t + i0
        qlast = qpos0 + npos - 1
        sel = selected[b, h]
        for reg in range(-1, nsel + 1):
            if reg == -1:
                p0 = 0
                cnt = s_end
                moved = nmid > nsel
            elif reg < nsel:
                p0 = s_end + sel[reg] * S
                cnt = S
                moved = nmid - nsel + reg != sel[reg]
            else:
                p0 = local_start
                cnt = qlast + 1 - local_start  # causal: nothing past the tile's last query
                moved = False
            for j0 in range(0, cnt, TK):
                nk = min(TK, cnt - j0)
                if moved:
                    _rotate_keys(kf, kb + (p0 + j0) * ksp, ksp, nk, D, rot[b, h, reg + 1], Ks)
                    _qk(Qs, rows, Ks.reshape(TK * D), 0, D, nk, D, Sc)
                else:
                    _qk(Qs, rows, kf, kb + (p0 + j0) * ksp, ksp, nk, D, Sc)
                if p0 + j0 + nk - 1 > qpos0:
                    _causal_mask(Sc, rows, nk, p0 + j0, qpos0, G)
                _softmax_step(Sc, rows, nk, m, l, O, D)
                _pv(Sc, rows, vf, vb + (p0 + j0) * vsp, vsp, nk, D, O)
        for pi in range(npos):
            ci = C - n + i0 + pi
            for g in range(G):
                r = pi * G + g
                inv = np.float32(1.0) / l[r]
                for d in range(D):
                    out[b, h * G + g, ci, d] = O[r, d] * inv


# ---------------------------------------------------------------------------------------------
# torch glue

_SUPPORTED = (torch.float32, torch.bfloat16)


def _flat(x: torch.Tensor):
    """Zero-copy flat 1-D numpy view of ``x``'s storage span, plus element strides.

    fp32 -> float32 array, bf16 -> int16 array of the raw bits. Needs the last dim contiguous
    (else one copy is made)."""
    if x.dtype not in _SUPPORTED:
        x = x.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    span = 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride()))
    flat = torch.as_strided(x, (span,), (1,), x.storage_offset())
    if x.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.detach().numpy(), x.stride()


def _ints(x, B: int) -> np.ndarray:
    a = torch.as_tensor(x).detach().to("cpu", torch.int64).reshape(-1)
    if a.numel() != B:
        raise ValueError(f"expected {B} per-row values, got {a.numel()}")
    return a.numpy()


def _split_tasks(n_new: np.ndarray, Hkv: int, tq: int) -> np.ndarray:
    tasks = [(b, h, i0) for b in range(n_new.shape[0]) for h in range(Hkv)
             for i0 in range(0, int(n_new[b]), tq)]
    return np.asarray(tasks, dtype=np.int64).reshape(-1, 3)


def retrieval_attention_numba(q, k, v, reps, lengths, n_new, params: OpParams, inv_freq, bias=None):
    """numba implementation of ``retrieval_attention_ref`` (same signature and results)."""
    B, Hq, C, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if D % 2:
        raise ValueError(f"head dim must be even for RoPE, got {D}")
    G = Hq // Hkv
    S, topk = int(params.block_size), int(params.topk)
    q32 = q.detach().to(torch.float32).contiguous().numpy()
    if k.dtype != v.dtype:  # one specialisation per dtype pair is enough
        k, v = k.float(), v.float()
    kf, kst = _flat(k.detach())
    vf, vst = _flat(v.detach())
    R_ = reps.shape[3]
    if reps.dtype != k.dtype:
        reps = reps.to(k.dtype if k.dtype in _SUPPORTED else torch.float32)
    rf, rst = _flat(reps.detach())
    lens = _ints(lengths, B)
    nn = _ints(n_new, B)
    invf = inv_freq.detach().to("cpu", torch.float32).contiguous().numpy()
    if bias is None:
        b32, has_bias = np.zeros((1, 1), np.float32), False
    else:
        b32, has_bias = bias.detach().to("cpu", torch.float32).contiguous().numpy(), True
    out = np.zeros((B, Hq, C, D), np.float32)
    selected = np.full((B, Hkv, topk), -1, np.int64)
    scaling = float(params.scaling)
    if C == 1:
        _decode_kernel(q32, kf, vf, kst[0], kst[1], kst[2], vst[0], vst[1], vst[2],
                       rf, rst[0], rst[1], rst[2], rst[3], R_, lens, nn, S, topk,
                       int(params.sink), int(params.local), scaling, invf, b32, has_bias,
                       out, selected)
    else:
        rot = np.zeros((B, Hkv, topk + 1, D), np.float32)
        _prefill_select(q32, rf, rst[0], rst[1], rst[2], rst[3], R_, lens, nn, S, topk,
                        int(params.sink), int(params.local), scaling, invf, b32, has_bias,
                        selected, rot)
        tq = max(1, TQ_ROWS // G)
        tasks = _split_tasks(nn, Hkv, tq)
        if tasks.shape[0]:
            _prefill_attend(q32, kf, vf, kst[0], kst[1], kst[2], vst[0], vst[1], vst[2],
                            lens, nn, S, topk, int(params.sink), int(params.local), scaling, tq,
                            tasks, selected, rot, out)
    o = torch.from_numpy(out)
    return (o if q.dtype == torch.float32 else o.to(q.dtype)), torch.from_numpy(selected)


def _unsupported(q: torch.Tensor) -> str | None:
    if q.device.type != "cpu":
        return f"the numba backend runs on CPU tensors (got {q.device.type})"
    if q.dtype not in _SUPPORTED:
        return f"the numba backend supports float32 and bfloat16 (got {q.dtype})"
    return None


def warmup() -> None:
    """Compile (or load from the on-disk cache) every specialisation now, not on first use."""
    p = OpParams(block_size=4, topk=1, sink=2, local=4, scaling=0.5)
    inv = torch.ones(2)
    for dt in _SUPPORTED:
        for C in (1, 2):
            q = torch.zeros(1, 2, C, 4, dtype=dt)
            k = torch.zeros(1, 1, 16, 4, dtype=dt)
            reps = torch.zeros(1, 1, 4, 1, 4, dtype=dt)
            retrieval_attention_numba(q, k, k, reps, [16], [C], p, inv)


register_backend("numba", retrieval_attention_numba, _unsupported)
