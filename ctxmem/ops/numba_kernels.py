"""numba CPU backend of the fused retrieval-attention op (same contract as ``reference.py``).

Two kernels, both fusing block scoring, top-k selection and attention with an online softmax:

* decode (``C == 1``): one task per (batch row, KV head) under ``prange``; the group's G queries
  are scored against the block representatives, the top-k blocks picked, then sinks + selected
  blocks + local window are streamed tile by tile straight from the cache (no gather copy). The
  re-rotation of moved keys (see ``layout.py``) is applied to the *queries* instead:
  ``q . R(d) k == R(-d) q . k``, so a block costs G small rotations instead of S key rotations.
  Small decode steps (the usual case: ~0.3 ms at 16K for SmolLM2 shapes) run on one thread;
  see ``PARALLEL_MIN_FLOPS``.
* prefill chunk (``C > 1``): a first ``prange`` over (row, KV head) computes the selection and the
  cos/sin tables of every moved region; a second ``prange`` runs over (row, KV head, tile of 96/G
  query positions x G heads), so a 128-token chunk of SmolLM2 (G = 3) makes 12 tasks. Each task
  streams the key tiles; keys of moved regions are re-rotated into a 64 x D scratch tile (L1),
  the local window is read in place with the causal mask applied only to the tiles that need it.
  The two products of a tile, QK^T and PV, are BLAS sgemm calls (``np.dot`` on in-place views of
  the cache: no gather). On this machine they ran 1.2x (QK^T) and 2.2x (PV) faster than the
  register-blocked loops they replaced (48 rows x 64 keys x D 64, one thread), and the whole
  prefill op 1.3x faster at SmolLM2's 16K shapes (a 128-query chunk: 4.7 -> 3.6 ms on one thread,
  2.5 -> 1.9 ms on two). Tiles stay small enough for the BLAS to run each call on the calling
  thread (see ``SGEMM_SERIAL_MNK``): the parallelism is ours.

The decode kernel's inner loops are register-blocked (2 query rows x 4 keys for QK^T, 8 keys per
pass for PV) and written so that LLVM vectorises them (AVX2/AVX-512): a decode step has G rows,
too few for a BLAS call to pay. ``exp`` is a vectorisable Cephes-style ``exp2`` polynomial
(~2 ulp), and scores are kept in log2 units (scale folded into the queries).

Data, zero copy: K/V/reps are passed as flat 1-D views of their storage plus element strides, so
the cache buffer (any batch/head strides; each (row, head) a contiguous [positions, D] plane) is
read in place. fp32 tensors are read directly. bf16 tensors are read in place as their raw 16-bit
patterns and widened to fp32 (exact: a shift) in registers (decode) or tile by tile into an L1
scratch for BLAS (prefill), so bf16 needs no conversion pass over the cache and touches half the
bytes. The only conversions are q (the chunk, ``C x Hq x D`` values) to fp32 and the fp32 output
back to q's dtype. Other dtypes (fp16, fp64) are declared unsupported (``auto`` then uses the
reference). A cache whose planes are not contiguous is copied once per call.

Numerics: everything accumulates in fp32; re-rotated keys stay in fp32 (the reference rounds them
to the storage dtype, so bf16 results differ by a bf16 rounding of moved keys, well inside bf16
tolerance). Selection scores are accumulated in fp64 then rounded, ties go to the lower block
index (as the reference). Inputs must be finite (``fastmath``); NaN/inf in q/k/v give garbage,
not NaN. The kernels keep no state between calls (scratch is per task), so Python threads may call
the op at once (it releases the GIL) and get what serial calls get (tested); they then share the cores.

Per-layer options (``layout.py``), all runtime scalars (no extra specialisation): partial rotary
(``len(inv_freq) < D/2``: the rotations turn the first ``2 * len(inv_freq)`` dims, the rest are
copied), soft-capping (queries carry ``scaling`` only, each score tile becomes
``softcap * log2(e) * tanh(s / softcap)`` before the maxima and the mask) and sliding-window layers
(no selection; keys from ``max(0, p - window + 1)``, a band mask on the tiles that need it).

Compilation: ``cache=True``, so only the first process on a machine compiles (~40 s for all four
specialisations, decode/prefill x fp32/bf16, on this 2-core machine); later processes load the
cache (< 1 s). The first call of each specialisation in a process pays that load (or compile);
``warmup()`` does it up front.
"""
from __future__ import annotations

