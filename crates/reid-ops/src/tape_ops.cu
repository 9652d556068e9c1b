// The CUDA kernels of the tape's element-wise and pooling ops (residual.rs,
// pool.rs), compiled by NVRTC when first used. Each value is computed as the
// CPU kernel computes it, in the same order, so both give the same bits: sums
// over a window or a plane run in one thread, in the CPU's order.

#define ADD_OPS(T, SUFFIX, ADD)                                                     \
/* y = a + b */                                                                     \
extern "C" __global__ void sum_##SUFFIX(const T* a, const T* b, T* y,              \
                                        unsigned int n) {                           \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;            \
         i += blockDim.x * gridDim.x)                                               \
        y[i] = ADD(a[i], b[i]);                                                     \
}                                                                                   \
/* y = relu(a + b), NaN kept */                                                     \
extern "C" __global__ void add_relu_##SUFFIX(const T* a, const T* b, T* y,         \
                                             unsigned int n) {                      \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;            \
         i += blockDim.x * gridDim.x) {                                             \
        T s = ADD(a[i], b[i]);                                                      \
        y[i] = s <= (T)0 ? (T)0 : s;                                                \
    }                                                                               \
}                                                                                   \
/* out = g where the ReLU output y is not clamped (NaN passes), else 0 */           \
extern "C" __global__ void relu_mask_##SUFFIX(const T* g, const T* y, T* out,      \
                                              unsigned int n) {                     \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;            \
         i += blockDim.x * gridDim.x)                                               \
        out[i] = y[i] <= (T)0 ? (T)0 : g[i];                                        \
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

#define POOL_OPS(T, SUFFIX, ADD, DIV, NEG_INF)                                             \
/* One thread per output: the first maximum in row-major order (a NaN wins),   */   \
/* its value and its index in the plane.                                       */   \
extern "C" __global__ void max_pool_##SUFFIX(const T* x, T* y, unsigned int* at,   \
        unsigned int planes, int h, int w, int oh, int ow, int k, int s, int p) {   \
    unsigned int total = planes * oh * ow;                                          \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;        \
         i += blockDim.x * gridDim.x) {                                             \
        unsigned int plane = i / (oh * ow);                                         \
        int oy = (i / ow) % oh, ox = i % ow, y0, y1, x0, x1, pad;                   \
        span(oy, h, k, s, p, &y0, &y1, &pad);                                       \
        span(ox, w, k, s, p, &x0, &x1, &pad);                                       \
        const T* xp = x + (size_t)plane * h * w;                                    \
        T best = NEG_INF;                                                           \
        int arg = y0 * w + x0;                                                      \
        for (int yy = y0; yy < y1; yy++)                                            \
            for (int xx = x0; xx < x1; xx++) {                                      \
                T v = xp[yy * w + xx];                                              \
                if (v != v) { best = v; arg = yy * w + xx; goto done; }             \
                if (v > best) { best = v; arg = yy * w + xx; }                      \
            }                                                                       \
    done:                                                                           \
        y[i] = xp[arg];                                                             \
        at[i] = arg;                                                                \
    }                                                                               \
}                                                                                   \
/* One thread per plane: each output gradient added to its maximum, in the     */   \
/* outputs' order (as the CPU adds them).                                      */   \
extern "C" __global__ void max_pool_backward_##SUFFIX(const T* g,                   \
        const unsigned int* at, T* dx, unsigned int planes, int hw, int ohw) {      \
    for (unsigned int plane = blockIdx.x * blockDim.x + threadIdx.x;               \
         plane < planes; plane += blockDim.x * gridDim.x) {                         \
        T* d = dx + (size_t)plane * hw;                                             \
        for (int i = 0; i < hw; i++) d[i] = (T)0;                                   \
        const T* go = g + (size_t)plane * ohw;                                      \
        const unsigned int* a = at + (size_t)plane * ohw;                           \
        for (int o = 0; o < ohw; o++) d[a[o]] = ADD(d[a[o]], go[o]);                \
    }                                                                               \
}                                                                                   \
/* One thread per output: the window's sum in row-major order, divided by its */    \
/* length counting padding.                                                    */   \
extern "C" __global__ void avg_pool_##SUFFIX(const T* x, T* y, unsigned int planes,\
        int h, int w, int oh, int ow, int k, int s, int p) {                        \
    unsigned int total = planes * oh * ow;                                          \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;        \
         i += blockDim.x * gridDim.x) {                                             \
        unsigned int plane = i / (oh * ow);                                         \
        int oy = (i / ow) % oh, ox = i % ow, y0, y1, x0, x1, py, px;                \
        span(oy, h, k, s, p, &y0, &y1, &py);                                        \
        span(ox, w, k, s, p, &x0, &x1, &px);                                        \
        const T* xp = x + (size_t)plane * h * w;                                    \
        T sum = (T)0;                                                               \
        for (int yy = y0; yy < y1; yy++)                                            \
            for (int xx = x0; xx < x1; xx++) sum = ADD(sum, xp[yy * w + xx]);       \
        y[i] = DIV(sum, (T)(py * px));                                              \
    }                                                                               \
}                                                                                   \
/* One thread per plane: each output gradient's share added over its window,  */    \
/* in the outputs' order.                                                      */   \
extern "C" __global__ void avg_pool_backward_##SUFFIX(const T* g, T* dx,           \
        unsigned int planes, int h, int w, int oh, int ow, int k, int s, int p) {   \
    for (unsigned int plane = blockIdx.x * blockDim.x + threadIdx.x;               \
         plane < planes; plane += blockDim.x * gridDim.x) {                         \
        T* d = dx + (size_t)plane * h * w;                                          \
        for (int i = 0; i < h * w; i++) d[i] = (T)0;                                \
        const T* go = g + (size_t)plane * oh * ow;                                  \
        for (int oy = 0; oy < oh; oy++) {                                           \
            int y0, y1, py;                                                         \
            span(oy, h, k, s, p, &y0, &y1, &py);                                    \
            for (int ox = 0; ox < ow; ox++) {                                       \
                int x0, x1, px;                                                     \
                span(ox, w, k, s, p, &x0, &x1, &px);                                \
                T share = DIV(go[oy * ow + ox], (T)(py * px));                      \
                for (int yy = y0; yy < y1; yy++)                                    \
                    for (int xx = x0; xx < x1; xx++)                                \
                        d[yy * w + xx] = ADD(d[yy * w + xx], share);                \
            }                                                                       \
        }                                                                           \
    }                                                                               \
}

ADD_OPS(float, f32, __fadd_rn)
ADD_OPS(double, f64, __dadd_rn)
POOL_OPS(float, f32, __fadd_rn, __fdiv_rn, __int_as_float(0xff800000))
POOL_OPS(double, f64, __dadd_rn, __ddiv_rn, __longlong_as_double(0xfff0000000000000ULL))
