// Top-k block selection of the CUDA decode path (dtype independent), plus the cos/sin tables
// that re-rotate the moved regions (sinks and selected blocks, see ctxmem/ops/layout.py).
//
// One CTA per (row, KV head). The k-th largest score is found by a 4-pass MSB-first radix select
// over order-preserving 32-bit keys (8 bits a pass, shared-memory histogram); then a block-wide
// scan writes, in ascending index order, every block scoring above it plus the lowest-index ties,
// which is exactly the reference's stable descending sort + ascending re-sort.
#include <cuda_runtime.h>
#include <cstdint>

#include "ra_decode.cuh"

namespace ctxmem {

constexpr int kSelThreads = 512;

__device__ inline unsigned order_key(float x) {
  if (x == 0.f) x = 0.f;  // -0 and +0 tie, as in torch.sort
  const unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive block-wide prefix sum of a 64-bit value (two packed 32-bit counters).
__device__ inline unsigned long long block_exclusive_scan(unsigned long long x, unsigned long long* warp_tot) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned long long inc = x;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned long long y = __shfl_up_sync(0xffffffffu, inc, off);
    if (lane >= off) inc += y;
  }
  if (lane == 31) warp_tot[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    unsigned long long w = lane < kSelThreads / 32 ? warp_tot[lane] : 0ull;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const unsigned long long y = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += y;
    }
    if (lane < kSelThreads / 32) warp_tot[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const unsigned long long before = warp > 0 ? warp_tot[warp - 1] : 0ull;
  return before + inc - x;
}

__global__ void __launch_bounds__(kSelThreads) select_kernel(const RADecodeParams p) {
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int64_t n = p.n_new[b];
  if (n <= 0) return;
  const Lay lay = make_layout(p.lengths[b] - n, p);
  const int64_t nmid = lay.nmid, k = lay.nsel;
  int64_t* out = p.selected + ((int64_t)b * p.Hkv + h) * p.topk;
  const float* sc = p.scores + ((int64_t)b * p.Hkv + h) * p.nb;

  __shared__ unsigned hist[256];
  __shared__ unsigned s_prefix, s_remaining;
  __shared__ unsigned long long warp_tot[kSelThreads / 32];

  if (k == nmid) {
    for (int64_t i = tid; i < k; i += kSelThreads) out[i] = i;
  } else if (k > 0) {
    unsigned prefix = 0u, pmask = 0u, remaining = (unsigned)k;
    const int lane = tid & 31;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kSelThreads) hist[i] = 0u;
      __syncthreads();
      // histogram of the next 8 bits among the candidates; lanes holding the same bin add
      // once (scores of similar magnitude share their top bits: plain atomics would serialise)
      for (int64_t base = 0; base < nmid; base += kSelThreads) {
        const int64_t i = base + tid;
        unsigned bin = 256u;  // "not a candidate"
        if (i < nmid) {
          const unsigned u = order_key(sc[i]);
          if ((u & pmask) == prefix) bin = (u >> shift) & 255u;
        }
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (bin < 256u && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], (unsigned)__popc(peers));
      }
      __syncthreads();
      if (tid < 32) {
        // warp 0 finds the bin holding the remaining-th largest: lane l owns bins
        // [255 - 8l - 7, 255 - 8l], scanned from the top
        unsigned c = 0u;
#pragma unroll
        for (int e = 0; e < 8; ++e) c += hist[255 - 8 * lane - e];
        unsigned inc = c;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const unsigned y = __shfl_up_sync(0xffffffffu, inc, off);
          if (lane >= off) inc += y;
        }
        const unsigned hit = __ballot_sync(0xffffffffu, inc >= remaining);
        const int first = __ffs(hit) - 1;  // exists: the k-th largest is among the candidates
        if (lane == first) {
          unsigned cum = inc - c;
          for (int e = 0; e < 8; ++e) {
            const int bin = 255 - 8 * lane - e;
            if (cum + hist[bin] >= remaining) {
              s_prefix = prefix | ((unsigned)bin << shift);
              s_remaining = remaining - cum;
              break;
            }
            cum += hist[bin];
          }
        }
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      pmask |= 0xffu << shift;
    }
    // prefix = key of the k-th largest score; take all above it and the first `remaining` ties
    const unsigned kth = prefix, need_eq = remaining;
    const int64_t per = (nmid + kSelThreads - 1) / kSelThreads;
    const int64_t i0 = tid * per, i1 = min(nmid, i0 + per);
    unsigned gt = 0u, eq = 0u;
    for (int64_t i = i0; i < i1; ++i) {
      const unsigned u = order_key(sc[i]);
      gt += u > kth;
      eq += u == kth;
    }
    const unsigned long long ex = block_exclusive_scan(((unsigned long long)gt << 32) | eq, warp_tot);
    unsigned gt_before = (unsigned)(ex >> 32), eq_before = (unsigned)(ex & 0xffffffffu);
    for (int64_t i = i0; i < i1; ++i) {
      const unsigned u = order_key(sc[i]);
      if (u > kth) {
        out[gt_before + min(eq_before, need_eq)] = i;
        ++gt_before;
      } else if (u == kth) {
        if (eq_before < need_eq) out[gt_before + eq_before] = i;
        ++eq_before;
      }
    }
  }
  __syncthreads();  // `out` visible to the whole CTA

  // cos | sin of delta * inv_freq (fp32 angle, as the reference) for slot 0 (sinks) and each
  // selected block; the attention kernel rotates its queries by -delta.
  const int D = p.D, half = p.D / 2;
  float* rot = p.rot + ((int64_t)b * p.Hkv + h) * (p.topk + 1) * D;
  const int64_t S = p.block_size;
  for (int64_t idx = tid; idx < (k + 1) * half; idx += kSelThreads) {
    const int64_t slot = idx / half;
    const int i = (int)(idx % half);
    const int64_t delta = slot == 0 ? (nmid - k) * S : (nmid - k + slot - 1 - out[slot - 1]) * S;
    const float a = __fmul_rn((float)delta, p.inv_freq[i]);
    float s, c;
    sincosf(a, &s, &c);
    rot[slot * D + i] = c;
    rot[slot * D + half + i] = s;
  }
}

int ra_select(const RADecodeParams& p, void* stream) {
  select_kernel<<<dim3(p.Hkv, p.B), kSelThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return (int)cudaGetLastError();
}

const char* ra_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int ra_num_sms(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n < 1) return 1;
  return n;
}

}  // namespace ctxmem
