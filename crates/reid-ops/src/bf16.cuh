// bf16 values held as their bits (unsigned short), so that NVRTC needs no CUDA
// header: widened to float exactly, and rounded back to nearest even (a NaN
// stays a NaN), as the CPU's `half::bf16::from_f32` rounds. f32 and f64 values
// pass through SAME.

__device__ __forceinline__ float bf16_ld(unsigned short v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

__device__ __forceinline__ unsigned short bf16_st(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

#define SAME(v) (v)

