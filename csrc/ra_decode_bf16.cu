// Decode kernels instantiated for __nv_bfloat16 storage (see ra_decode.cuh); one TU per dtype.
#include "ra_decode.cuh"

namespace ctxmem {
int ra_decode_bf16(const RADecodeParams& p, void* stream) { return decode_t<__nv_bfloat16>(p, stream); }
}  // namespace ctxmem
