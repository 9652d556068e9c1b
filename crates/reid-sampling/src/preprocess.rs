//! From an image file to the network's input, as PyTorch's re-ID toolkits make
//! it (torchreid, BoT and fast-reid: PIL decode, torchvision `Resize((H, W))`,
//! `ToTensor`, `Normalize`), so that a model trained in PyTorch sees the same
//! pixels here and a model trained here sees the same pixels in PyTorch.
//!
//! - JPEG is decoded by libjpeg-turbo's decoder (mozjpeg's, built from source
//!   with the C compiler: no system library), as PIL does: accurate integer
//!   IDCT and fancy upsampling. Other formats go through the `image` crate
//!   (lossless formats decode to the same pixels everywhere).
//! - The resize is Pillow's convolution, reproduced with its fixed-point
//!   roundings ([`crate::resize`]): antialiased when shrinking, bilinear or
//!   bicubic.
//! - `ToTensor` and `Normalize`: `(p / 255 - mean) / std` in f32, in that order.
//!
//! Training, `reid extract`, `reid search` and `reid demo` all load images
//! through [`load_normalized`].

use std::path::Path;

pub use reid_io::input::{InputSpec, Interpolation};

use crate::resize::resize;
use crate::transform::{guarded, Chw, DecodeError};

/// ImageNet channel means and standard deviations (RGB, on [0, 1] pixels).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// An 8-bit RGB image, row-major, 3 values a pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub height: usize,
    pub width: usize,
    pub data: Vec<u8>,
}

/// Decodes an image file's bytes to 8-bit RGB (`path` names it in errors).
pub fn decode_rgb(path: &Path, bytes: &[u8]) -> Result<Rgb8, DecodeError> {
    let bad = |message: String| DecodeError {
        path: path.to_path_buf(),
        message,
    };
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return guarded(path, "decoding", || decode_jpeg(bytes))?.map_err(|e| bad(format!("cannot decode JPEG: {e}")));
    }
    let img = guarded(path, "decoding", || image::load_from_memory(bytes))?
        .map_err(|e| bad(format!("cannot decode image: {e}")))?
        .to_rgb8();
    let (width, height) = (img.width() as usize, img.height() as usize);
    Ok(Rgb8 {
        height,
        width,
        data: img.into_raw(),
    })
}

/// libjpeg-turbo's decoding, with its defaults (as PIL's): accurate integer
/// IDCT, fancy upsampling; grey and CMYK files converted to RGB by the library.
fn decode_jpeg(bytes: &[u8]) -> std::io::Result<Rgb8> {
    let mut started = mozjpeg::Decompress::new_mem(bytes)?.rgb()?;
    let (width, height) = (started.width(), started.height());
    let data: Vec<u8> = started.read_scanlines()?;
    started.finish()?;
    if data.len() != width * height * 3 {
        return Err(std::io::Error::other("the file ends before its last row"));
    }
    Ok(Rgb8 { height, width, data })
}

/// `ToTensor` then `Normalize` with ImageNet's statistics: a CHW f32 image.
pub fn normalize(img: &Rgb8) -> Chw {
    let plane = img.height * img.width;
    let mut data = vec![0f32; 3 * plane];
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (p[c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    Chw {
        height: img.height,
        width: img.width,
        data,
    }
}

/// Reads `path`, decodes it, resizes it to `spec` and normalises it: the
/// evaluation transform, and the start of the training one.
pub fn load_normalized(path: &Path, spec: InputSpec) -> Result<Chw, DecodeError> {
    let bytes = std::fs::read(path).map_err(|e| DecodeError {
        path: path.to_path_buf(),
        message: format!("cannot read image: {e}"),
    })?;
    let img = decode_rgb(path, &bytes)?;
    if img.height == 0 || img.width == 0 {
        return Err(DecodeError {
            path: path.to_path_buf(),
            message: "the image has no pixels".into(),
        });
    }
    Ok(normalize(&resize(img, spec.height, spec.width, spec.interpolation)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(height: usize, width: usize) -> InputSpec {
        InputSpec {
            height,
            width,
            interpolation: Interpolation::Bilinear,
        }
    }

    #[test]
    fn decoding_resizes_and_normalises() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("red.png");
        image::RgbImage::from_pixel(6, 12, image::Rgb([255, 0, 0]))
            .save(&path)
            .unwrap();
        let img = load_normalized(&path, spec(24, 12)).unwrap();
        assert_eq!((img.height, img.width, img.data.len()), (24, 12, 3 * 24 * 12));
        assert!((img.at(0, 5, 5) - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        assert!((img.at(1, 5, 5) - (0.0 - 0.456) / 0.224).abs() < 1e-5);
        let err = load_normalized(&dir.path().join("missing.jpg"), spec(8, 4))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.jpg"));
    }

    #[test]
    fn a_broken_jpeg_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.jpg");
        let mut bytes = Vec::new();
        image::RgbImage::from_pixel(16, 32, image::Rgb([10, 200, 30]))
            .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Jpeg)
            .unwrap();
        std::fs::write(&path, &bytes[..40]).unwrap();
        let err = load_normalized(&path, spec(8, 4)).unwrap_err().to_string();
        assert!(err.contains("cut.jpg") && err.contains("JPEG"), "{err}");
    }
}
