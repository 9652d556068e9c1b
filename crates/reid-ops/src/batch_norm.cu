// The CUDA kernels of the batch-norm ops (ops/batch_norm_cuda.rs), compiled by
// NVRTC when first used. Tensors are contiguous [N, C, HW] with fewer than 2^31
// values. Per-channel sums run in one block per channel, in double, in a fixed
// order (the same bits every run). The element-wise products and sums round as
// the CPU kernels do (no fused multiply-add where the CPU has none).
// Activations are stored as S and computed as T, read through LD and written
// through ST: S = T for f32 and f64; S = bf16 bits, T = float for bf16
// activations, whose parameters, statistics and parameter gradients are f32
// (bf16.cuh, prepended).

#define BLOCK 256

// The sum of `v` over the block; every thread gets it.
__device__ double block_sum(double v, double* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    double r = shared[0];
    __syncthreads();
    return r;
}

// Index of the i-th value of channel `ch` in [N, C, HW].
__device__ unsigned int at(unsigned int i, unsigned int ch, unsigned int c, unsigned int hw) {
    return ((i / hw) * c + ch) * hw + i % hw;
}

// y = x * scale[ch] + shift[ch] (ss = [scale; shift]), then ReLU if asked.
#define AFFINE(S, T, LD, ST, NAME, MUL, ADD)                                        \
extern "C" __global__ void NAME(const S* x, S* y, const double* ss,                \
                                unsigned int total, unsigned int c,                 \
                                unsigned int hw, int relu) {                        \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;        \
         i += blockDim.x * gridDim.x) {                                             \
        unsigned int ch = (i / hw) % c;                                             \
        T r = ADD(MUL(LD(x[i]), (T)ss[ch]), (T)ss[c + ch]);                         \
        y[i] = ST((relu && r <= (T)0) ? (T)0 : r);                                  \
    }                                                                               \
}

// y = relu((x * scale[ch] + shift[ch]) + r), each sum rounded as the CPU's
// batch norm and residual sum round it; NaN kept.
#define AFFINE_ADD_RELU(S, T, LD, ST, NAME, MUL, ADD)                               \
extern "C" __global__ void NAME(const S* x, const S* r, S* y, const double* ss,    \
                                unsigned int total, unsigned int c,                 \
                                unsigned int hw) {                                  \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;        \
         i += blockDim.x * gridDim.x) {                                             \
        unsigned int ch = (i / hw) % c;                                             \
        T s = ADD(ADD(MUL(LD(x[i]), (T)ss[ch]), (T)ss[c + ch]), LD(r[i]));          \
        y[i] = ST(s <= (T)0 ? (T)0 : s);                                            \
    }                                                                               \
}

// 1 / sqrt(var + eps), rounded as the CPU rounds it.
__device__ double invstd_of(double var, double eps) {
    return __ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(var, eps)));
}

// Per channel: stats = [mean; biased variance] (two passes), and from them
// ss = [scale; shift] with scale = w / sqrt(var + eps), shift = b - mean * scale.
#define STATS_SCALE_SHIFT(S, T, LD, NAME)                                           \
extern "C" __global__ void NAME(const S* x, const T* w, const T* b, double* stats,  \
                                double* ss, unsigned int n, unsigned int c,         \
                                unsigned int hw, double eps) {                      \
    __shared__ double shared[BLOCK];                                                \
    unsigned int ch = blockIdx.x, count = n * hw;                                   \
    double s = 0.0;                                                                 \
    for (unsigned int i = threadIdx.x; i < count; i += BLOCK)                       \
        s += (double)LD(x[at(i, ch, c, hw)]);                                       \
    double mean = block_sum(s, shared) / (double)count;                             \
    double q = 0.0;                                                                 \
    for (unsigned int i = threadIdx.x; i < count; i += BLOCK) {                     \
        double d = (double)LD(x[at(i, ch, c, hw)]) - mean;                          \
        q = __dadd_rn(q, __dmul_rn(d, d));                                          \
    }                                                                               \
    q = block_sum(q, shared);                                                       \
    if (threadIdx.x == 0) {                                                         \
        double var = q / (double)count;                                             \
        double scale = __ddiv_rn((double)w[ch], __dsqrt_rn(__dadd_rn(var, eps)));  \
        stats[ch] = mean;                                                           \
        stats[c + ch] = var;                                                        \
        ss[ch] = scale;                                                             \
        ss[c + ch] = __dsub_rn((double)b[ch], __dmul_rn(mean, scale));              \
    }                                                                               \
}