import math
import os

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .dispatch import OpCall, option_reasons, register_backend
from .layout import OpParams
from .reference import retrieval_attention_ref

LOG2E = 1.4426950408889634
NEG = np.float32(-1.0e30)  # finite "minus infinity" (fastmath assumes no inf)
TK = 64                    # keys per tile
TQ_ROWS = 96               # query rows (positions x group heads) per prefill task
# OpenBLAS threads a gemm once M*N*K reaches 2 x 65536 x GEMM_MULTITHREAD_THRESHOLD (4 by default).
# Our prange threads each call sgemm; a BLAS that spread those calls over threads of its own would
# fight them for the cores (OpenBLAS prints "Detect OpenMP Loop and this application may hang").
# So a task's rows are capped to keep every tile's M*N*K below that: 96 rows at head dim 64, 63 at 128.
SGEMM_SERIAL_MNK = 2 * 65536 * 4 - 1

_JIT = dict(cache=True, fastmath=True, nogil=True)
# Decode calls estimated below this many flops run on one thread: a ~0.3 ms decode step gains
# little from a second core, and on a loaded machine waking a descheduled worker thread can
# cost 10 ms or more (measured here: 0.3 ms serial vs 3-12 ms with 2 threads under load).
PARALLEL_MIN_FLOPS = int(os.environ.get("CTXMEM_NUMBA_PARALLEL_MIN_FLOPS", 30_000_000))


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
def _qk_dec(Q, rows, K, p0, nk, D, S, mx):
    """S[r, j] = Q[r, :D] . K[p0 + j, :D] for r < rows (a multiple of 2), j < nk; mx[r] = row max.

    For the G queries of a decode step: a 2 rows x 4 keys register block (G = 3 pads to 4 rows),
    the reduction over d vectorised, K read in place. The row max is folded in here: as a separate
    pass it is a serial chain that LLVM does not vectorise."""
    for r in range(0, rows, 2):
        m0 = m1 = NEG
        j = 0
        while j + 4 <= nk:
            ka = K[p0 + j]
            kb = K[p0 + j + 1]
            kc = K[p0 + j + 2]
            kd = K[p0 + j + 3]
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
            for d in range(D):
                q0 = Q[r, d]
                q1 = Q[r + 1, d]
                k0 = _ldf(ka, d)
                k1 = _ldf(kb, d)
                k2 = _ldf(kc, d)
                k3 = _ldf(kd, d)
                s00 += q0 * k0
                s01 += q0 * k1
                s02 += q0 * k2
                s03 += q0 * k3
                s10 += q1 * k0
                s11 += q1 * k1
                s12 += q1 * k2
                s13 += q1 * k3
            S[r, j] = s00
            S[r, j + 1] = s01
            S[r, j + 2] = s02
            S[r, j + 3] = s03
            S[r + 1, j] = s10
            S[r + 1, j + 1] = s11
            S[r + 1, j + 2] = s12
            S[r + 1, j + 3] = s13
            m0 = max(m0, s00, s01, s02, s03)
            m1 = max(m1, s10, s11, s12, s13)
            j += 4
        while j < nk:
            ka = K[p0 + j]
            s00 = s10 = np.float32(0.0)
            for d in range(D):
                k0 = _ldf(ka, d)
                s00 += Q[r, d] * k0
                s10 += Q[r + 1, d] * k0
            S[r, j] = s00
            S[r + 1, j] = s10
            m0 = max(m0, s00)
            m1 = max(m1, s10)
            j += 1
        mx[r] = m0
        mx[r + 1] = m1


@njit(**_JIT)
def _pv(P, rows, V, p0, nk, D, O):
    """O[r, :D] += sum_j P[r, j] * V[p0 + j, :D] for r < rows, j < nk (8 keys per pass)."""
    j = 0
    while j + 8 <= nk:
        a = p0 + j
        v0 = V[a]
        v1 = V[a + 1]
        v2 = V[a + 2]
        v3 = V[a + 3]
        v4 = V[a + 4]
        v5 = V[a + 5]
        v6 = V[a + 6]
        v7 = V[a + 7]
        for r in range(rows):
            p0_ = P[r, j]
            p1 = P[r, j + 1]
            p2 = P[r, j + 2]
            p3 = P[r, j + 3]
            p4 = P[r, j + 4]
            p5 = P[r, j + 5]
            p6 = P[r, j + 6]
            p7 = P[r, j + 7]
            for d in range(D):
                O[r, d] += ((p0_ * _ldf(v0, d) + p1 * _ldf(v1, d))
                            + (p2 * _ldf(v2, d) + p3 * _ldf(v3, d))) \
                    + ((p4 * _ldf(v4, d) + p5 * _ldf(v5, d))
                       + (p6 * _ldf(v6, d) + p7 * _ldf(v7, d)))
        j += 8
    while j < nk:
        v0 = V[p0 + j]
        for r in range(rows):
            p0_ = P[r, j]
            for d in range(D):
                O[r, d] += p0_ * _ldf(v0, d)
        j += 1


