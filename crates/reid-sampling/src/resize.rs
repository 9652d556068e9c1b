//! Pillow's resize of 8-bit images (`Image.resize` with `BILINEAR` or
//! `BICUBIC`), value for value: what torchvision's `Resize` gives on a PIL image.
//!
//! Pillow resamples by convolution, antialiased when shrinking: the filter is
//! stretched by the scale factor, so every source pixel under an output pixel
//! counts. Each output pixel's weights are computed in f64, normalised to sum to
//! one, and rounded to fixed point with 22 fractional bits. The horizontal pass
//! runs first, into an 8-bit intermediate image (rounded and clamped), then the
//! vertical pass. The roundings are what make results differ from other
//! resizers by a level here and there, so they are reproduced exactly.

use crate::preprocess::{Interpolation, Rgb8};

/// Fractional bits of the fixed-point weights (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The filter and its support (half-width) at scale 1.
fn filter(interpolation: Interpolation) -> (fn(f64) -> f64, f64) {
    match interpolation {
        Interpolation::Bilinear => (triangle, 1.0),
        Interpolation::Bicubic => (keys_cubic, 2.0),
    }
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Keys' cubic convolution with a = -0.5.
fn keys_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The fixed-point weights of one axis: for each output position, the first
/// source position it reads and its weights.
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

impl Taps {
    /// The taps of resizing `in_size` positions to `out_size`.
    fn new(in_size: usize, out_size: usize, interpolation: Interpolation) -> Taps {
        let (f, support) = filter(interpolation);
        let scale = in_size as f64 / out_size as f64;
        let stretch = scale.max(1.0);
        let support = support * stretch;
        let (mut first, mut weights) = (Vec::with_capacity(out_size), Vec::with_capacity(out_size));
        for out in 0..out_size {
            let centre = (out as f64 + 0.5) * scale;
            // Truncation toward zero, as C's (int) cast, then clamped.
            let lo = ((centre - support + 0.5) as i64).max(0) as usize;
            let hi = ((centre + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (lo..hi).map(|x| f((x as f64 - centre + 0.5) / stretch)).collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let scaled = v * (1u32 << PRECISION_BITS) as f64;
                    (if scaled < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
                })
                .collect();
            first.push(lo);
            weights.push(fixed);
        }
        Taps { first, weights }
    }

    /// One output value from the source values `at(i)`: rounded, clamped to 8 bits.
    fn apply(&self, out: usize, at: impl Fn(usize) -> u8) -> u8 {
        let mut sum: i32 = 1 << (PRECISION_BITS - 1);
        for (i, w) in self.weights[out].iter().enumerate() {
            sum += at(self.first[out] + i) as i32 * w;
        }
        (sum >> PRECISION_BITS).clamp(0, 255) as u8
    }
}

/// `img` resized to `height` x `width` as Pillow resizes it: each axis whose
/// size changes is resampled, the width first; an image of that size already
/// comes back as it is.
pub fn resize(img: Rgb8, height: usize, width: usize, interpolation: Interpolation) -> Rgb8 {
    let img = match width == img.width {
        true => img,
        false => resize_width(&img, width, interpolation),
    };
    match height == img.height {
        true => img,
        false => resize_height(&img, height, interpolation),
    }
}

/// The horizontal pass: every row resampled to `width`.
fn resize_width(img: &Rgb8, width: usize, interpolation: Interpolation) -> Rgb8 {
    let taps = Taps::new(img.width, width, interpolation);
    let mut data = Vec::with_capacity(img.height * width * 3);
    for row in img.data.chunks_exact(img.width * 3) {
        for x in 0..width {
            for c in 0..3 {
                data.push(taps.apply(x, |i| row[i * 3 + c]));
            }
        }
    }
    Rgb8 {
        height: img.height,
        width,
        data,
    }
}

/// The vertical pass: every column resampled to `height`.
fn resize_height(img: &Rgb8, height: usize, interpolation: Interpolation) -> Rgb8 {
    let taps = Taps::new(img.height, height, interpolation);
    let stride = img.width * 3;
    let mut data = Vec::with_capacity(height * stride);
    for y in 0..height {
        for v in 0..stride {
            data.push(taps.apply(y, |i| img.data[i * stride + v]));
        }
    }
    Rgb8 {
        height,
        width: img.width,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(height: usize, width: usize) -> Rgb8 {
        let data = (0..height * width * 3).map(|i| ((i * 37) % 256) as u8).collect();
        Rgb8 { height, width, data }
    }

    #[test]
    fn the_weights_of_each_output_sum_to_one_in_fixed_point() {
        for interpolation in [Interpolation::Bilinear, Interpolation::Bicubic] {
            for (from, to) in [(64, 128), (460, 256), (101, 128), (3, 7)] {
                let taps = Taps::new(from, to, interpolation);
                for w in &taps.weights {
                    let sum: i64 = w.iter().map(|&v| v as i64).sum();
                    assert!(
                        (sum - (1 << PRECISION_BITS)).abs() <= w.len() as i64,
                        "{from} -> {to}: {sum}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_sizes_are_kept() {
        let flat = Rgb8 {
            height: 10,
            width: 7,
            data: [12u8, 200, 99].repeat(70),
        };
        for interpolation in [Interpolation::Bilinear, Interpolation::Bicubic] {
            let out = resize(flat.clone(), 23, 5, interpolation);
            assert_eq!((out.height, out.width), (23, 5));
            assert_eq!(out.data, [12u8, 200, 99].repeat(23 * 5));
        }
        let g = gradient(8, 4);
        assert_eq!(resize(g.clone(), 8, 4, Interpolation::Bicubic), g);
    }
}