// y = x * scale[ch] + shift[ch] from scale and shift of T (eval mode).
#define CHANNEL_AFFINE(S, T, LD, ST, NAME, MUL, ADD)                                \
extern "C" __global__ void NAME(const S* x, S* y, const T* scale, const T* shift,  \
                                unsigned int total, unsigned int c,                 \
                                unsigned int hw, int relu) {                        \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;        \
         i += blockDim.x * gridDim.x) {                                             \
        unsigned int ch = (i / hw) % c;                                             \
        T r = ADD(MUL(LD(x[i]), scale[ch]), shift[ch]);                             \
        y[i] = ST((relu && r <= (T)0) ? (T)0 : r);                                  \
    }                                                                               \
}

// Per channel, with g' the gradient through the ReLU (zero where y <= 0):
// out[ch] = sum(g' * (x - mean)) * invstd, out[c + ch] = sum(g');
// stats = [mean; var]. And p = [mean; invstd; k; a; b] for INPUT_GRAD, from
// the sums as rounded to T and the weight w.
#define GRAD_SUMS(S, T, LD, NAME)                                                   \
extern "C" __global__ void NAME(const S* x, const S* y, const S* g, T* out,        \
                                const double* stats, const T* w, double* p,         \
                                double eps, unsigned int n, unsigned int c,         \
                                unsigned int hw, int relu) {                        \
    __shared__ double shared[BLOCK];                                                \
    unsigned int ch = blockIdx.x, count = n * hw;                                   \
    double mean = stats[ch], sg = 0.0, sgx = 0.0;                                   \
    for (unsigned int i = threadIdx.x; i < count; i += BLOCK) {                     \
        unsigned int k = at(i, ch, c, hw);                                          \
        double gv = (relu && LD(y[k]) <= (T)0) ? 0.0 : (double)LD(g[k]);            \
        sg += gv;                                                                   \
        sgx = __dadd_rn(sgx, __dmul_rn(gv, (double)LD(x[k]) - mean));               \
    }                                                                               \
    sg = block_sum(sg, shared);                                                     \
    sgx = block_sum(sgx, shared);                                                   \
    if (threadIdx.x == 0) {                                                         \
        double invstd = invstd_of(stats[c + ch], eps);                              \
        T sum_gx = (T)__dmul_rn(sgx, invstd), sum_g = (T)sg;                        \
        out[ch] = sum_gx;                                                           \
        out[c + ch] = sum_g;                                                        \
        p[ch] = mean;                                                               \
        p[c + ch] = invstd;                                                         \
        p[2 * c + ch] = __ddiv_rn(__dmul_rn((double)w[ch], invstd), (double)count); \
        p[3 * c + ch] = (double)sum_g;                                              \
        p[4 * c + ch] = (double)sum_gx;                                             \
    }                                                                               \
}

