// Decode kernels instantiated for float storage (see ra_decode.cuh); one TU per dtype.
#include "ra_decode.cuh"

namespace ctxmem {
int ra_decode_f32(const RADecodeParams& p, void* stream) { return decode_t<float>(p, stream); }
}  // namespace ctxmem
