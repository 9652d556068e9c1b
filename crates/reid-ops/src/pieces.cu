// The Res2Net split and concatenation (pieces.rs) in one launch each: a tensor
// [N, K * P] (K pieces of P values per image) to or from K tensors [N, P]. The
// pieces' addresses come by value in `Pieces`. Values are copied bit for bit,
// so one kernel serves each size of value: f32, f64, bf16.

#define MAX_PIECES 8

struct Pieces {
    unsigned long long at[MAX_PIECES];
};

#define PIECE_OPS(T, SUFFIX)                                                        \
extern "C" __global__ void split_pieces_##SUFFIX(const T* x, Pieces out,           \
        unsigned int images, unsigned int count, unsigned int piece) {              \
    size_t per_image = (size_t)count * piece, total = per_image * images;           \
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total;              \
         i += (size_t)blockDim.x * gridDim.x) {                                     \
        size_t image = i / per_image, r = i % per_image;                            \
        T* dst = (T*)out.at[r / piece];                                             \
        dst[image * piece + r % piece] = x[i];                                      \
    }                                                                               \
}                                                                                   \
extern "C" __global__ void cat_pieces_##SUFFIX(Pieces in, T* y,                    \
        unsigned int images, unsigned int count, unsigned int piece) {              \
    size_t per_image = (size_t)count * piece, total = per_image * images;           \
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total;              \
         i += (size_t)blockDim.x * gridDim.x) {                                     \
        size_t image = i / per_image, r = i % per_image;                            \
        const T* src = (const T*)in.at[r / piece];                                  \
        y[i] = src[image * piece + r % piece];                                      \
    }                                                                               \
}

PIECE_OPS(unsigned int, f32)
PIECE_OPS(unsigned long long, f64)
PIECE_OPS(unsigned short, bf16)
