//! The training augmentations (random crop, horizontal flip, random erasing,
//! colour and scale jitter) on normalised CHW f32 images (see
//! [`crate::preprocess`]); every random draw comes from the caller's RNG.

use std::path::Path;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::preprocess::{IMAGENET_MEAN, IMAGENET_STD};

/// A CHW float image.
#[derive(Debug, Clone, PartialEq)]
pub struct Chw {
    pub height: usize,
    pub width: usize,
    /// `[3, height, width]`, row-major.
    pub data: Vec<f32>,
}

impl Chw {
    /// The value at channel `c`, row `y`, column `x`.
    pub fn at(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }

    /// Mirrors the image left-right.
    pub fn flip_horizontal(&mut self) {
        for row in self.data.chunks_exact_mut(self.width) {
            row.reverse();
        }
    }
}

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DecodeError {
    pub path: std::path::PathBuf,
    pub message: String,
}

/// The message a panic carried.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs `f` on image `path`, turning a panic into an error that names the image.
pub fn guarded<T>(path: &Path, doing: &str, f: impl FnOnce() -> T) -> Result<T, DecodeError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| DecodeError {
        path: path.to_path_buf(),
        message: format!("panicked while {doing}: {}", panic_message(&panic)),
    })
}

/// How random erasing fills the rectangle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EraseFill {
    /// Independent uniform random pixels (Zhong et al.'s default), normalised.
    Random,
    /// The ImageNet mean pixel (0 after normalisation).
    Mean,
}

/// The training augmentation settings; each step can be switched off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Augment {
    /// Zero-pad by this many pixels, then crop back to the input size at a random
    /// offset (0 = no random crop).
    pub crop_padding: usize,
    /// Probability of a horizontal flip.
    pub flip: f64,
    /// Probability of random erasing.
    pub erase: f64,
    /// Erased area as a fraction of the image: [min, max].
    pub erase_area: [f64; 2],
    /// Lower bound of the erased rectangle's aspect ratio (upper bound: its inverse).
    pub erase_min_aspect: f64,
    pub erase_fill: EraseFill,
    /// Colour jitter: each channel's gain drawn from [1 - j, 1 + j] per image
    /// (0 = off). Not part of the paper's recipe; it teaches invariance to camera
    /// colour casts.
    pub color_jitter: f64,
    /// Scale jitter: zoom about the centre by a factor from [1 - s, 1 + s] per
    /// image, bilinear, mean pixel outside (0 = off). Not part of the paper's
    /// recipe; it teaches invariance to the distance from the camera.
    pub scale_jitter: f64,
}

impl Default for Augment {
    /// The paper's recipe: random crop, flip 0.5, erasing 0.5 (area 0.02-0.4,
    /// aspect 0.3-3.33, random fill).
    fn default() -> Self {
        Augment {
            crop_padding: 10,
            flip: 0.5,
            erase: 0.5,
            erase_area: [0.02, 0.4],
            erase_min_aspect: 0.3,
            erase_fill: EraseFill::Random,
            color_jitter: 0.0,
            scale_jitter: 0.0,
        }
    }
}

impl Augment {
    /// No augmentation at all.
    pub fn none() -> Self {
        Augment {
            crop_padding: 0,
            flip: 0.0,
            erase: 0.0,
            ..Augment::default()
        }
    }

    /// Applies colour jitter, scale jitter, crop, flip and erasing, in that order,
    /// to `img`.
    pub fn apply<R: Rng>(&self, img: &mut Chw, rng: &mut R) {
        if self.color_jitter > 0.0 {
            color_jitter(img, self.color_jitter, rng);
        }
        if self.scale_jitter > 0.0 {
            scale_jitter(img, self.scale_jitter, rng);
        }
        if self.crop_padding > 0 {
            random_crop(img, self.crop_padding, rng);
        }
        if self.flip > 0.0 && rng.gen_bool(self.flip.min(1.0)) {
            img.flip_horizontal();
        }
        if self.erase > 0.0 && rng.gen_bool(self.erase.min(1.0)) {
            random_erase(img, self, rng);
        }
    }
}

/// Scales each channel of the (normalised) image by a gain from [1 - j, 1 + j],
/// as if the pixels were: `x' = x * g + mean * (g - 1) / std`.
pub fn color_jitter<R: Rng>(img: &mut Chw, j: f64, rng: &mut R) -> [f32; 3] {
    let plane = img.height * img.width;
    let mut gains = [1.0f32; 3];
    for (c, gain) in gains.iter_mut().enumerate() {
        *gain = rng.gen_range(1.0 - j..=1.0 + j) as f32;
        let shift = IMAGENET_MEAN[c] * (*gain - 1.0) / IMAGENET_STD[c];
        for v in &mut img.data[c * plane..(c + 1) * plane] {
            *v = *v * *gain + shift;
        }
    }
    gains
}

