// The CUDA kernels of the tape's element-wise and pooling ops (residual.rs,
// pool.rs), compiled by NVRTC when first used. Each value is computed as the
// CPU kernel computes it, in the same order, so both give the same bits: sums
// over a window run in one thread, in the CPU's order. Values are stored as S
// and computed as T, read through LD and written through ST (bf16.cuh,
// prepended): S = T for f32 and f64; bf16 bits computed as float for bf16.

#define ADD_OPS(S, T, LD, ST, SUFFIX, ADD)                                         \
/* y = a + b */                                                                     \
extern "C" __global__ void sum_##SUFFIX(const S* a, const S* b, S* y,              \
                                        unsigned int n) {                           \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;            \
         i += blockDim.x * gridDim.x)                                               \
        y[i] = ST(ADD(LD(a[i]), LD(b[i])));                                         \
}                                                                                   \
/* y = relu(a + b), NaN kept */                                                     \
extern "C" __global__ void add_relu_##SUFFIX(const S* a, const S* b, S* y,         \
                                             unsigned int n) {                      \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;            \
         i += blockDim.x * gridDim.x) {                                             \
        T s = ADD(LD(a[i]), LD(b[i]));                                              \
        y[i] = ST(s <= (T)0 ? (T)0 : s);                                            \
    }                                                                               \
}                                                                                   \
/* out = g where the ReLU output y is not clamped (NaN passes), else 0 */           \
extern "C" __global__ void relu_mask_##SUFFIX(const S* g, const S* y, S* out,      \
                                              unsigned int n) {                     \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;            \
         i += blockDim.x * gridDim.x)                                               \
        out[i] = LD(y[i]) <= (T)0 ? ST((T)0) : g[i];                                \
}

// The input range [start, end) output o covers along a side of n, clipped, and
// the window length counting padding (PyTorch's count_include_pad).
__device__ void span(int o, int n, int k, int s, int p, int* lo, int* hi, int* padded) {
    int start = o * s - p, end = start + k;
    int pend = end < n + p ? end : n + p;
    *padded = pend - start;
    *lo = start > 0 ? start : 0;
    *hi = end < n ? end : n;
}

// The outputs [lo, hi] along a side of `on` whose windows hold input index i.
__device__ void covering(int i, int on, int k, int s, int p, int* lo, int* hi) {
    int first = i + p - k + 1;
    *lo = first <= 0 ? 0 : (first + s - 1) / s;
    int last = (i + p) / s;
    *hi = last < on - 1 ? last : on - 1;
}