// dx = k * (count * g' - a - x_hat * b), x_hat = (x - mean) * invstd;
// p = [mean; invstd; k; a; b], k = weight * invstd / count, a = sum(g'),
// b = sum(g' * x_hat).
#define INPUT_GRAD(S, T, LD, ST, NAME)                                              \
extern "C" __global__ void NAME(const S* x, const S* y, const S* g, S* dx,         \
                                const double* p, double count, unsigned int total,  \
                                unsigned int c, unsigned int hw, int relu) {        \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;        \
         i += blockDim.x * gridDim.x) {                                             \
        unsigned int ch = (i / hw) % c;                                             \
        double xhat = __dmul_rn((double)LD(x[i]) - p[ch], p[c + ch]);               \
        double gv = (relu && LD(y[i]) <= (T)0) ? 0.0 : (double)LD(g[i]);            \
        double inner = __dsub_rn(__dsub_rn(__dmul_rn(count, gv), p[3 * c + ch]),    \
                                 __dmul_rn(xhat, p[4 * c + ch]));                   \
        dx[i] = ST((T)__dmul_rn(p[2 * c + ch], inner));                             \
    }                                                                               \
}

// Both running statistics: r <- (r * keep + 0) + (s * moment + 0), with s the
// batch mean (stats row 0) or the batch variance (row 1) * unbiased + 0,
// rounded as the CPU's chain of tensor ops rounds it.
#define RUNNING_UPDATE(T, NAME, MUL, ADD)                                           \
extern "C" __global__ void NAME(T* mean, T* var, const double* stats,              \
                                unsigned int c, T unbiased, T keep, T moment) {     \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < c;            \
         i += blockDim.x * gridDim.x) {                                             \
        T m = (T)stats[i];                                                          \
        T v = ADD(MUL((T)stats[c + i], unbiased), (T)0);                            \
        mean[i] = ADD(ADD(MUL(mean[i], keep), (T)0), ADD(MUL(m, moment), (T)0));   \
        var[i] = ADD(ADD(MUL(var[i], keep), (T)0), ADD(MUL(v, moment), (T)0));     \
    }                                                                               \
}

STATS_SCALE_SHIFT(float, float, SAME, bn_stats_scale_shift_f32)
STATS_SCALE_SHIFT(double, double, SAME, bn_stats_scale_shift_f64)
STATS_SCALE_SHIFT(unsigned short, float, bf16_ld, bn_stats_scale_shift_bf16)
AFFINE(float, float, SAME, SAME, bn_affine_f32, __fmul_rn, __fadd_rn)
AFFINE(double, double, SAME, SAME, bn_affine_f64, __dmul_rn, __dadd_rn)
AFFINE(unsigned short, float, bf16_ld, bf16_st, bn_affine_bf16, __fmul_rn, __fadd_rn)
CHANNEL_AFFINE(float, float, SAME, SAME, bn_channel_affine_f32, __fmul_rn, __fadd_rn)
CHANNEL_AFFINE(double, double, SAME, SAME, bn_channel_affine_f64, __dmul_rn, __dadd_rn)
CHANNEL_AFFINE(unsigned short, float, bf16_ld, bf16_st, bn_channel_affine_bf16, __fmul_rn, __fadd_rn)
GRAD_SUMS(float, float, SAME, bn_grad_sums_f32)
GRAD_SUMS(double, double, SAME, bn_grad_sums_f64)
GRAD_SUMS(unsigned short, float, bf16_ld, bn_grad_sums_bf16)
INPUT_GRAD(float, float, SAME, SAME, bn_input_grad_f32)
INPUT_GRAD(double, double, SAME, SAME, bn_input_grad_f64)
INPUT_GRAD(unsigned short, float, bf16_ld, bf16_st, bn_input_grad_bf16)
AFFINE_ADD_RELU(float, float, SAME, SAME, bn_affine_add_relu_f32, __fmul_rn, __fadd_rn)
AFFINE_ADD_RELU(double, double, SAME, SAME, bn_affine_add_relu_f64, __dmul_rn, __dadd_rn)
AFFINE_ADD_RELU(unsigned short, float, bf16_ld, bf16_st, bn_affine_add_relu_bf16, __fmul_rn, __fadd_rn)
RUNNING_UPDATE(float, bn_running_update_f32, __fmul_rn, __fadd_rn)
RUNNING_UPDATE(double, bn_running_update_f64, __dmul_rn, __dadd_rn)