/// Zooms `img` about its centre by a factor drawn from [1 - s, 1 + s] (bilinear;
/// outside the source the mean pixel, 0 after normalisation). Returns the factor.
pub fn scale_jitter<R: Rng>(img: &mut Chw, s: f64, rng: &mut R) -> f32 {
    let factor = rng.gen_range(1.0 - s..=1.0 + s) as f32;
    let (h, w) = (img.height, img.width);
    let (cy, cx) = ((h as f32 - 1.0) / 2.0, (w as f32 - 1.0) / 2.0);
    let src = img.data.clone();
    let sample = |c: usize, y: isize, x: isize| -> f32 {
        if y < 0 || x < 0 || y as usize >= h || x as usize >= w {
            0.0
        } else {
            src[(c * h + y as usize) * w + x as usize]
        }
    };
    for y in 0..h {
        let sy = (y as f32 - cy) / factor + cy;
        let (y0, fy) = (sy.floor(), sy - sy.floor());
        for x in 0..w {
            let sx = (x as f32 - cx) / factor + cx;
            let (x0, fx) = (sx.floor(), sx - sx.floor());
            let (y0, x0) = (y0 as isize, x0 as isize);
            for c in 0..3 {
                let top = sample(c, y0, x0) * (1.0 - fx) + sample(c, y0, x0 + 1) * fx;
                let bottom = sample(c, y0 + 1, x0) * (1.0 - fx) + sample(c, y0 + 1, x0 + 1) * fx;
                img.data[(c * h + y) * w + x] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
    factor
}

/// Zero-pads `img` by `pad` on every side (zero after normalisation is the mean
/// pixel) and crops a window of the original size at a uniform random offset.
pub fn random_crop<R: Rng>(img: &mut Chw, pad: usize, rng: &mut R) -> (isize, isize) {
    let (h, w) = (img.height, img.width);
    let dy = rng.gen_range(0..=2 * pad) as isize - pad as isize;
    let dx = rng.gen_range(0..=2 * pad) as isize - pad as isize;
    let src = img.data.clone();
    for c in 0..3 {
        for y in 0..h {
            let sy = y as isize + dy;
            for x in 0..w {
                let sx = x as isize + dx;
                let inside = sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w;
                img.data[(c * h + y) * w + x] = if inside {
                    src[(c * h + sy as usize) * w + sx as usize]
                } else {
                    0.0
                };
            }
        }
    }
    (dy, dx)
}

/// The rectangle random erasing chose: top, left, height, width.
pub type EraseBox = (usize, usize, usize, usize);

/// Random erasing (Zhong et al. 2020): up to 100 tries to place a rectangle of
/// random area and aspect ratio inside the image; fills it. Returns the box.
pub fn random_erase<R: Rng>(img: &mut Chw, cfg: &Augment, rng: &mut R) -> Option<EraseBox> {
    let (h, w) = (img.height, img.width);
    let area = (h * w) as f64;
    for _ in 0..100 {
        let target = rng.gen_range(cfg.erase_area[0]..=cfg.erase_area[1]) * area;
        let log_lo = cfg.erase_min_aspect.ln();
        let aspect = rng.gen_range(log_lo..=-log_lo).exp();
        let eh = (target * aspect).sqrt().round() as usize;
        let ew = (target / aspect).sqrt().round() as usize;
        if eh == 0 || ew == 0 || eh >= h || ew >= w {
            continue;
        }
        let top = rng.gen_range(0..=h - eh);
        let left = rng.gen_range(0..=w - ew);
        for c in 0..3 {
            for y in top..top + eh {
                for x in left..left + ew {
                    img.data[(c * h + y) * w + x] = match cfg.erase_fill {
                        EraseFill::Random => (rng.gen::<f32>() - IMAGENET_MEAN[c]) / IMAGENET_STD[c],
                        EraseFill::Mean => 0.0,
                    };
                }
            }
        }
        return Some((top, left, eh, ew));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn ramp(h: usize, w: usize) -> Chw {
        Chw {
            height: h,
            width: w,
            data: (0..3 * h * w).map(|i| i as f32 + 1.0).collect(),
        }
    }

    #[test]
    fn a_flip_flips_and_twice_restores() {
        let mut img = ramp(4, 5);
        let orig = img.clone();
        img.flip_horizontal();
        for c in 0..3 {
            for y in 0..4 {
                for x in 0..5 {
                    assert_eq!(img.at(c, y, x), orig.at(c, y, 4 - x));
                }
            }
        }
        img.flip_horizontal();
        assert_eq!(img, orig);
    }

    #[test]
    fn the_crop_shifts_content_and_stays_in_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let mut img = ramp(16, 8);
            let orig = img.clone();
            let (dy, dx) = random_crop(&mut img, 3, &mut rng);
            assert!(dy.abs() <= 3 && dx.abs() <= 3);
            assert_eq!(img.data.len(), orig.data.len());
            for y in 0..16isize {
                for x in 0..8isize {
                    let (sy, sx) = (y + dy, x + dx);
                    let want = if (0..16).contains(&sy) && (0..8).contains(&sx) {
                        orig.at(1, sy as usize, sx as usize)
                    } else {
                        0.0
                    };
                    assert_eq!(img.at(1, y as usize, x as usize), want);
                }
            }
        }
    }

    #[test]
    fn erasing_rate_area_and_aspect_stay_in_range() {
        let cfg = Augment {
            crop_padding: 0,
            flip: 0.0,
            erase: 0.5,
            ..Augment::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (trials, mut erased) = (4000, 0);
        for _ in 0..trials {
            let mut img = ramp(64, 32);
            let orig = img.clone();
            cfg.apply(&mut img, &mut rng);
            if img != orig {
                erased += 1;
            }
        }
        // Binomial(4000, 0.5): sd 31.6; 5 sd either side.
        assert!((erased as f64 - 2000.0).abs() < 160.0, "{erased}");

        for _ in 0..2000 {
            let mut img = ramp(64, 32);
            let (top, left, eh, ew) = random_erase(&mut img, &cfg, &mut rng).unwrap();
            assert!(top + eh <= 64 && left + ew <= 32);
            let frac = (eh * ew) as f64 / (64.0 * 32.0);
            // Rounding to whole pixels moves the area a little past the bounds.
            assert!((0.015..=0.45).contains(&frac), "{frac}");
            let aspect = eh as f64 / ew as f64;
            assert!((0.25..=4.0).contains(&aspect), "{aspect}");
            // Inside the box the pixels changed; outside they did not.
            assert_ne!(img.at(0, top, left), ramp(64, 32).at(0, top, left));
            if top > 0 {
                assert_eq!(img.at(0, top - 1, left), ramp(64, 32).at(0, top - 1, left));
            }
        }
    }

    #[test]
    fn colour_jitter_scales_pixel_values_per_channel() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut img = ramp(2, 2);
        let before = img.clone();
        let gains = color_jitter(&mut img, 0.2, &mut rng);
        for (c, g) in gains.iter().enumerate() {
            assert!((0.8..=1.2).contains(g));
            let pixel = |x: f32| x * IMAGENET_STD[c] + IMAGENET_MEAN[c];
            let (a, b) = (pixel(before.at(c, 1, 1)), pixel(img.at(c, 1, 1)));
            assert!((b - a * g).abs() < 1e-3, "channel {c}: {a} * {g} != {b}");
        }
    }

    #[test]
    fn scale_jitter_zooms_about_the_centre() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for _ in 0..50 {
            // A bright 4x2 block in the middle of a 16x8 image grows or shrinks with
            // the factor and stays centred.
            let mut img = Chw {
                height: 16,
                width: 8,
                data: vec![0.0; 3 * 16 * 8],
            };
            for c in 0..3 {
                for y in 6..10 {
                    for x in 3..5 {
                        img.data[(c * 16 + y) * 8 + x] = 1.0;
                    }
                }
            }
            let factor = scale_jitter(&mut img, 0.3, &mut rng);
            assert!((0.7..=1.3).contains(&factor));
            let mass: f32 = img.data[..16 * 8].iter().sum();
            assert!((mass / 8.0 - factor * factor).abs() < 0.35, "{mass} vs {factor}");
            assert!((img.at(0, 7, 3) - img.at(0, 8, 4)).abs() < 1e-5, "not centred");
            assert_eq!(img.at(0, 0, 0), 0.0);
        }
        let mut img = ramp(6, 4);
        let before = img.clone();
        assert_eq!(scale_jitter(&mut img, 0.0, &mut rng), 1.0);
        assert_eq!(img, before);
    }
}