#define POOL_OPS(S, T, LD, ST, SUFFIX, ADD, DIV, NEG_INF)                                 \
/* One thread per output: the first maximum in row-major order (a NaN wins),   */   \
/* its value and its index in the plane.                                       */   \
extern "C" __global__ void max_pool_##SUFFIX(const S* x, S* y, unsigned int* at,   \
        unsigned int planes, int h, int w, int oh, int ow, int k, int s, int p) {   \
    unsigned int total = planes * oh * ow;                                          \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;        \
         i += blockDim.x * gridDim.x) {                                             \
        unsigned int plane = i / (oh * ow);                                         \
        int oy = (i / ow) % oh, ox = i % ow, y0, y1, x0, x1, pad;                   \
        span(oy, h, k, s, p, &y0, &y1, &pad);                                       \
        span(ox, w, k, s, p, &x0, &x1, &pad);                                       \
        const S* xp = x + (size_t)plane * h * w;                                    \
        T best = NEG_INF;                                                           \
        int arg = y0 * w + x0;                                                      \
        for (int yy = y0; yy < y1; yy++)                                            \
            for (int xx = x0; xx < x1; xx++) {                                      \
                T v = LD(xp[yy * w + xx]);                                          \
                if (v != v) { best = v; arg = yy * w + xx; goto done; }             \
                if (v > best) { best = v; arg = yy * w + xx; }                      \
            }                                                                       \
    done:                                                                           \
        y[i] = xp[arg];                                                             \
        at[i] = arg;                                                                \
    }                                                                               \
}                                                                                   \
/* One thread per input: the gradients of the outputs whose maximum it is,     */   \
/* added in the outputs' row-major order (the order the CPU adds them in).     */   \
extern "C" __global__ void max_pool_backward_##SUFFIX(const S* g,                   \
        const unsigned int* at, S* dx, unsigned int planes, int h, int w, int oh,   \
        int ow, int k, int s, int p) {                                              \
    unsigned int total = planes * h * w;                                            \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;        \
         i += blockDim.x * gridDim.x) {                                             \
        unsigned int plane = i / (h * w), here = i % (h * w);                       \
        int yy = here / w, xx = here % w, oy0, oy1, ox0, ox1;                       \
        covering(yy, oh, k, s, p, &oy0, &oy1);                                      \
        covering(xx, ow, k, s, p, &ox0, &ox1);                                      \
        const S* go = g + (size_t)plane * oh * ow;                                  \
        const unsigned int* a = at + (size_t)plane * oh * ow;                       \
        T sum = (T)0;                                                               \
        for (int oy = oy0; oy <= oy1; oy++)                                         \
            for (int ox = ox0; ox <= ox1; ox++)                                     \
                if (a[oy * ow + ox] == here) sum = ADD(sum, LD(go[oy * ow + ox]));  \
        dx[i] = ST(sum);                                                            \
    }                                                                               \
}                                                                                   \
/* One thread per output: the window's sum in row-major order, divided by its */    \
/* length counting padding.                                                    */   \
extern "C" __global__ void avg_pool_##SUFFIX(const S* x, S* y, unsigned int planes,\
        int h, int w, int oh, int ow, int k, int s, int p) {                        \
    unsigned int total = planes * oh * ow;                                          \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;        \
         i += blockDim.x * gridDim.x) {                                             \
        unsigned int plane = i / (oh * ow);                                         \
        int oy = (i / ow) % oh, ox = i % ow, y0, y1, x0, x1, py, px;                \
        span(oy, h, k, s, p, &y0, &y1, &py);                                        \
        span(ox, w, k, s, p, &x0, &x1, &px);                                        \
        const S* xp = x + (size_t)plane * h * w;                                    \
        T sum = (T)0;                                                               \
        for (int yy = y0; yy < y1; yy++)                                            \
            for (int xx = x0; xx < x1; xx++) sum = ADD(sum, LD(xp[yy * w + xx]));   \
        y[i] = ST(DIV(sum, (T)(py * px)));                                          \
    }                                                                               \
}                                                                                   \
/* One thread per input: the shares of the outputs whose windows hold it,      */   \
/* added in the outputs' row-major order (the order the CPU adds them in).     */   \
extern "C" __global__ void avg_pool_backward_##SUFFIX(const S* g, S* dx,           \
        unsigned int planes, int h, int w, int oh, int ow, int k, int s, int p) {   \
    unsigned int total = planes * h * w;                                            \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;        \
         i += blockDim.x * gridDim.x) {                                             \
        unsigned int plane = i / (h * w);                                           \
        int yy = (i / w) % h, xx = i % w, oy0, oy1, ox0, ox1;                       \
        covering(yy, oh, k, s, p, &oy0, &oy1);                                      \
        covering(xx, ow, k, s, p, &ox0, &ox1);                                      \
        const S* go = g + (size_t)plane * oh * ow;                                  \
        T sum = (T)0;                                                               \
        for (int oy = oy0; oy <= oy1; oy++) {                                       \
            int y0, y1, py;                                                         \
            span(oy, h, k, s, p, &y0, &y1, &py);                                    \
            for (int ox = ox0; ox <= ox1; ox++) {                                   \
                int x0, x1, px;                                                     \
                span(ox, w, k, s, p, &x0, &x1, &px);                                \
                sum = ADD(sum, DIV(LD(go[oy * ow + ox]), (T)(py * px)));            \
            }                                                                       \
        }                                                                           \
        dx[i] = ST(sum);                                                            \
    }                                                                               \
}

ADD_OPS(float, float, SAME, SAME, f32, __fadd_rn)
ADD_OPS(double, double, SAME, SAME, f64, __dadd_rn)
ADD_OPS(unsigned short, float, bf16_ld, bf16_st, bf16, __fadd_rn)
POOL_OPS(float, float, SAME, SAME, f32, __fadd_rn, __fdiv_rn, __int_as_float(0xff800000))
POOL_OPS(double, double, SAME, SAME, f64, __dadd_rn, __ddiv_rn, __longlong_as_double(0xfff0000000000000ULL))
POOL_OPS(unsigned short, float, bf16_ld, bf16_st, bf16, __fadd_rn, __fdiv_rn, __int_as_float(0xff800000))
