// The SGD update as one pass over a parameter (ops/sgd_cuda.rs), compiled by
// NVRTC when first used. Each value rounds as the CPU's one-pass update rounds
// it (reid-train's optim.rs): every product and sum on its own, `x * y + 0`
// where the CPU adds a zero (it turns -0 into +0), no fused multiply-add.

// g + (p * wd + 0), or g without weight decay.
#define DECAYED(MUL, ADD) (has_wd ? ADD(g[i], ADD(MUL(p[i], wd), zero)) : g[i])

// p <- p - (d * lr + 0), d = decayed gradient.
#define SGD_PLAIN(T, NAME, MUL, ADD, SUB)                                           \
extern "C" __global__ void NAME(T* p, const T* g, unsigned int n, T lr, T wd,      \
                                int has_wd) {                                       \
    const T zero = (T)0;                                                            \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;            \
         i += blockDim.x * gridDim.x) {                                             \
        T d = DECAYED(MUL, ADD);                                                    \
        p[i] = SUB(p[i], ADD(MUL(d, lr), zero));                                    \
    }                                                                               \
}

// buf <- d (first step) or (buf * m + 0) + (d * keep + 0);
// p <- p - (dir * lr + 0), dir = buf, or d + (buf * m + 0) with Nesterov.
#define SGD_MOMENTUM(T, NAME, MUL, ADD, SUB)                                        \
extern "C" __global__ void NAME(T* p, const T* g, T* buf, unsigned int n, T lr,    \
                                T wd, int has_wd, T m, T keep, int first,           \
                                int nesterov) {                                     \
    const T zero = (T)0;                                                            \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;            \
         i += blockDim.x * gridDim.x) {                                             \
        T d = DECAYED(MUL, ADD);                                                    \
        T b = first ? d : ADD(ADD(MUL(buf[i], m), zero), ADD(MUL(d, keep), zero));  \
        T dir = nesterov ? ADD(d, ADD(MUL(b, m), zero)) : b;                        \
        p[i] = SUB(p[i], ADD(MUL(dir, lr), zero));                                  \
        buf[i] = b;                                                                 \
    }                                                                               \
}

SGD_PLAIN(float, sgd_plain_f32, __fmul_rn, __fadd_rn, __fsub_rn)
SGD_PLAIN(double, sgd_plain_f64, __dmul_rn, __dadd_rn, __dsub_rn)
SGD_MOMENTUM(float, sgd_momentum_f32, __fmul_rn, __fadd_rn, __fsub_rn)
SGD_MOMENTUM(double, sgd_momentum_f64, __dmul_rn, __dadd_rn, __dsub_rn)
