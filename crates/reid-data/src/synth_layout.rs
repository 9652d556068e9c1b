//! The folder layouts `reid synth` writes: the same identities and cameras, saved
//! as Market-1501, DukeMTMC-reID or MSMT17 (V1) would store them.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::layout::SPLIT_FOLDERS;
use crate::manifest::Split;
use crate::names::{format_dukemtmc, format_market1501, format_msmt17};

/// A dataset layout of the synthetic generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynthLayout {
    /// `bounding_box_train/0002_c1s1_000451_01.jpg`, cameras 1-6.
    #[default]
    Market,
    /// `bounding_box_train/0001_c2_f0046182.jpg`, cameras 1-8.
    Duke,
    /// MSMT17 V1: `train/0000/0000_000_01_0113morning_0015_0.jpg` with the four
    /// list files; cameras 1-15; no distractors or junk.
    Msmt17,
}

impl SynthLayout {
    /// Every layout, for help texts.
    pub const ALL: [SynthLayout; 3] = [SynthLayout::Market, SynthLayout::Duke, SynthLayout::Msmt17];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            SynthLayout::Market => "market",
            SynthLayout::Duke => "duke",
            SynthLayout::Msmt17 => "msmt17",
        }
    }

    /// The `reid index --dataset` that reads this layout.
    pub fn dataset(self) -> &'static str {
        match self {
            SynthLayout::Market => "market1501",
            SynthLayout::Duke => "dukemtmc-reid",
            SynthLayout::Msmt17 => "msmt17",
        }
    }

    /// The most cameras the layout's names encode.
    pub fn max_cameras(self) -> usize {
        match self {
            SynthLayout::Market => 6,
            SynthLayout::Duke => 8,
            SynthLayout::Msmt17 => 15,
        }
    }
}

impl fmt::Display for SynthLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SynthLayout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SynthLayout::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown layout '{s}' (expected market, duke or msmt17)"))
    }
}

/// MSMT17's list files.
pub const MSMT17_TRAIN_LIST: &str = "list_train.txt";
pub const MSMT17_VAL_LIST: &str = "list_val.txt";
pub const MSMT17_QUERY_LIST: &str = "list_query.txt";
pub const MSMT17_GALLERY_LIST: &str = "list_gallery.txt";

/// Where one image goes: its path under the root and, for MSMT17, its list line.
pub struct Placed {
    pub relative_path: String,
    /// (list file, `<path> <pid>` line).
    pub listed: Option<(&'static str, String)>,
}

/// Names the images of a synthetic dataset in a layout. Every layout draws one
/// frame step per image from the plan's generator, so the Market-1501 names (and
/// every draw after them) are those of the generator before layouts existed.
pub struct Namer {
    layout: SynthLayout,
    frames: Vec<i64>,
    /// Images so far of each (in train folder, identity), for MSMT17's index field.
    counts: HashMap<(bool, i64), usize>,
}

impl Namer {
    pub fn new(layout: SynthLayout, cameras: usize) -> Self {
        Namer {
            layout,
            frames: vec![0; cameras],
            counts: HashMap::new(),
        }
    }

    /// The next image of identity `pid` in `split` from `camera` (0-based).
    pub fn place<R: Rng>(&mut self, rng: &mut R, split: Split, pid: i64, camera: usize) -> Placed {
        self.frames[camera] += rng.gen_range(1..40);
        let frame = self.frames[camera];
        let cam = camera as i64 + 1;
        let folder = SPLIT_FOLDERS.iter().find(|(s, _)| *s == split).expect("a split").1;
        let (name, listed) = match self.layout {
            SynthLayout::Market => (
                format_market1501(pid, cam, 1 + frame / 200_000, frame % 1_000_000, 1),
                None,
            ),
            SynthLayout::Duke => (format_dukemtmc(pid, cam, frame % 10_000_000), None),
            SynthLayout::Msmt17 => {
                let train = split == Split::Train;
                let index = self.counts.entry((train, pid)).or_default();
                let rel = format!("{pid:04}/{}", format_msmt17(pid, *index, cam, frame % 10_000));
                *index += 1;
                let (folder, list) = match split {
                    Split::Train => ("train", MSMT17_TRAIN_LIST),
                    Split::Query => ("test", MSMT17_QUERY_LIST),
                    Split::Gallery => ("test", MSMT17_GALLERY_LIST),
                };
                return Placed {
                    relative_path: format!("{folder}/{rel}"),
                    listed: Some((list, format!("{rel} {pid}"))),
                };
            }
        };
        Placed {
            relative_path: format!("{folder}/{name}"),
            listed,
        }
    }
}