def _tile(a, p0, nk, scratch):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_tile, inline="always")
def _tile_ov(a, p0, nk, scratch):
    """Rows p0:p0+nk of a [positions, D] plane as an fp32 matrix for BLAS: a view of an fp32
    plane (no copy), or a bf16 plane (int16 bits) widened into ``scratch``."""
    if isinstance(a, types.Array) and a.dtype == types.float32:
        return lambda a, p0, nk, scratch: a[p0:p0 + nk]
    if isinstance(a, types.Array) and a.dtype == types.int16:
        def widen(a, p0, nk, scratch):
            for j in range(nk):
                for d in range(a.shape[1]):
                    scratch[j, d] = _bf16_to_f32(a[p0 + j, d])
            return scratch[:nk]
        return widen
    return None


@njit(**_JIT)
def _rowmax(S, rows, nk, mx):
    """mx[r] = max_j S[r, j]: a pass of its own in prefill, since sgemm gives no row maxima."""
    for r in range(rows):
        mt = NEG
        for j in range(nk):
            mt = max(mt, S[r, j])
        mx[r] = mt


@njit(**_JIT)
def _softmax_step(S, rows, nk, mx, m, l, O, D):
    """Online-softmax update with the scores S[:rows, :nk] (log2 units, row maxima mx);
    S becomes P."""
    for r in range(rows):
        mo = m[r]
        mn = max(mo, mx[r])
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
def _causal_mask(S, rows, nk, kpos0, qpos0, G, mx):
    """Row r is the query at position qpos0 + r // G; mask keys at positions > it, and
    recompute the row maxima over what stays visible."""
    for r in range(rows):
        first = qpos0 + r // G - kpos0 + 1  # first masked column
        if first < 0:
            first = 0
        if first >= nk:
            continue
        mt = NEG
        for j in range(first):
            mt = max(mt, S[r, j])
        mx[r] = mt
        for j in range(first, nk):
            S[r, j] = NEG


@njit(**_JIT)
def _band_mask(S, rows, nk, kpos0, qpos0, G, W, mx):
    """A sliding-window layer: row r (the query at position qp = qpos0 + r // G) sees keys at
    (qp - W, qp]; mask the rest and recompute the row maxima (NEG for a row with nothing visible:
    the online softmax's next real maximum rescales what it added by exp2(NEG - m) = 0)."""
    for r in range(rows):
        qp = qpos0 + r // G
        hi = min(max(qp - kpos0 + 1, 0), nk)  # columns >= hi are in the future
        lo = min(max(qp - W - kpos0 + 1, 0), nk)  # columns < lo are out of the window
        mt = NEG
        for j in range(nk):
            if j < lo or j >= hi:
                S[r, j] = NEG
            else:
                mt = max(mt, S[r, j])
        mx[r] = mt


@njit(**_JIT)
def _softcap(S, rows, nk, cap2, inv_cap):
    """Logit soft-capping in log2 units: S = cap * log2(e) * tanh(S / cap) (queries scaled by
    ``scaling`` only, so S holds natural-unit logits before this)."""
    for r in range(rows):
        for j in range(nk):
            S[r, j] = np.float32(cap2 * math.tanh(S[r, j] * inv_cap))


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
def _rotate_keys(K, p0, nk, D, h, cs, Ks):
    """Ks[j] = rerotate(K[p0 + j]) with the table cs (rotate-half convention), in fp32: the first
    2h dims turn (h = len(inv_freq); h < D/2 is partial rotary), the rest are copied."""
    for j in range(nk):
        kr = K[p0 + j]
        for i in range(h):
            a = _ldf(kr, i)
            b = _ldf(kr, h + i)
            c = cs[i]
            s = cs[h + i]
            Ks[j, i] = a * c - b * s
            Ks[j, h + i] = b * c + a * s
        for d in range(2 * h, D):
            Ks[j, d] = _ldf(kr, d)


