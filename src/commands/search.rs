//! `reid search`: embed query images and list (and draw) their nearest gallery
//! entries.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use reid_data::gallery::Gallery;
use reid_eval::report::{draw_ranked, RankedRow};
use reid_extract::{nearest, ExtractOptions, Extractor};
use reid_model::DeviceSpec;

#[derive(Args)]
pub struct SearchArgs {
    /// Gallery features written by `reid extract`.
    #[arg(long)]
    pub gallery: PathBuf,
    /// The checkpoint the gallery was extracted with.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Query images.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Matches listed per query.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Draw the query and its matches as a strip into this PNG (green frame: same
    /// identity as the query's file name says, red: another).
    #[arg(long)]
    pub draw: Option<PathBuf>,
    /// Dataset root of the gallery's image paths [default: recorded in the gallery].
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

/// The identity in a Market-1501 or DukeMTMC-reID file name, if it has one.
fn pid_from_name(path: &std::path::Path) -> Option<i64> {
    let name = path.file_name()?.to_str()?;
    reid_data::names::parse_market1501(name)
        .or_else(|| reid_data::names::parse_dukemtmc(name))
        .map(|p| p.pid)
}

pub fn run(args: SearchArgs) -> Result<()> {
    let gallery = Gallery::read(&args.gallery).with_context(|| format!("reading {}", args.gallery.display()))?;
    let checkpoint_sha = reid_data::gallery::sha256_file(&args.checkpoint)?;
    if gallery
        .meta
        .checkpoint_sha256
        .as_deref()
        .is_some_and(|g| g != checkpoint_sha)
    {
        bail!(
            "{} was extracted with another checkpoint than {}; search with the checkpoint that made it",
            args.gallery.display(),
            args.checkpoint.display()
        );
    }
    let device = args.device.open()?;
    let extractor = Extractor::load(&args.checkpoint, &device)?;
    let options = ExtractOptions {
        batch_size: 32,
        flip: gallery.meta.flip.unwrap_or(false),
        normalize: true,
    };
    let features = extractor.embed_files(&args.images, &options, &|_| {})?;
    let dim = gallery.dim;
    let paths = gallery.meta.paths.clone();
    let root = args
        .data_root
        .clone()
        .or_else(|| gallery.meta.data_root.as_ref().map(PathBuf::from))
        .unwrap_or_default();
    let mut rows = Vec::new();
    for (i, image) in args.images.iter().enumerate() {
        let query_pid = pid_from_name(image);
        println!(
            "{}{}",
            image.display(),
            query_pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        );
        println!("  {:>4}  {:>8}  {:>5}  {:>3}  path", "rank", "distance", "pid", "cam");
        let found = nearest(&gallery, &features[i * dim..(i + 1) * dim], args.top);
        for (rank, (g, d)) in found.iter().enumerate() {
            let path = paths.as_ref().map(|p| p[*g].as_str()).unwrap_or("-");
            println!(
                "  {:>4}  {:>8.4}  {:>5}  {:>3}  {path}",
                rank + 1,
                d,
                gallery.pids[*g],
                gallery.camids[*g]
            );
        }
        if args.draw.is_some() {
            let Some(paths) = &paths else {
                bail!("{} records no image paths to draw", args.gallery.display());
            };
            rows.push(RankedRow {
                query: image.clone(),
                matches: found
                    .iter()
                    .map(|(g, _)| (root.join(&paths[*g]), Some(gallery.pids[*g]) == query_pid))
                    .collect(),
            });
        }
    }
    if let Some(out) = &args.draw {
        draw_ranked(out, &rows)?;
        println!("drew {}", out.display());
    }
    Ok(())
}
