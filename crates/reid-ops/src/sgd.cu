// The SGD update as one pass over a parameter (ops/sgd_cuda.rs), compiled by
// NVRTC when first used. Each value rounds as the CPU's one-pass update rounds
// it (reid-train's optim.rs): every product and sum on its own, `x * y + 0`
// where the CPU adds a zero (it turns -0 into +0), no fused multiply-add.
// The gradient is of G, read through LDG: the parameter's own type, or bf16
// (the gradient of a weight's bf16 copy; bf16.cuh, prepended). Where `copy` is
// not null (f32 parameters only), the new parameter's bf16 copy is written too.

// g + (p * wd + 0), or g without weight decay.
#define DECAYED(LDG, MUL, ADD) (has_wd ? ADD(LDG(g[i]), ADD(MUL(p[i], wd), zero)) : LDG(g[i]))

// p <- p - (d * lr + 0), d = decayed gradient.
#define SGD_PLAIN(T, G, LDG, NAME, MUL, ADD, SUB)                                   \
extern "C" __global__ void NAME(T* p, const G* g, unsigned int n, T lr, T wd,      \
                                int has_wd, unsigned short* copy) {                 \
    const T zero = (T)0;                                                            \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;            \
         i += blockDim.x * gridDim.x) {                                             \
        T d = DECAYED(LDG, MUL, ADD);                                               \
        p[i] = SUB(p[i], ADD(MUL(d, lr), zero));                                    \
        if (copy) copy[i] = bf16_st((float)p[i]);                                   \
    }                                                                               \
}

// buf <- d (first step) or (buf * m + 0) + (d * keep + 0);
// p <- p - (dir * lr + 0), dir = buf, or d + (buf * m + 0) with Nesterov.
#define SGD_MOMENTUM(T, G, LDG, NAME, MUL, ADD, SUB)                                \
extern "C" __global__ void NAME(T* p, const G* g, T* buf, unsigned int n, T lr,    \
                                T wd, int has_wd, T m, T keep, int first,           \
                                int nesterov, unsigned short* copy) {               \
    const T zero = (T)0;                                                            \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;            \
         i += blockDim.x * gridDim.x) {                                             \
        T d = DECAYED(LDG, MUL, ADD);                                               \
        T b = first ? d : ADD(ADD(MUL(buf[i], m), zero), ADD(MUL(d, keep), zero));  \
        T dir = nesterov ? ADD(d, ADD(MUL(b, m), zero)) : b;                        \
        p[i] = SUB(p[i], ADD(MUL(dir, lr), zero));                                  \
        buf[i] = b;                                                                 \
        if (copy) copy[i] = bf16_st((float)p[i]);                                   \
    }                                                                               \
}

SGD_PLAIN(float, float, SAME, sgd_plain_f32, __fmul_rn, __fadd_rn, __fsub_rn)
SGD_PLAIN(double, double, SAME, sgd_plain_f64, __dmul_rn, __dadd_rn, __dsub_rn)
SGD_PLAIN(float, unsigned short, bf16_ld, sgd_plain_bf16_grad_f32, __fmul_rn, __fadd_rn, __fsub_rn)
SGD_MOMENTUM(float, float, SAME, sgd_momentum_f32, __fmul_rn, __fadd_rn, __fsub_rn)
SGD_MOMENTUM(double, double, SAME, sgd_momentum_f64, __dmul_rn, __dadd_rn, __dsub_rn)
SGD_MOMENTUM(float, unsigned short, bf16_ld, sgd_momentum_bf16_grad_f32, __fmul_rn, __fadd_rn, __fsub_rn)

// copy <- bf16(p): the bf16 copy of a weight rewritten after its update.
extern "C" __global__ void bf16_copy_f32(const float* p, unsigned short* copy, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += blockDim.x * gridDim.x)
        copy[i] = bf16_st(p[i]);
}