@njit(**_JIT)
def _rotate_queries(Q, rows, D, h, cs, Qr):
    """Qr = R(-delta) Q, so that Qr . k == Q . R(delta) k (the first 2h dims; the rest copied)."""
    for r in range(rows):
        for i in range(h):
            a = Q[r, i]
            b = Q[r, h + i]
            c = cs[i]
            s = cs[h + i]
            Qr[r, i] = a * c + b * s
            Qr[r, h + i] = b * c - a * s
        for d in range(2 * h, D):
            Qr[r, d] = Q[r, d]


@njit(**_JIT)
def _plane(flat, off, rows, D):
    """The [rows, D] matrix starting at element ``off`` of a flat storage view (no copy)."""
    return flat[off:off + rows * D].reshape(rows, D)


@njit(**_JIT)
def _select(qbar, R_, D, reps, nmid, nsel, scaling, bias, bi, has_bias, out):
    """Top-``nsel`` of the ``nmid`` block scores, ascending, ties to the lower index -> out.

    ``reps`` is the [nb * R, D] plane of one (row, head); scores accumulate in fp64."""
    sc = np.empty(nmid, np.float32)
    sf = np.float32(scaling)
    q64 = np.empty(D, np.float64)
    for d in range(D):
        q64[d] = qbar[d]
    for j in range(nmid):
        best = -1.0e300
        for r in range(R_):
            rr = reps[j * R_ + r]
            acc = 0.0
            for d in range(D):
                acc += q64[d] * np.float64(_ldf(rr, d))
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
def _group_selection(q, b, h, G, C, n, D, reps, R_, nmid, nsel, scaling, bias, has_bias, sel_out):
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
    _select(qbar, R_, D, reps, nmid, nsel, scaling, bias, b, has_bias, sel_out)


# ---------------------------------------------------------------------------------------------
# decode (C == 1)

