//! The backbone architectures: Res2Net and ResNet variants as timm defines them.

use std::fmt;
use std::str::FromStr;

/// Which residual block a backbone stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// timm's `Bottle2neck`: `scale` groups of `base_width`-scaled 3x3 convolutions.
    Res2Net { scale: usize, base_width: usize },
    /// timm/torchvision's `Bottleneck`.
    ResNet,
}

/// A named backbone: block type, blocks per stage and stage widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    pub name: &'static str,
    pub block: BlockKind,
    /// Blocks in layer1..layer4.
    pub layers: [usize; 4],
    /// Planes p of layer1..layer4; a block outputs 4p channels.
    pub planes: [usize; 4],
}

const STAGES: [usize; 4] = [64, 128, 256, 512];

const fn res2net(name: &'static str, layers: [usize; 4], base_width: usize, scale: usize) -> Arch {
    Arch {
        name,
        block: BlockKind::Res2Net { scale, base_width },
        layers,
        planes: STAGES,
    }
}

/// Every architecture `reid` builds.
pub const ARCHS: [Arch; 10] = [
    res2net("res2net50_26w_4s", [3, 4, 6, 3], 26, 4),
    res2net("res2net50_14w_8s", [3, 4, 6, 3], 14, 8),
    res2net("res2net50_26w_6s", [3, 4, 6, 3], 26, 6),
    res2net("res2net50_26w_8s", [3, 4, 6, 3], 26, 8),
    res2net("res2net50_48w_2s", [3, 4, 6, 3], 48, 2),
    res2net("res2net101_26w_4s", [3, 4, 23, 3], 26, 4),
    Arch {
        name: "resnet50",
        block: BlockKind::ResNet,
        layers: [3, 4, 6, 3],
        planes: STAGES,
    },
    Arch {
        name: "resnet101",
        block: BlockKind::ResNet,
        layers: [3, 4, 23, 3],
        planes: STAGES,
    },
    // res2net50_26w_4s in miniature (tests/fixtures/res2net_tiny): 2 blocks per
    // stage, stage widths 8, 16, 32, 64.
    Arch {
        name: "res2net_tiny",
        block: BlockKind::Res2Net {
            scale: 4,
            base_width: 26,
        },
        layers: [2, 2, 2, 2],
        planes: [8, 16, 32, 64],
    },
    // resnet50 in miniature (tests/fixtures/resnet_tiny), as res2net_tiny.
    Arch {
        name: "resnet_tiny",
        block: BlockKind::ResNet,
        layers: [2, 2, 2, 2],
        planes: [8, 16, 32, 64],
    },
];

impl Arch {
    /// Channels of the pooled feature `f` (4 x the last stage's planes).
    pub fn feature_dim(&self) -> usize {
        4 * self.planes[3]
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ARCHS.iter().find(|a| a.name == s).copied().ok_or_else(|| {
            let names: Vec<_> = ARCHS.iter().map(|a| a.name).collect();
            format!("unknown architecture '{s}'; known: {}", names.join(", "))
        })
    }
}

impl serde::Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name)
    }
}

impl<'de> serde::Deserialize<'de> for Arch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
