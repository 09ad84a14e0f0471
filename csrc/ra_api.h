// ctxmem fused retrieval-attention, CUDA decode path: plain-C++ interface between the kernels
// (ra_*.cu, CUDA headers only) and the torch binding (binding.cpp). No CUDA or torch types here,
// so the kernels compile with nvcc alone and the binding with any C++17 compiler.
//
// Contract: exactly ctxmem/ops/reference.py (retrieval_attention_ref) for a decode step
// (C == 1 query per row): score blocks by their representative keys against the mean of the
// group's queries, take the top min(topk, nmid) per KV head (ties to the lower block index),
// attend over sinks + selected blocks (re-rotated to sit just before the local window) + local
// window in one softmax.
#pragma once
#include <cstdint>

namespace ctxmem {

enum RADType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct RADecodeParams {
  // inputs (device pointers); K/V/reps/q share one dtype, last dim contiguous
  const void* q;           // [B, Hq, C, D]; the real decode query is q[b, hq, C-1]
  const void* k;           // [B, Hkv, cap, D]
  const void* v;           // [B, Hkv, cap, D]
  const void* reps;        // [B, Hkv, nb, R, D]
  const int64_t* lengths;  // [B]
  const int64_t* n_new;    // [B] (0 or 1 for decode)
  const float* bias;       // [B, >= nb] fp32, or nullptr
  const float* inv_freq;   // [D/2] fp32
  // outputs
  void* out;               // [B, Hq, C, D] contiguous, q's dtype, zero-filled by the caller
  int64_t* selected;       // [B, Hkv, topk], filled with -1 by the caller
  // fp32 workspaces (no initialisation needed)
  float* scores;           // [B, Hkv, nb]
  float* rot;              // [B, Hkv, topk + 1, D]: cos | sin of each moved region
  float* part_ml;          // [B, Hq, nsplit, 2]: running max (log2 units) and sum per split
  float* part_acc;         // [B, Hq, nsplit, D]: unnormalised output per split
  // element strides
  int64_t q_sb, q_sh, q_sc;
  int64_t k_sb, k_sh, k_sp;
  int64_t v_sb, v_sh, v_sp;
  int64_t r_sb, r_sh, r_sj, r_sr;
  int64_t bias_sb;
  // shapes
  int B, Hq, Hkv, C, D, R, nb;
  // op parameters (OpParams)
  int block_size, topk, sink, local;
  float scaling;
  int dtype;               // RADType
  // flash-decoding split: CTA s of a (row, head) covers virtual keys [s*chunk, (s+1)*chunk)
  int nsplit, chunk;
};

// One decode step: score -> select -> split attention -> log-sum-exp merge, on `stream`
// (a cudaStream_t). Returns 0 or a cudaError_t code (see ra_error_string).
int ra_decode_f32(const RADecodeParams& p, void* stream);
int ra_decode_f16(const RADecodeParams& p, void* stream);
int ra_decode_bf16(const RADecodeParams& p, void* stream);

// Top-k selection and re-rotation tables (dtype independent; called by the ra_decode_*).
int ra_select(const RADecodeParams& p, void* stream);

const char* ra_error_string(int code);

// Streaming multiprocessors of a device (sizes the split); 1 if the query fails.
int ra_num_sms(int device);

// Largest G (query heads per KV head) one attention CTA holds in registers; larger groups are
// split across CTAs (grid.y = Hkv * ceil(G / 8)).
constexpr int kMaxGroup = 8;
// Threads of the attention CTA.
constexpr int kAttnThreads = 128;

}  // namespace ctxmem
