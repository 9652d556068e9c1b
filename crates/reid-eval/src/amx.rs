//! Query-gallery dot products on Intel AMX tiles, for the exact ranking.
//!
//! AMX multiplies bf16 tiles into f32 about ten times as fast as AVX-512 does
//! f32 FMAs, but bf16 keeps only 8 significant bits. So each f32 value `x` is
//! split into two bf16 parts, `hi = bf16(x)` and `lo = bf16(x - hi)`, which leave
//! `|x - hi - lo| <= 2^-16 |x|`, and a dot product is formed as
//! `hi.hi + hi.lo + lo.hi` (the products of bf16 values are exact in f32). The
//! three products accumulate in f32 tiles, `hi.hi` in one and the two smaller
//! cross terms in another, over [`SLICE`] dimensions at a time; each slice's sum
//! is then added to the result. [`Bounds::dot`] bounds the error of the result
//! against the exact dot product, from norms of each row's parts: what the split
//! leaves out is `lo.lo + (hi + lo).r + r.x`, at most `|lo_q| |lo_g| + |hi_q +
//! lo_q| |r_g| + |r_q| |g|` by Cauchy-Schwarz. The ranking recomputes in f64
//! every entry whose order could depend on the error, as it does for the f32
//! GEMM's rounding.
//!
//! Used where the CPU has AMX-BF16, Linux grants the process the tile state, and
//! `REID_AMX=off` is not set; the caller also checks that every feature norm lies
//! in [`NORM_RANGE`] (so that no value overflows bf16 and flushed subnormals are
//! negligible).

use std::arch::asm;
use std::sync::OnceLock;

use rayon::prelude::*;

/// Values per row of a tile (64 bytes of bf16), the depth of one tile product.
const KSTEP: usize = 32;
/// Rows of a tile: queries per strip, gallery rows per column block.
const TILE: usize = 16;
/// Dimensions summed in one chain of f32 additions in the tiles.
pub const SLICE: usize = 128;
/// Query strips per task: they share each gallery block while it is in cache.
const STRIPS_PER_TASK: usize = 8;
/// Feature norms for which the tiles are used (outside, the f32 GEMM).
pub const NORM_RANGE: (f64, f64) = (1e-8, 1e18);

/// Whether this process computes dot products on AMX tiles (checked once). The
/// packing code runs AVX-512F, which every AMX CPU has; it is checked too, so
/// that the packing's `unsafe` rests on a test, not on that fact.
pub fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        let off = matches!(std::env::var("REID_AMX").as_deref(), Ok("off" | "0"));
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        !off && avx512 && cpu_has_amx_bf16() && tiles_granted()
    })
}

/// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (bit 24).
fn cpu_has_amx_bf16() -> bool {
    // A safe function in recent Rust, an unsafe one in older (rust-version 1.89).
    #[allow(unused_unsafe)]
    // SAFETY: CPUID leaf 7 exists on every x86-64 CPU this binary runs on.
    let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`).
fn tiles_granted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes the process's permissions.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

/// Norms of one row's parts, in f64: `|lo|`, `|hi + lo|` and the remainder
/// `|x - hi - lo|`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PartNorms {
    pub lo: f64,
    pub parts: f64,
    pub rest: f64,
}

impl PartNorms {
    fn of(row: &[f32]) -> Self {
        // SAFETY: only called when `usable()`, which checks AVX-512F.
        let [lo2, parts2, rest2] = unsafe { squared_part_norms(row) };
        // 1.001: room for the f64 roundings of the sums and roots.
        let norm = |s: f64| 1.001 * s.sqrt();
        PartNorms {
            lo: norm(lo2),
            parts: norm(parts2),
            rest: norm(rest2),
        }
    }

    fn max(self, o: PartNorms) -> PartNorms {
        PartNorms {
            lo: self.lo.max(o.lo),
            parts: self.parts.max(o.parts),
            rest: self.rest.max(o.rest),
        }
    }
}

/// `|lo|^2`, `|hi + lo|^2` and `|x - hi - lo|^2` of `row`, summed in 8 lanes.
#[target_feature(enable = "avx512f")]
unsafe fn squared_part_norms(row: &[f32]) -> [f64; 3] {
    let mut acc = [[0f64; 8]; 3];
    let add = |acc: &mut [[f64; 8]; 3], k: usize, x: f32| {
        let (h, l) = split(x);
        let (h, l) = (widen(h), widen(l));
        let rest = x as f64 - h - l;
        acc[0][k] += l * l;
        acc[1][k] += (h + l) * (h + l);
        acc[2][k] += rest * rest;
    };
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (k, &x) in chunk.iter().enumerate() {
            add(&mut acc, k, x);
        }
    }
    for (k, &x) in tail.iter().enumerate() {
        add(&mut acc, k, x);
    }
    acc.map(|lanes| lanes.iter().sum())
}

/// A bf16 value as f64.
#[inline(always)]
fn widen(h: u16) -> f64 {
    f32::from_bits((h as u32) << 16) as f64
}

/// What bounds the error of the AMX dot products of two sets of rows.
#[derive(Debug, Clone)]
pub struct Bounds {
    dim: usize,
    query: Vec<PartNorms>,
    gallery: Vec<PartNorms>,
    /// Each gallery norm's largest value.
    gallery_max: PartNorms,
}

impl Bounds {
    /// The part norms of queries `q` and gallery rows `g` ([n, dim] each).
    pub fn new(q: &[f32], g: &[f32], dim: usize) -> Self {
        assert!(usable(), "AMX bounds on a machine without AMX");
        let norms = |rows: &[f32]| -> Vec<PartNorms> { rows.par_chunks(dim).map(PartNorms::of).collect() };
        let gallery = norms(g);
        let gallery_max = gallery.iter().fold(PartNorms::default(), |m, &n| m.max(n));
        Bounds {
            dim,
            query: norms(q),
            gallery,
            gallery_max,
        }
    }

    /// A bound on |AMX dot product - exact| of query `i` (norm `a`) and gallery
    /// row `j` (norm `b`); `None` for `j` bounds it over every gallery row (with
    /// `b` their largest norm).
    pub fn dot(&self, i: usize, a: f64, j: Option<usize>, b: f64) -> f64 {
        let (q, g) = (self.query[i], j.map_or(self.gallery_max, |j| self.gallery[j]));
        let left_out = q.lo * g.lo + q.parts * g.rest + q.rest * b;
        let u = f32::EPSILON as f64 / 2.0; // f32 unit roundoff
        let slices = self.dim.div_ceil(SLICE) as f64;
        // hi.hi (sum of |terms| <= (1 + 2^-8)^2 |q| |g|): SLICE additions in a
        // tile, one to join the cross terms, one per slice into the result; the
        // cross terms (sum <= 2 * 1.004 * 2^-8 |q| |g|): twice as many in theirs.
        let chain = |terms: f64, adds: f64| 1.01 * terms * adds * u;
        let accumulated = chain(1.008, SLICE as f64 + 1.0 + slices) + chain(0.0079, 2.0 * SLICE as f64 + 1.0 + slices);
        // Subnormal parts and products are flushed to zero: each below 2^-126.
        let n = self.dim as f64;
        let flushed = 2f64.powi(-126) * (3.0 * n + n.sqrt() * (a + b));
        left_out + accumulated * a * b + flushed
    }
}

/// `x` rounded to bf16 (to nearest, ties to even), as bits; `x` finite.
#[inline(always)]
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The (hi, lo) bf16 parts of `x`.
#[inline(always)]
fn split(x: f32) -> (u16, u16) {
    let hi = bf16(x);
    (hi, bf16(x - f32::from_bits((hi as u32) << 16)))
}

/// Rows of features split into bf16 parts, zero-padded to whole tiles.
struct Parts {
    hi: Vec<u16>,
    lo: Vec<u16>,
}

/// A block of queries split and packed for [`dot_tile`]: strips of [`TILE`]
/// rows of `dim_p` values (row-major: a tile is 16 rows of 64 bytes, `dim_p * 2`
/// bytes apart).
pub struct Strips {
    parts: Parts,
    rows: usize,
    dim: usize,
}

impl Strips {
    /// Queries `rows` [n, dim].
    pub fn new(rows: &[f32], dim: usize) -> Self {
        assert!(usable(), "AMX strips on a machine without AMX");
        Strips {
            parts: pack_queries(rows, dim, padded(dim)),
            rows: rows.len() / dim,
            dim,
        }
    }
}

/// `dim` rounded up to whole tile rows.
fn padded(dim: usize) -> usize {
    dim.div_ceil(KSTEP) * KSTEP
}

fn pack_queries(rows: &[f32], dim: usize, dim_p: usize) -> Parts {
    let n = rows.len() / dim;
    let len = n.div_ceil(TILE) * TILE * dim_p;
    let (mut hi, mut lo) = (vec![0u16; len], vec![0u16; len]);
    hi.par_chunks_mut(dim_p)
        .zip(lo.par_chunks_mut(dim_p))
        .zip(rows.par_chunks(dim))
        // SAFETY: only called when `usable()`, which checks AVX-512F.
        .for_each(|((h, l), r)| unsafe { split_row(r, h, l) });
    Parts { hi, lo }
}

/// `row` split into `hi` and `lo` (as long as `row` or longer).
#[target_feature(enable = "avx512f")]
unsafe fn split_row(row: &[f32], hi: &mut [u16], lo: &mut [u16]) {
    for ((&x, h), l) in row.iter().zip(hi.iter_mut()).zip(lo.iter_mut()) {
        (*h, *l) = split(x);
    }
}

/// Gallery `rows` [n, dim] as blocks of [`TILE`] rows, each `[dim_p / 2][16][2]`:
/// the pair of values `2p, 2p + 1` of the block's 16 rows side by side, the
/// layout a tile product takes for its second operand. The blocks come in
/// pairs (the last one zeros if need be).
fn pack_gallery(rows: &[f32], dim: usize, dim_p: usize) -> Parts {
    let n = rows.len() / dim;
    let block = TILE * dim_p;
    let len = n.div_ceil(2 * TILE) * 2 * block;
    let (mut hi, mut lo) = (vec![0u16; len], vec![0u16; len]);
    hi.par_chunks_mut(block)
        .zip(lo.par_chunks_mut(block))
        .zip(rows.par_chunks(TILE * dim))
        .for_each(|((h, l), block_rows)| {
            let (mut row_h, mut row_l) = (vec![0u16; dim_p], vec![0u16; dim_p]);
            for (c, r) in block_rows.chunks(dim).enumerate() {
                // SAFETY: only called when `usable()`, which checks AVX-512F.
                unsafe { split_row(r, &mut row_h, &mut row_l) };
                for (packed, row) in [(&mut *h, &row_h), (&mut *l, &row_l)] {
                    for (p, pair) in row.chunks_exact(2).enumerate() {
                        let at = p * 2 * TILE + c * 2;
                        packed[at..at + 2].copy_from_slice(pair);
                    }
                }
            }
        });
    Parts { hi, lo }
}

/// The tile configuration: eight tiles of 16 rows of 64 bytes (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The dot products of a query strip (`a`: hi and lo parts, rows `a_stride`
/// bytes apart) with two gallery blocks (`b`: hi and lo parts of each), over
/// `ksteps` steps of [`KSTEP`] values: two 16 x 16 tiles, one per block.
///
/// # Safety
/// The tiles are configured with [`CONFIG`] on this thread; `a` and `b` hold
/// `ksteps` steps of their layouts.
unsafe fn tile_dots(a: [*const u16; 2], a_stride: usize, b: [[*const u16; 2]; 2], ksteps: usize) -> [[f32; 256]; 2] {
    let mut acc = [[0f32; 256]; 2];
    let mut sums = [[0f32; 256]; 4]; // hi.hi and cross terms of each block
    for first in (0..ksteps).step_by(SLICE / KSTEP) {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack)
        );
        for ks in first..(first + SLICE / KSTEP).min(ksteps) {
            let [ah, al] = a.map(|p| p.add(ks * KSTEP));
            let [[bh0, bl0], [bh1, bl1]] = b.map(|block| block.map(|p| p.add(ks * KSTEP * TILE)));
            // tmm4, tmm5: the strip's hi and lo; tmm6, tmm7: a block's hi and lo.
            asm!(
                "tileloadd tmm4, [{ah} + {sa}*1]",
                "tileloadd tmm5, [{al} + {sa}*1]",
                "tileloadd tmm6, [{bh0} + {sb}*1]",
                "tileloadd tmm7, [{bl0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm1, tmm5, tmm6",
                "tileloadd tmm6, [{bh1} + {sb}*1]",
                "tileloadd tmm7, [{bl1} + {sb}*1]",
                "tdpbf16ps tmm2, tmm4, tmm6",
                "tdpbf16ps tmm3, tmm4, tmm7",
                "tdpbf16ps tmm3, tmm5, tmm6",
                ah = in(reg) ah, al = in(reg) al, bh0 = in(reg) bh0, bl0 = in(reg) bl0,
                bh1 = in(reg) bh1, bl1 = in(reg) bl1, sa = in(reg) a_stride, sb = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        let [s0, s1, s2, s3] = &mut sums;
        asm!(
            "tilestored [{s0} + {s}*1], tmm0",
            "tilestored [{s1} + {s}*1], tmm1",
            "tilestored [{s2} + {s}*1], tmm2",
            "tilestored [{s3} + {s}*1], tmm3",
            s0 = in(reg) s0.as_mut_ptr(), s1 = in(reg) s1.as_mut_ptr(),
            s2 = in(reg) s2.as_mut_ptr(), s3 = in(reg) s3.as_mut_ptr(), s = in(reg) 64usize,
            options(nostack),
        );
        for (block, acc) in acc.iter_mut().enumerate() {
            let (hh, cross) = (&sums[2 * block], &sums[2 * block + 1]);
            for ((o, h), c) in acc.iter_mut().zip(hh).zip(cross) {
                *o += h + c;
            }
        }
    }
    acc
}

/// Dot products of queries `q` with gallery rows `g` [cols, dim], into `out`
/// [rows, cols] (row-major), on AMX tiles. Only when [`usable`].
pub fn dot_tile(q: &Strips, g: &[f32], out: &mut [f32]) {
    assert!(usable(), "AMX dot products on a machine without them");
    let (dim, dim_p) = (q.dim, padded(q.dim));
    let (rows, cols) = (q.rows, g.len() / dim);
    assert_eq!(out.len(), rows * cols);
    let (a, b) = (&q.parts, pack_gallery(g, dim, dim_p));
    let ksteps = dim_p / KSTEP;
    let strip_len = TILE * dim_p;
    out.par_chunks_mut(STRIPS_PER_TASK * TILE * cols)
        .enumerate()
        .for_each(|(task, out)| {
            // SAFETY: the tiles are configured on this thread before use and
            // released after; every pointer stays inside the packed parts
            // (the gallery's are a whole number of block pairs).
            unsafe {
                asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
                for pair in 0..cols.div_ceil(2 * TILE) {
                    let b_parts = [2 * pair, 2 * pair + 1].map(|block| {
                        let at = block * strip_len;
                        [b.hi.as_ptr().add(at), b.lo.as_ptr().add(at)]
                    });
                    for (s, strip_out) in out.chunks_mut(TILE * cols).enumerate() {
                        let a_at = (task * STRIPS_PER_TASK + s) * strip_len;
                        let a_parts = [a.hi.as_ptr().add(a_at), a.lo.as_ptr().add(a_at)];
                        let dots = tile_dots(a_parts, dim_p * 2, b_parts, ksteps);
                        for (k, tile) in dots.iter().enumerate() {
                            place(tile, strip_out, cols, (2 * pair + k) * TILE);
                        }
                    }
                }
                asm!("tilerelease", options(nostack));
            }
        });
}

/// Copies the valid part of a 16 x 16 tile of dots into rows of `out` (each
/// `cols` long) at column `c0`.
fn place(dots: &[f32; 256], out: &mut [f32], cols: usize, c0: usize) {
    let width = TILE.min(cols.saturating_sub(c0));
    if width == 0 {
        return;
    }
    for (r, row) in out.chunks_mut(cols).enumerate() {
        row[c0..c0 + width].copy_from_slice(&dots[r * TILE..r * TILE + width]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parts_leave_a_remainder_below_the_bound() {
        let mut s = 1u64;
        for _ in 0..100_000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Any significand, exponents 2^-60..2^60, either sign.
            let exponent = (127 - 60 + (s >> 20) % 121) as u32;
            let bits = ((s >> 32) as u32 & 0x007f_ffff) | (exponent << 23) | ((s as u32 & 1) << 31);
            let x = f32::from_bits(bits);
            let (hi, lo) = split(x);
            let (h, l) = (f32::from_bits((hi as u32) << 16), f32::from_bits((lo as u32) << 16));
            let rest = (x as f64 - h as f64 - l as f64).abs();
            assert!(rest <= 2f64.powi(-16) * (x as f64).abs(), "{x}: {h} + {l}");
            assert!((h as f64).abs() <= (1.0 + 2f64.powi(-8)) * (x as f64).abs());
        }
    }

    /// Queries and gallery rows of uneven sizes (not whole tiles or steps).
    fn case(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n * dim)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect()
    }

    #[test]
    fn dots_are_within_their_bound_or_amx_is_not_used() {
        let dim = 300;
        let (q, g) = (case(37, dim, 1), case(53, dim, 2));
        if !usable() {
            // Without AMX the f32 GEMM runs: dot_tile refuses.
            let result = std::panic::catch_unwind(|| dot_tile(&Strips::new(&q, dim), &g, &mut vec![0.0; 37 * 53]));
            assert!(result.is_err());
            return;
        }
        let mut out = vec![f32::NAN; 37 * 53];
        dot_tile(&Strips::new(&q, dim), &g, &mut out);
        let bounds = Bounds::new(&q, &g, dim);
        let norm = |r: &[f32]| r.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        let mut worst: f64 = 0.0;
        for (i, qr) in q.chunks(dim).enumerate() {
            for (j, gr) in g.chunks(dim).enumerate() {
                let exact: f64 = qr.iter().zip(gr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let (a, b) = (norm(qr), norm(gr));
                let err = (out[i * 53 + j] as f64 - exact).abs();
                let bound = bounds.dot(i, a, Some(j), b);
                assert!(err <= bound, "({i}, {j}): {err} > {bound}");
                assert!(bound <= bounds.dot(i, a, None, b * 1.5), "the bound over the gallery");
                worst = worst.max(err / (a * b));
            }
        }
        // Far tighter than bf16 alone (2^-8): the split works.
        assert!(worst < 1e-5, "{worst}");
    }
}
