//! `reid search`: embed query images and list (and draw) their nearest gallery
//! entries.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use reid_eval::report::{draw_ranked, RankedRow};
use reid_extract::{search, SearchResult};
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
fn pid_from_name(path: &Path) -> Option<i64> {
    let name = path.file_name()?.to_str()?;
    reid_data::names::parse_market1501(name)
        .or_else(|| reid_data::names::parse_dukemtmc(name))
        .map(|p| p.pid)
}

/// Prints each query's matches as a table.
fn print_matches(images: &[PathBuf], found: &SearchResult) {
    let g = &found.gallery;
    for (image, matches) in images.iter().zip(&found.matches) {
        let pid = pid_from_name(image).map(|p| format!(" (pid {p})")).unwrap_or_default();
        println!("{}{pid}", image.display());
        println!("  {:>4}  {:>8}  {:>5}  {:>3}  path", "rank", "distance", "pid", "cam");
        for (rank, (row, d)) in matches.iter().enumerate() {
            let path = g.meta.paths.as_ref().map_or("-", |p| p[*row].as_str());
            println!(
                "  {:>4}  {d:>8.4}  {:>5}  {:>3}  {path}",
                rank + 1,
                g.pids[*row],
                g.camids[*row]
            );
        }
    }
}

pub fn run(args: SearchArgs) -> Result<()> {
    let found = search(
        &args.gallery,
        &args.checkpoint,
        &args.images,
        args.top,
        &args.device.open()?,
    )?;
    print_matches(&args.images, &found);
    let Some(out) = &args.draw else { return Ok(()) };
    let g = &found.gallery;
    let Some(paths) = &g.meta.paths else {
        bail!("{} records no image paths to draw", args.gallery.display());
    };
    let root = args
        .data_root
        .clone()
        .or_else(|| g.meta.data_root.as_ref().map(PathBuf::from))
        .unwrap_or_default();
    let rows: Vec<RankedRow> = args
        .images
        .iter()
        .zip(&found.matches)
        .map(|(image, matches)| RankedRow {
            query: image.clone(),
            matches: matches
                .iter()
                .map(|(row, _)| (root.join(&paths[*row]), Some(g.pids[*row]) == pid_from_name(image)))
                .collect(),
        })
        .collect();
    draw_ranked(out, &rows)?;
    println!("drew {}", out.display());
    Ok(())
}
