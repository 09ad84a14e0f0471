// Kernels of the CUDA decode path (templated on the storage dtype T and the head dim D).
// Included by ra_decode_{f32,f16,bf16}.cu, one translation unit per dtype so they build in
// parallel. Depends on CUDA headers only.
//
// Pipeline of one decode step (four launches on one stream):
//   1. score_kernel   grid (ceil(nb / groups), Hkv, B): block scores = scaling * max_r <qbar, rep_r>
//                     + bias, one group of D*sizeof(T)/16 lanes per block (16-byte loads).
//   2. select_kernel  grid (Hkv, B), ra_select.cu: radix select of the top min(topk, nmid) scores
//                     (ties to the lower index), ascending indices, cos/sin re-rotation tables.
//   3. attend_kernel  grid (nsplit, Hkv * ceil(G / GM), B), 128 threads: flash-decoding split of
//                     the virtual key list [sinks | selected blocks | local window]; each CTA streams
//                     its keys in place from the cache (no gather), re-rotating the *queries* of a
//                     moved region (q . R(d) k == R(-d) q . k), online softmax in fp32 (log2 units),
//                     and writes a partial (max, sum, acc) per query head.
//   4. merge_kernel   grid (Hq, B): log-sum-exp merge of the splits, cast to T.
// One selection serves the whole query group (GQA): the group's queries share the K/V loads.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#include <cstdint>

#include "ra_api.h"

