// torch binding of the CUDA decode path: validates tensors, allocates the output and the fp32
// workspaces, sizes the flash-decoding split and calls the plain-CUDA launchers (ra_api.h).
// Built by ctxmem/ops/cuda.py through torch.utils.cpp_extension (see csrc/README.md).
//
// Only <torch/extension.h>: no ATen/cuda or c10/cuda headers (the former pulls in cuBLAS and
// cuSPARSE headers that a bare nvcc toolkit lacks, the latter are missing from torch's CPU wheel,
// where CI syntax-checks this file). The caller (cuda.py) therefore passes the current stream
// as an integer and makes q's device current.
#include <torch/extension.h>

#include <algorithm>
#include <optional>

#include "ra_api.h"

namespace {

using ctxmem::RADecodeParams;

// 16-byte vector loads need aligned rows; otherwise fall back to one contiguous copy.
at::Tensor vec_ready(const at::Tensor& x) {
  const int64_t es = x.element_size();
  bool ok = x.stride(-1) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int i = 0; i + 1 < x.dim(); ++i) ok = ok && (x.stride(i) * es) % 16 == 0;
  return ok ? x : x.contiguous();
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ctxmem::kF32;
    case at::kHalf: return ctxmem::kF16;
    case at::kBFloat16: return ctxmem::kBF16;
    default: TORCH_CHECK(false, "ctxmem_cuda: dtype ", t, " not supported (float32, float16, bfloat16)");
  }
  return -1;
}

