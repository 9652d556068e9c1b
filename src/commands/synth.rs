//! `reid synth`: render a synthetic pedestrian dataset in the layout of
//! Market-1501, DukeMTMC-reID or MSMT17.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use reid_data::synth::ensure;
use reid_data::synth::SynthLayout;
use reid_data::SynthConfig;

use crate::progress;

#[derive(Clone, Copy, ValueEnum)]
pub enum Preset {
    /// Small: a demo that trains in minutes on 2 CPU cores.
    Demo,
    /// Market-1501's real split sizes (12,936 train / 3,368 query / 19,732 gallery).
    Market,
    /// MSMT17's real split sizes (32,621 train / 11,659 query / 82,161 gallery, 15 cameras);
    /// implies --layout msmt17.
    Msmt17,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output folder (must not exist, unless it holds the same synthetic dataset).
    #[arg(long, default_value = "data/synthetic")]
    pub out: PathBuf,
    /// Random seed; the same seed gives byte-identical files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Size preset; the flags below override single sizes.
    #[arg(long, value_enum, default_value = "demo")]
    pub preset: Preset,
    /// Folder layout and file names: market (Market-1501), duke (DukeMTMC-reID) or
    /// msmt17 (MSMT17 V1 with its list files; no distractors or junk by default)
    /// [default: msmt17 for --preset msmt17, else market].
    #[arg(long)]
    pub layout: Option<SynthLayout>,
    #[arg(long)]
    pub cameras: Option<usize>,
    #[arg(long)]
    pub train_ids: Option<usize>,
    #[arg(long)]
    pub train_images: Option<usize>,
    #[arg(long)]
    pub test_ids: Option<usize>,
    /// Query images (one per test identity per camera it appears in).
    #[arg(long)]
    pub query_images: Option<usize>,
    /// Gallery images of test identities.
    #[arg(long)]
    pub gallery_images: Option<usize>,
    /// Distractor images (identity 0000).
    #[arg(long)]
    pub distractors: Option<usize>,
    /// Junk images (identity -1).
    #[arg(long)]
    pub junk: Option<usize>,
}

impl SynthArgs {
    /// The generator settings these flags ask for.
    pub fn config(&self) -> SynthConfig {
        let mut cfg = match self.preset {
            Preset::Demo => SynthConfig::demo(self.seed),
            Preset::Market => SynthConfig::market(self.seed),
            Preset::Msmt17 => SynthConfig::msmt17(self.seed),
        };
        if let Some(layout) = self.layout {
            cfg.layout = layout;
        }
        if cfg.layout == SynthLayout::Msmt17 {
            // MSMT17 has neither; the flags below may still ask for them (and fail).
            (cfg.distractors, cfg.junk) = (0, 0);
        }
        let set = |field: &mut usize, value: Option<usize>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        set(&mut cfg.cameras, self.cameras);
        set(&mut cfg.train_ids, self.train_ids);
        set(&mut cfg.train_images, self.train_images);
        set(&mut cfg.test_ids, self.test_ids);
        set(&mut cfg.query_images, self.query_images);
        set(&mut cfg.gallery_images, self.gallery_images);
        set(&mut cfg.distractors, self.distractors);
        set(&mut cfg.junk, self.junk);
        cfg
    }
}

pub fn run(args: SynthArgs) -> Result<()> {
    let cfg = args.config();
    let started = std::time::Instant::now();
    let bar = progress::bar(cfg.total_images() as u64, "rendering");
    let generated = ensure(&cfg, &args.out, &|n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    if generated {
        println!(
            "wrote {} images ({} train ids, {} test ids, {} cameras) to {} in {:.1?}",
            cfg.total_images(),
            cfg.train_ids,
            cfg.test_ids,
            cfg.cameras,
            args.out.display(),
            started.elapsed()
        );
    } else {
        println!(
            "{} already holds this synthetic dataset; nothing to do",
            args.out.display()
        );
    }
    println!(
        "next: reid index --dataset {} --root {}",
        cfg.layout.dataset(),
        args.out.display()
    );
    Ok(())
}