namespace ctxmem {

struct Lay {
  int64_t s_end, nmid, local_start, nsel;
};

// ctxmem/ops/layout.py: row_layout
__host__ __device__ inline Lay make_layout(int64_t t, const RADecodeParams& p) {
  Lay y;
  y.s_end = t < p.sink ? t : (int64_t)p.sink;
  const int64_t x = t - p.local - y.s_end;
  y.nmid = x > 0 ? x / p.block_size : 0;
  y.local_start = y.s_end + y.nmid * p.block_size;
  y.nsel = y.nmid < p.topk ? y.nmid : (int64_t)p.topk;
  return y;
}

// ---- 16-byte vector loads: kept packed in registers (uint4), widened to fp32 on use ----------
template <typename T> struct Vec;
__device__ inline unsigned word(const uint4& x, int w) {
  return w == 0 ? x.x : (w == 1 ? x.y : (w == 2 ? x.z : x.w));
}
template <> struct Vec<float> {
  static constexpr int N = 4;
  __device__ static inline float get(const uint4& x, int e) { return __uint_as_float(word(x, e)); }
};
template <> struct Vec<__half> {
  static constexpr int N = 8;
  __device__ static inline float get(const uint4& x, int e) {
    const unsigned w = word(x, e >> 1);
    return __half2float(__ushort_as_half((unsigned short)((e & 1) ? (w >> 16) : (w & 0xffffu))));
  }
};
template <> struct Vec<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ static inline float get(const uint4& x, int e) {
    const unsigned w = word(x, e >> 1);
    return __uint_as_float((e & 1) ? (w & 0xffff0000u) : (w << 16));  // exact widening
  }
};
template <typename T>
__device__ inline uint4 load16(const T* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ inline float to_f32(float x) { return x; }
__device__ inline float to_f32(__half x) { return __half2float(x); }
__device__ inline float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T from_f32(float x);
template <> __device__ inline float from_f32<float>(float x) { return x; }
template <> __device__ inline __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ inline __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

constexpr float kLog2e = 1.4426950408889634f;

// ---- 1. block scores ----------------------------------------------------------------------
constexpr int kScoreThreads = 256;
constexpr int kRepsInFlight = 4;  // representative rows loaded per lane before use

template <typename T, int D>
__global__ void __launch_bounds__(kScoreThreads) score_kernel(const RADecodeParams p) {
  constexpr int EPL = Vec<T>::N;      // elements per lane (16 bytes)
  constexpr int LPK = D / EPL;        // lanes per representative row
  static_assert(LPK >= 1 && LPK <= 32 && (LPK & (LPK - 1)) == 0, "bad D / dtype");
  const int b = blockIdx.z, h = blockIdx.y;
  const int64_t n = p.n_new[b];
  if (n <= 0) return;
  const int64_t t = p.lengths[b] - n;
  const Lay lay = make_layout(t, p);
  if (lay.nsel == lay.nmid || lay.nsel == 0) return;  // take-all / nothing: no scoring
  const int G = p.Hq / p.Hkv;
  const T* q = static_cast<const T*>(p.q);
  __shared__ float qbar[D];
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
    for (int g = 0; g < G; ++g)
      for (int64_t i = p.C - n; i < p.C; ++i)
        s += to_f32(q[b * p.q_sb + (int64_t)(h * G + g) * p.q_sh + i * p.q_sc + d]);
    qbar[d] = s / (float)(G * n);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int gl = lane % LPK;
  const int64_t j = (int64_t)blockIdx.x * (kScoreThreads / LPK) + threadIdx.x / LPK;
  const bool valid = j < lay.nmid;
  float qv[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) qv[e] = qbar[gl * EPL + e];
  const T* reps = static_cast<const T*>(p.reps) + b * p.r_sb + h * p.r_sh + gl * EPL;
  // all R representative rows of the block are loaded before any is used (bytes in flight)
  float best = -CUDART_INF_F;
  const T* rrow = reps + (valid ? j : 0) * p.r_sj;
  for (int r0 = 0; r0 < p.R; r0 += kRepsInFlight) {  // uniform trip count: all lanes shuffle
    uint4 x0 = make_uint4(0u, 0u, 0u, 0u), x1 = x0, x2 = x0, x3 = x0;
    const int nr = min(kRepsInFlight, p.R - r0);
    if (valid) {
      x0 = load16(rrow + r0 * p.r_sr);
      if (nr > 1) x1 = load16(rrow + (r0 + 1) * p.r_sr);
      if (nr > 2) x2 = load16(rrow + (r0 + 2) * p.r_sr);
      if (nr > 3) x3 = load16(rrow + (r0 + 3) * p.r_sr);
    }
#pragma unroll
    for (int r = 0; r < kRepsInFlight; ++r) {
      const uint4 x = r == 0 ? x0 : (r == 1 ? x1 : (r == 2 ? x2 : x3));
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < EPL; ++e) s = fmaf(qv[e], Vec<T>::get(x, e), s);
#pragma unroll
      for (int off = LPK / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (r < nr) best = fmaxf(best, s);
    }
  }
  if (valid && gl == 0) {
    float sc = best * p.scaling;
    if (p.bias != nullptr) sc += p.bias[b * p.bias_sb + j];
    p.scores[((int64_t)b * p.Hkv + h) * p.nb + j] = sc;
  }
}

// ---- 3. split attention --------------------------------------------------------------------
template <typename T, int D, int GM>
__global__ void __launch_bounds__(kAttnThreads) attend_kernel(const RADecodeParams p) {
  constexpr int EPL = Vec<T>::N;
  constexpr int LPK = D / EPL;          // lanes per key row
  constexpr int GPW = 32 / LPK;         // key groups per warp
  constexpr int NW = kAttnThreads / 32;
  constexpr int KG = NW * GPW;          // key groups per CTA
  constexpr int KT = 4;                 // keys per group per step (loads in flight)
  constexpr int HALF = D / 2;
  static_assert(LPK >= 1 && LPK <= 32 && (LPK & (LPK - 1)) == 0, "bad D / dtype");

  const int split = blockIdx.x, b = blockIdx.z;
  const int G = p.Hq / p.Hkv;
  const int ngs = (G + GM - 1) / GM;
  const int h = blockIdx.y / ngs;
  const int g0 = (blockIdx.y % ngs) * GM;
  const int gcount = min(GM, G - g0);
  const int64_t n = p.n_new[b];
  if (n <= 0) return;
  const int64_t L = p.lengths[b];
  const Lay lay = make_layout(L - n, p);
  const int64_t S = p.block_size;
  const int64_t nsel = lay.nsel;
  const int64_t M = lay.s_end + nsel * S + (L - lay.local_start);
  const int64_t c0 = (int64_t)split * p.chunk;
  const int64_t c1 = min(M, c0 + (int64_t)p.chunk);
  const int tid = threadIdx.x;
  auto part = [&](int g) { return ((int64_t)b * p.Hq + h * G + g0 + g) * p.nsplit + split; };
  if (c0 >= M) {  // nothing for this split: weight 0 in the merge
    if (tid < gcount) {
      p.part_ml[part(tid) * 2] = -CUDART_INF_F;
      p.part_ml[part(tid) * 2 + 1] = 0.f;
    }
    return;
  }

  __shared__ float qs[GM][D];
  __shared__ float sm_m[KG][GM];
  __shared__ float sm_l[KG][GM];
  __shared__ float sm_acc[KG][GM][D];
  const T* q = static_cast<const T*>(p.q);
  const float qscale = p.scaling * kLog2e;
  for (int i = tid; i < GM * D; i += kAttnThreads) {
    const int g = i / D, d = i % D;
    qs[g][d] = g < gcount
        ? to_f32(q[b * p.q_sb + (int64_t)(h * G + g0 + g) * p.q_sh + (int64_t)(p.C - 1) * p.q_sc + d]) * qscale
        : 0.f;
  }
  __syncthreads();

  const int warp = tid / 32, lane = tid % 32;
  const int grp = lane / LPK, gl = lane % LPK;
  const int kg = warp * GPW + grp;
  const int d0 = gl * EPL;
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + d0;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + d0;
  const int64_t* sel = p.selected + ((int64_t)b * p.Hkv + h) * p.topk;
  const float* rot = p.rot + ((int64_t)b * p.Hkv + h) * (p.topk + 1) * D;

  float m[GM], l[GM], acc[GM][EPL], qr[GM][EPL];
#pragma unroll
  for (int g = 0; g < GM; ++g) {
    m[g] = -CUDART_INF_F;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] = 0.f;
  }

  int64_t vi = c0;
  while (vi < c1) {  // regions overlapping [c0, c1); uniform across the CTA
    int64_t reg_start, reg_end, pos0;
    int slot;
    bool moved;
    const int64_t sel_start = lay.s_end, loc_start = lay.s_end + nsel * S;
    if (vi < sel_start) {
      reg_start = 0; reg_end = sel_start; pos0 = 0; slot = 0;
      moved = lay.nmid > nsel;
    } else if (vi < loc_start) {
      const int64_t i = (vi - sel_start) / S;
      const int64_t blk = sel[i];
      reg_start = sel_start + i * S; reg_end = reg_start + S; pos0 = lay.s_end + blk * S;
      slot = (int)i + 1;
      moved = lay.nmid - nsel + i != blk;
    } else {
      reg_start = loc_start; reg_end = M; pos0 = lay.local_start; slot = 0;
      moved = false;
    }
    const int64_t seg_end = min(c1, reg_end);
    // this region's queries: R(-delta) q, so that qr . k == q . R(delta) k
#pragma unroll
    for (int g = 0; g < GM; ++g) {
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        const int d = d0 + e;
        if (moved) {
          const int i = d < HALF ? d : d - HALF;
          const float c = rot[slot * D + i], s = rot[slot * D + HALF + i];
          qr[g][e] = d < HALF ? qs[g][d] * c + qs[g][d + HALF] * s : qs[g][d] * c - qs[g][d - HALF] * s;
        } else {
          qr[g][e] = qs[g][d];
        }
      }
    }
    const int64_t first = vi - reg_start;        // offset of vi inside the region
    const int64_t nkeys = seg_end - vi;
    // warp-uniform loop: the groups of a warp take consecutive tiles of KT keys
    for (int64_t tw = (int64_t)warp * GPW * KT; tw < nkeys; tw += (int64_t)KG * KT) {
      const int64_t tb = tw + grp * KT;
      uint4 kx[KT], vx[KT];
      bool ok[KT];
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {  // all loads issued before any use: 2*KT*16 B in flight
        ok[kk] = tb + kk < nkeys;
        const int64_t pos = pos0 + first + tb + kk;
        kx[kk] = ok[kk] ? load16(kbase + pos * p.k_sp) : make_uint4(0u, 0u, 0u, 0u);
        vx[kk] = ok[kk] ? load16(vbase + pos * p.v_sp) : make_uint4(0u, 0u, 0u, 0u);
      }
      const bool any = ok[0];
#pragma unroll
      for (int g = 0; g < GM; ++g) {
        if (g >= gcount) break;
        float s[KT];
#pragma unroll
        for (int kk = 0; kk < KT; ++kk) {
          float x = 0.f;
#pragma unroll
          for (int e = 0; e < EPL; ++e) x = fmaf(qr[g][e], Vec<T>::get(kx[kk], e), x);
#pragma unroll
          for (int off = LPK / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
          s[kk] = ok[kk] ? x : -CUDART_INF_F;
        }
        if (any) {
          float mt = s[0];
#pragma unroll
          for (int kk = 1; kk < KT; ++kk) mt = fmaxf(mt, s[kk]);
          const float mn = fmaxf(m[g], mt);
          const float alpha = m[g] == -CUDART_INF_F ? 0.f : exp2f(m[g] - mn);
          float pk[KT], tot = 0.f;
#pragma unroll
          for (int kk = 0; kk < KT; ++kk) {
            pk[kk] = ok[kk] ? exp2f(s[kk] - mn) : 0.f;
            tot += pk[kk];
          }
          l[g] = l[g] * alpha + tot;
#pragma unroll
          for (int e = 0; e < EPL; ++e) {
            float a = acc[g][e] * alpha;
#pragma unroll
            for (int kk = 0; kk < KT; ++kk) a = fmaf(pk[kk], Vec<T>::get(vx[kk], e), a);
            acc[g][e] = a;
          }
          m[g] = mn;
        }
      }
    }
    vi = seg_end;
  }

  // combine the key groups of this CTA
#pragma unroll
  for (int g = 0; g < GM; ++g) {
#pragma unroll
    for (int e = 0; e < EPL; ++e) sm_acc[kg][g][d0 + e] = acc[g][e];
    if (gl == 0) {
      sm_m[kg][g] = m[g];
      sm_l[kg][g] = l[g];
    }
  }
  __syncthreads();
  for (int i = tid; i < gcount * D; i += kAttnThreads) {
    const int g = i / D, d = i % D;
    float mx = -CUDART_INF_F;
    for (int k2 = 0; k2 < KG; ++k2) mx = fmaxf(mx, sm_m[k2][g]);
    float lsum = 0.f, a = 0.f;
    for (int k2 = 0; k2 < KG; ++k2) {
      const float mk = sm_m[k2][g];
      if (mk == -CUDART_INF_F) continue;
      const float w = exp2f(mk - mx);
      lsum += sm_l[k2][g] * w;
      a += sm_acc[k2][g][d] * w;
    }
    const int64_t pi = part(g);
    p.part_acc[pi * D + d] = a;
    if (d == 0) {
      p.part_ml[pi * 2] = mx;
      p.part_ml[pi * 2 + 1] = lsum;
    }
  }
}

