// Decode kernels instantiated for __half storage (see ra_decode.cuh); one TU per dtype.
#include "ra_decode.cuh"

namespace ctxmem {
int ra_decode_f16(const RADecodeParams& p, void* stream) { return decode_t<__half>(p, stream); }
}  // namespace ctxmem