@njit(parallel=True, **_JIT)
def _decode_kernel(q, kf, vf, ksb, ksh, vsb, vsh, cap, repsf, rsb, rsh, nb, R_,
                   lengths, n_new, S, topk, sink, local, scaling, invf, bias, has_bias,
                   window, softcap, out, selected):
    B, Hq, C, D = q.shape
    Hkv = selected.shape[1]
    G = Hq // Hkv
    hr = invf.shape[0]  # rotated pairs (partial rotary: fewer than D / 2)
    rows = ((G + 1) // 2) * 2  # _qk_dec works on pairs of rows; PV/softmax on the G real ones
    # scores in log2 units; with soft-capping the queries carry only ``scaling`` and _softcap converts
    qscale = np.float32(scaling) if softcap > 0 else np.float32(scaling * LOG2E)
    cap2 = np.float32(softcap * LOG2E)
    inv_cap = np.float32(1.0 / softcap) if softcap > 0 else np.float32(0.0)
    for task in prange(B * Hkv):
        b = task // Hkv
        h = task - b * Hkv
        n = n_new[b]
        if n == 0:
            continue
        L = lengths[b]
        t = L - n
        sel = selected[b, h]
        if window > 0:  # a sliding-window layer: the last `window` keys, true positions, no selection
            s_end, nmid, local_start, nsel = 0, 0, max(0, L - window), 0
        else:
            s_end, nmid, local_start, nsel = _layout(t, S, topk, sink, local)
            _group_selection(q, b, h, G, C, n, D, _plane(repsf, b * rsb + h * rsh, nb * R_, D), R_,
                             nmid, nsel, scaling, bias, has_bias, sel)
        Kp = _plane(kf, b * ksb + h * ksh, cap, D)
        Vp = _plane(vf, b * vsb + h * vsh, cap, D)
        Qs = np.zeros((rows, D), np.float32)
        for g in range(G):
            for d in range(D):
                Qs[g, d] = q[b, h * G + g, C - 1, d] * qscale
        Qr = np.zeros((rows, D), np.float32)
        cs = np.empty(D, np.float32)
        Sc = np.empty((rows, TK), np.float32)
        O = np.zeros((rows, D), np.float32)
        m = np.full(rows, NEG, np.float32)
        mx = np.empty(rows, np.float32)
        l = np.zeros(rows, np.float32)
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
                _rotate_queries(Qs, rows, D, hr, cs, Qr)
                Qx = Qr
            else:
                Qx = Qs
            for j0 in range(0, cnt, TK):
                nk = min(TK, cnt - j0)
                _qk_dec(Qx, rows, Kp, p0 + j0, nk, D, Sc, mx)
                if softcap > 0:
                    _softcap(Sc, rows, nk, cap2, inv_cap)
                    _rowmax(Sc, rows, nk, mx)
                _softmax_step(Sc, G, nk, mx, m, l, O, D)
                _pv(Sc, G, Vp, p0 + j0, nk, D, O)
        for g in range(G):
            inv = np.float32(1.0) / l[g]
            for d in range(D):
                out[b, h * G + g, C - 1, d] = O[g, d] * inv


# ---------------------------------------------------------------------------------------------
# prefill chunk (C > 1)

@njit(parallel=True, **_JIT)
def _prefill_select(q, repsf, rsb, rsh, nb, R_, lengths, n_new, S, topk, sink, local,
                    scaling, invf, bias, has_bias, window, selected, rot):
    """Phase 1: per (row, KV head) selection + cos/sin tables (slot 0 sinks, 1+i block i)."""
    B, Hq, C, D = q.shape
    Hkv = selected.shape[1]
    G = Hq // Hkv
    for task in prange(B * Hkv):
        b = task // Hkv
        h = task - b * Hkv
        n = n_new[b]
        if n == 0 or window > 0:  # (a sliding-window layer selects nothing)
            continue
        t = lengths[b] - n
        s_end, nmid, local_start, nsel = _layout(t, S, topk, sink, local)
        sel = selected[b, h]
        _group_selection(q, b, h, G, C, n, D, _plane(repsf, b * rsb + h * rsh, nb * R_, D), R_,
                         nmid, nsel, scaling, bias, has_bias, sel)
        _rot_table((nmid - nsel) * S, invf, rot[b, h, 0])
        for i in range(nsel):
            _rot_table((nmid - nsel + i - sel[i]) * S, invf, rot[b, h, 1 + i])


@njit(parallel=True, **_JIT)
def _prefill_attend(q, kf, vf, ksb, ksh, vsb, vsh, cap, lengths, n_new, S, topk, sink,
                    local, scaling, hr, window, softcap, tq, tasks, selected, rot, out):
    """Phase 2: one task per (row, KV head, tile of tq query positions x G heads)."""
    B, Hq, C, D = q.shape
    Hkv = selected.shape[1]
    G = Hq // Hkv
    qscale = np.float32(scaling) if softcap > 0 else np.float32(scaling * LOG2E)
    cap2 = np.float32(softcap * LOG2E)
    inv_cap = np.float32(1.0 / softcap) if softcap > 0 else np.float32(0.0)
    for ti in prange(tasks.shape[0]):
        b = tasks[ti, 0]
        h = tasks[ti, 1]
        i0 = tasks[ti, 2]
        n = n_new[b]
        L = lengths[b]
        t = L - n
        if window > 0:  # a sliding-window layer: from the first key the tile's first query sees
            s_end, nmid, local_start, nsel = 0, 0, max(0, t + i0 - window + 1), 0
        else:
            s_end, nmid, local_start, nsel = _layout(t, S, topk, sink, local)
        npos = min(tq, n - i0)
        rows = npos * G
        Kp = _plane(kf, b * ksb + h * ksh, cap, D)
        Vp = _plane(vf, b * vsb + h * vsh, cap, D)
        Qs = np.empty((rows, D), np.float32)
        for pi in range(npos):
            ci = C - n + i0 + pi
            for g in range(G):
                for d in range(D):
                    Qs[pi * G + g, d] = q[b, h * G + g, ci, d] * qscale
        Sbuf = np.empty(rows * TK, np.float32)  # scores of one key tile, contiguous for sgemm
        T = np.empty((rows, D), np.float32)     # P @ V of one key tile
        Ks = np.empty((TK, D), np.float32)      # re-rotated (or widened bf16) keys
        Vs = np.empty((TK, D), np.float32)      # widened bf16 values
        O = np.zeros((rows, D), np.float32)
        m = np.full(rows, NEG, np.float32)
        mx = np.empty(rows, np.float32)
        l = np.zeros(rows, np.float32)
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
                Sc = Sbuf[:rows * nk].reshape((rows, nk))
                if moved:
                    _rotate_keys(Kp, p0 + j0, nk, D, hr, rot[b, h, reg + 1], Ks)
                    np.dot(Qs, Ks[:nk].T, Sc)
                else:
                    np.dot(Qs, _tile(Kp, p0 + j0, nk, Ks).T, Sc)
                if softcap > 0:
                    _softcap(Sc, rows, nk, cap2, inv_cap)
                _rowmax(Sc, rows, nk, mx)
                if window > 0:
                    if p0 + j0 + nk - 1 > qpos0 or p0 + j0 <= qlast - window:
                        _band_mask(Sc, rows, nk, p0 + j0, qpos0, G, window, mx)
                elif p0 + j0 + nk - 1 > qpos0:
                    _causal_mask(Sc, rows, nk, p0 + j0, qpos0, G, mx)
                _softmax_step(Sc, rows, nk, mx, m, l, O, D)
                np.dot(Sc, _tile(Vp, p0 + j0, nk, Vs), T)
                for r in range(rows):
                    for d in range(D):
                        O[r, d] += T[r, d]
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


def _flat(x: torch.Tensor, inner: int):
    """Zero-copy flat 1-D numpy view of ``x``'s storage span, plus its element strides.

    fp32 -> float32 array, bf16 -> int16 array of the raw bits. The last ``inner`` dims must be
    contiguous (each (row, head) is then one [positions, D] plane); otherwise one copy is made."""
    if x.dtype not in _SUPPORTED:
        x = x.float()
    if x.numel() == 0:  # e.g. no block representatives yet: nothing will be read
        x = torch.zeros(1, dtype=x.dtype).expand(x.shape).contiguous()
        return np.zeros(1, np.int16 if x.dtype == torch.bfloat16 else np.float32), x.stride()
    want, st = 1, list(x.stride())
    ok = True
    for i in range(1, inner + 1):
        ok = ok and (x.shape[-i] == 1 or st[-i] == want)
        want *= x.shape[-i]
    if not ok:
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
    from .rope import rotary_dim
    rotary_dim(inv_freq, q.shape[-1])  # (raises on frequencies that do not fit a head)
    B, Hq, C, D = q.shape
    Hkv, cap = k.shape[1], k.shape[2]
    if q.numel() == 0 or k.numel() == 0:
        return retrieval_attention_ref(q, k, v, reps, lengths, n_new, params, inv_freq, bias)
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if D % 2:
        raise ValueError(f"head dim must be even for RoPE, got {D}")
    G = Hq // Hkv
    S, topk = int(params.block_size), int(params.topk)
    q32 = q.detach().to(torch.float32).contiguous().numpy()
    if k.dtype != v.dtype:  # one specialisation per dtype is enough
        k, v = k.float(), v.float()
    kf, kst = _flat(k.detach(), 2)
    vf, vst = _flat(v.detach(), 2)
    nb, R_ = reps.shape[2], reps.shape[3]
    if reps.dtype != k.dtype:
        reps = reps.to(k.dtype if k.dtype in _SUPPORTED else torch.float32)
    rf, rst = _flat(reps.detach(), 3)
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
    sink, local = int(params.sink), int(params.local)
    hr = int(invf.shape[0])
    window = int(params.window or 0)
    softcap = float(params.softcap or 0.0)
    if C == 1:
        span = sink + topk * S + local + S
        nmid = max(0, (int(lens.max(initial=0)) - local - sink) // S)
        work = B * Hkv * (4 * G * span * D + 2 * nmid * R_ * D)
        threads = numba.get_num_threads()
        if work < PARALLEL_MIN_FLOPS and threads > 1:
            numba.set_num_threads(1)
        try:
            _decode_kernel(q32, kf, vf, kst[0], kst[1], vst[0], vst[1], cap, rf, rst[0], rst[1], nb,
                           R_, lens, nn, S, topk, sink, local, scaling, invf, b32, has_bias,
                           window, softcap, out, selected)
        finally:
            numba.set_num_threads(threads)
    else:
        rot = np.zeros((B, Hkv, topk + 1, D), np.float32)
        _prefill_select(q32, rf, rst[0], rst[1], nb, R_, lens, nn, S, topk, sink, local, scaling,
                        invf, b32, has_bias, window, selected, rot)
        tq = max(1, min(TQ_ROWS, SGEMM_SERIAL_MNK // (TK * D)) // G)
        tasks = _split_tasks(nn, Hkv, tq)
        if tasks.shape[0]:
            _prefill_attend(q32, kf, vf, kst[0], kst[1], vst[0], vst[1], cap, lens, nn, S, topk,
                            sink, local, scaling, hr, window, softcap, tq, tasks, selected, rot, out)
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


def _reasons(call) -> list[str]:
    first = _unsupported(call.q)
    return [first] if first else option_reasons(call, "numba", softcap=True, window=True, partial_rotary=True)


register_backend("numba", retrieval_attention_numba, _reasons)