// ---- 4. merge of the splits ------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(D) merge_kernel(const RADecodeParams p) {
  const int hq = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  if (p.n_new[b] <= 0) return;  // output stays zero
  const int64_t base = ((int64_t)b * p.Hq + hq) * p.nsplit;
  float mx = -CUDART_INF_F;
  for (int s = 0; s < p.nsplit; ++s) mx = fmaxf(mx, p.part_ml[(base + s) * 2]);
  float lsum = 0.f, a = 0.f;
  for (int s = 0; s < p.nsplit; ++s) {
    const float ms = p.part_ml[(base + s) * 2];
    if (ms == -CUDART_INF_F) continue;
    const float w = exp2f(ms - mx);
    lsum += p.part_ml[(base + s) * 2 + 1] * w;
    a += p.part_acc[(base + s) * D + d] * w;
  }
  T* out = static_cast<T*>(p.out);
  out[(((int64_t)b * p.Hq + hq) * p.C + (p.C - 1)) * D + d] = from_f32<T>(a / lsum);
}

// ---- host launcher ---------------------------------------------------------------------------
template <typename T, int D, int GM>
inline void launch_attend(const RADecodeParams& p, cudaStream_t st) {
  const int G = p.Hq / p.Hkv;
  const dim3 grid(p.nsplit, p.Hkv * ((G + GM - 1) / GM), p.B);
  attend_kernel<T, D, GM><<<grid, kAttnThreads, 0, st>>>(p);
}

template <typename T, int D>
inline int decode_d(const RADecodeParams& p, cudaStream_t st) {
  constexpr int LPK = D / Vec<T>::N;
  if (p.nb > 0) {
    const int groups = kScoreThreads / LPK;
    const dim3 grid((p.nb + groups - 1) / groups, p.Hkv, p.B);
    score_kernel<T, D><<<grid, kScoreThreads, 0, st>>>(p);
  }
  int err = ra_select(p, st);
  if (err != 0) return err;
  const int G = p.Hq / p.Hkv;
  if (G <= 1) launch_attend<T, D, 1>(p, st);
  else if (G <= 2) launch_attend<T, D, 2>(p, st);
  else if (G <= 4) launch_attend<T, D, 4>(p, st);
  else launch_attend<T, D, kMaxGroup>(p, st);
  merge_kernel<T, D><<<dim3(p.Hq, p.B), D, 0, st>>>(p);
  return (int)cudaGetLastError();
}

template <typename T>
inline int decode_t(const RADecodeParams& p, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p.D == 64) return decode_d<T, 64>(p, st);
  if (p.D == 128) return decode_d<T, 128>(p, st);
  return (int)cudaErrorInvalidValue;
}

}  // namespace ctxmem
