//! The network's input convention, recorded in checkpoints, galleries and ONNX
//! files: the input size and the filter images are resized with.

use serde::{Deserialize, Serialize};

/// The resize filter: Pillow's, as torchvision's `Resize` uses it on PIL images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// torchreid's and BoT's default (and what files without a record mean).
    #[default]
    Bilinear,
    /// fast-reid's default.
    Bicubic,
}

impl Interpolation {
    /// The name in configs and file metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Interpolation::Bilinear => "bilinear",
            Interpolation::Bicubic => "bicubic",
        }
    }
}

impl std::str::FromStr for Interpolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bilinear" => Ok(Interpolation::Bilinear),
            "bicubic" => Ok(Interpolation::Bicubic),
            other => Err(format!("unknown interpolation '{other}' (bilinear or bicubic)")),
        }
    }
}

impl std::fmt::Display for Interpolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The network's input: its size and how images are resized to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InputSpec {
    pub height: usize,
    pub width: usize,
    pub interpolation: Interpolation,
}

impl InputSpec {
    /// `height` x `width`, resized bilinearly.
    pub fn bilinear(height: usize, width: usize) -> Self {
        InputSpec {
            height,
            width,
            interpolation: Interpolation::Bilinear,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_names_round_trip() {
        for i in [Interpolation::Bilinear, Interpolation::Bicubic] {
            assert_eq!(i.as_str().parse::<Interpolation>().unwrap(), i);
            assert_eq!(i.to_string(), i.as_str());
        }
        assert!("nearest".parse::<Interpolation>().is_err());
    }
}
