//! Loops compiled for the widest vectors the CPU has. The binary targets plain
//! x86-64 (SSE2), so that it runs on any such CPU; the element-wise loops of the
//! ops run through [`with_widest_simd!`](crate::with_widest_simd), which picks an AVX-512 or AVX2 copy of the loop
//! at run time.
//!
//! The copies do the same operations in the same order: Rust never fuses a
//! multiply and an add by itself, and LLVM does not reorder a floating-point
//! sum, so each copy gives the same bits.

/// Runs `$body` (an expression), compiled for AVX-512 (or AVX2) where the CPU
/// has it. The body is written out once per instruction set, as a closure with a
/// single call, so that LLVM inlines it into the copy compiled for those
/// instructions; helpers it calls are marked `#[inline(always)]`, and parallel
/// loops use `with_widest_simd!` inside each task.
#[macro_export]
macro_rules! with_widest_simd {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F. (The block is redundant where
                // the macro is used inside another unsafe block.)
                #[allow(unused_unsafe)]
                let r = unsafe { $crate::simd::avx512(|| $body) };
                r
            } else if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                #[allow(unused_unsafe)]
                let r = unsafe { $crate::simd::avx2(|| $body) };
                r
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

/// Calls `f` from code compiled for AVX-512; see [`with_widest_simd!`].
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
pub unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Calls `f` from code compiled for AVX2; see [`with_widest_simd!`].
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    /// Sums (in lanes, and as one chain) and a select, loops of the shapes
    /// the ops run through `with_widest_simd!`: the same bits as the plain build.
    #[test]
    fn the_wide_copy_gives_the_bits_of_the_plain_one() {
        let v: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0).collect();
        let run = |v: &[f32]| {
            let mut lanes = [0.0f64; 16];
            for c in v.chunks_exact(16) {
                for (l, &x) in lanes.iter_mut().zip(c) {
                    *l += x as f64 * 1.1 - 0.3;
                }
            }
            let chain: f64 = v.iter().map(|&x| (x as f64 - 0.25).powi(2)).sum();
            let relu: Vec<f32> = v.iter().map(|&x| if x <= 0.0 { 0.0 } else { x * 0.7 + 0.1 }).collect();
            let bits = relu.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (lanes.iter().sum::<f64>().to_bits(), chain.to_bits(), bits)
        };
        assert_eq!(crate::with_widest_simd!(run(&v)), run(&v));
    }
}