std::tuple<at::Tensor, at::Tensor> decode(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor reps,
                                          at::Tensor lengths, at::Tensor n_new,
                                          std::optional<at::Tensor> bias, at::Tensor inv_freq,
                                          int64_t block_size, int64_t topk, int64_t sink, int64_t local,
                                          double scaling, int64_t stream_ptr) {
  TORCH_CHECK(q.is_cuda(), "ctxmem_cuda.decode: q must be a CUDA tensor");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && reps.dim() == 5,
              "ctxmem_cuda.decode: expected q [B,Hq,C,D], k/v [B,Hkv,cap,D], reps [B,Hkv,nb,R,D]");
  const auto dev = q.device();
  for (const at::Tensor* t : {&k, &v, &reps})
    TORCH_CHECK(t->device() == dev, "ctxmem_cuda.decode: all tensors must be on ", dev);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  reps.scalar_type() == q.scalar_type(),
              "ctxmem_cuda.decode: q, k, v and reps must share one dtype");
  const int64_t B = q.size(0), Hq = q.size(1), C = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1);
  TORCH_CHECK(C == 1, "ctxmem_cuda.decode: one query per row (C == 1); prefill chunks use the reference");
  TORCH_CHECK(D == 64 || D == 128, "ctxmem_cuda.decode: head dim ", D, " not built (64, 128)");
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "ctxmem_cuda.decode: Hq must be a multiple of Hkv");
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && reps.size(0) == B && k.size(3) == D &&
                  v.size(3) == D && reps.size(4) == D && v.size(1) == Hkv && reps.size(1) == Hkv,
              "ctxmem_cuda.decode: shape mismatch");
  const int64_t dt = dtype_code(q.scalar_type());
  if (q.stride(-1) != 1) q = q.contiguous();
  k = vec_ready(k);
  v = vec_ready(v);
  reps = vec_ready(reps);
  lengths = lengths.to(dev, at::kLong).contiguous();
  n_new = n_new.to(dev, at::kLong).contiguous();
  TORCH_CHECK(lengths.numel() == B && n_new.numel() == B, "ctxmem_cuda.decode: lengths/n_new need B values");
  inv_freq = inv_freq.to(dev, at::kFloat).contiguous();
  TORCH_CHECK(inv_freq.numel() == D / 2, "ctxmem_cuda.decode: inv_freq must hold D/2 values");
  at::Tensor bias_t;
  if (bias.has_value() && bias->defined()) {
    bias_t = bias->to(dev, at::kFloat);
    if (bias_t.stride(-1) != 1) bias_t = bias_t.contiguous();
    TORCH_CHECK(bias_t.dim() == 2 && bias_t.size(0) == B, "ctxmem_cuda.decode: bias must be [B, nb]");
  }

  const int64_t nb = reps.size(2), R = reps.size(3);
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::zeros({B, Hq, C, D}, q.options());
  at::Tensor selected = at::full({B, Hkv, topk}, -1, q.options().dtype(at::kLong));
  // virtual keys per (row, head) are at most sink + topk*S + local + S (layout.py: span(1) - 1)
  const int64_t max_keys = std::max<int64_t>(1, sink + topk * block_size + local + block_size);
  const int G = static_cast<int>(Hq / Hkv);
  const int gslices = (G + ctxmem::kMaxGroup - 1) / ctxmem::kMaxGroup;
  const int sms = ctxmem::ra_num_sms(static_cast<int>(q.get_device()));
  const int64_t ctas_per_split = B * Hkv * gslices;
  int64_t nsplit = std::max<int64_t>(1, (4 * sms + ctas_per_split - 1) / ctas_per_split);
  nsplit = std::min<int64_t>(nsplit, (max_keys + 63) / 64);  // at least 64 keys per CTA
  int64_t chunk = (max_keys + nsplit - 1) / nsplit;
  chunk = (chunk + 15) / 16 * 16;
  nsplit = (max_keys + chunk - 1) / chunk;

  at::Tensor scores = at::empty({B, Hkv, std::max<int64_t>(nb, 1)}, f32);
  at::Tensor rot = at::empty({B, Hkv, topk + 1, D}, f32);
  at::Tensor part_ml = at::empty({B, Hq, nsplit, 2}, f32);
  at::Tensor part_acc = at::empty({B, Hq, nsplit, D}, f32);

  RADecodeParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.reps = reps.data_ptr();
  p.lengths = lengths.data_ptr<int64_t>();
  p.n_new = n_new.data_ptr<int64_t>();
  p.bias = bias_t.defined() ? bias_t.data_ptr<float>() : nullptr;
  p.bias_sb = bias_t.defined() ? bias_t.stride(0) : 0;
  p.inv_freq = inv_freq.data_ptr<float>();
  p.out = out.data_ptr();
  p.selected = selected.data_ptr<int64_t>();
  p.scores = scores.data_ptr<float>();
  p.rot = rot.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();
  p.part_acc = part_acc.data_ptr<float>();
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_sc = q.stride(2);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_sp = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_sp = v.stride(2);
  p.r_sb = reps.stride(0); p.r_sh = reps.stride(1); p.r_sj = reps.stride(2); p.r_sr = reps.stride(3);
  p.B = (int)B; p.Hq = (int)Hq; p.Hkv = (int)Hkv; p.C = (int)C; p.D = (int)D; p.R = (int)R; p.nb = (int)nb;
  p.block_size = (int)block_size; p.topk = (int)topk; p.sink = (int)sink; p.local = (int)local;
  p.scaling = (float)scaling;
  p.dtype = (int)dt;
  p.nsplit = (int)nsplit;
  p.chunk = (int)chunk;

  void* stream = reinterpret_cast<void*>(static_cast<uintptr_t>(stream_ptr));
  int err = 0;
  if (dt == ctxmem::kF32) err = ctxmem::ra_decode_f32(p, stream);
  else if (dt == ctxmem::kF16) err = ctxmem::ra_decode_f16(p, stream);
  else err = ctxmem::ra_decode_bf16(p, stream);
  TORCH_CHECK(err == 0, "ctxmem_cuda.decode: CUDA error: ", ctxmem::ra_error_string(err));
  return {out, selected};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ctxmem fused retrieval-attention, CUDA decode kernels (flash-decoding split)";
  m.def("decode", &decode,
        "decode step of the fused retrieval-attention op (C == 1 real query per row); "
        "returns (out [B,Hq,C,D], selected [B,Hkv,topk])",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("reps"), py::arg("lengths"), py::arg("n_new"),
        py::arg("bias"), py::arg("inv_freq"), py::arg("block_size"), py::arg("topk"), py::arg("sink"),
        py::arg("local"), py::arg("scaling"), py::arg("stream"));
  m.attr("ABI_VERSION") = 1;
}
