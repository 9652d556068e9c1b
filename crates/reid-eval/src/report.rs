//! Pictures and the HTML report of an evaluation: the CMC curve(s), ranked lists
//! framed green/red as in the paper's Figs 5-6, training curves from a run's
//! `metrics.csv`, and `report.html` tying them together.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::evaluate::Metrics;

/// Why a picture or the report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("drawing {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

fn draw_err(path: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

static FONT: Once = Once::new();
const FONT_NAME: &str = "sans-serif";

/// Registers the bundled DejaVu Sans, so text renders on machines without fonts.
fn ensure_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        if plotters::style::register_font(FONT_NAME, FontStyle::Normal, bytes).is_err() {
            panic!("the bundled font does not parse");
        }
    });
}

/// The drawing area of a picture being rendered in memory.
type Canvas<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Renders a `size` picture with `draw` in memory and writes it to `path` as PNG,
/// atomically: a crash never leaves a half-drawn file.
fn render_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Canvas) -> Result<(), ReportError>,
) -> Result<(), ReportError> {
    let mut pixels = vec![255u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        draw(&root)?;
        root.present().map_err(|e| draw_err(path, e))?;
    }
    let img = image::RgbImage::from_raw(size.0, size.1, pixels).ok_or_else(|| draw_err(path, "bad pixel buffer"))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| draw_err(path, e))?;
    reid_io::atomic::write_bytes_atomically(path, &png).map_err(|e| ReportError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// One CMC curve with its headline figures.
#[derive(Debug, Clone)]
pub struct CurveSeries {
    pub label: String,
    /// CMC at ranks 1..=len, fractions.
    pub cmc: Vec<f64>,
    pub rank1: f64,
    pub map: f64,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws CMC curves (rank 1..N against matching rate) into a PNG.
pub fn draw_cmc(path: &Path, series: &[CurveSeries]) -> Result<(), ReportError> {
    ensure_font();
    render_png(path, (800, 560), |root| {
        root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
        let max_rank = series.iter().map(|s| s.cmc.len()).max().unwrap_or(1).max(2);
        let low = series
            .iter()
            .flat_map(|s| s.cmc.first().copied())
            .fold(1.0f64, f64::min);
        let y0 = ((low * 10.0).floor() / 10.0 - 0.05).clamp(0.0, 0.9);
        let mut chart = ChartBuilder::on(root)
            .caption("CMC", (FONT_NAME, 26))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(1f64..max_rank as f64, y0 * 100.0..100.5)
            .map_err(|e| draw_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("rank")
            .y_desc("matching rate (%)")
            .label_style((FONT_NAME, 15))
            .draw()
            .map_err(|e| draw_err(path, e))?;
        for (i, s) in series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let points = s.cmc.iter().enumerate().map(|(r, v)| ((r + 1) as f64, 100.0 * v));
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(|e| draw_err(path, e))?
                .label(format!(
                    "{}: rank-1 {:.2}%, mAP {:.2}%",
                    s.label,
                    100.0 * s.rank1,
                    100.0 * s.map
                ))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT_NAME, 16))
            .draw()
            .map_err(|e| draw_err(path, e))?;
        Ok(())
    })
}

/// One row of a ranked-list picture: a query and its best matches.
#[derive(Debug, Clone)]
pub struct RankedRow {
    pub query: PathBuf,
    /// (image, whether it shows the query's identity), best first.
    pub matches: Vec<(PathBuf, bool)>,
}

const CELL: (u32, u32) = (64, 128);
const FRAME: u32 = 4;
const GAP: u32 = 8;

fn load_cell(path: &Path) -> Result<Vec<u8>, ReportError> {
    let img = image::open(path).map_err(|e| ReportError::File {
        path: path.to_path_buf(),
        message: format!("cannot decode image: {e}; pass --data-root to point at the dataset"),
    })?;
    let img = img
        .resize_exact(CELL.0, CELL.1, image::imageops::FilterType::Triangle)
        .to_rgb8();
    Ok(img.into_raw())
}

/// Draws each query followed by its matches, framed green when the match shows
/// the query's identity and red otherwise (the paper's Figs 5-6).
pub fn draw_ranked(path: &Path, rows: &[RankedRow]) -> Result<(), ReportError> {
    ensure_font();
    let columns = 1 + rows.iter().map(|r| r.matches.len()).max().unwrap_or(0) as u32;
    let step = CELL.0 + 2 * FRAME + GAP;
    let row_h = CELL.1 + 2 * FRAME + GAP + 18;
    let size = (GAP + columns * step + GAP, GAP + rows.len().max(1) as u32 * row_h);
    render_png(path, size, |root| {
        root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
        for (r, row) in rows.iter().enumerate() {
            let y = (GAP + r as u32 * row_h + 18) as i32;
            let mut cells = vec![(row.query.clone(), None)];
            cells.extend(row.matches.iter().map(|(p, ok)| (p.clone(), Some(*ok))));
            for (c, (img, correct)) in cells.iter().enumerate() {
                let x = (GAP + c as u32 * step + if c > 0 { GAP } else { 0 }) as i32;
                let label = if c == 0 { "query".to_string() } else { format!("#{c}") };
                root.draw(&Text::new(label, (x + FRAME as i32, y - 16), (FONT_NAME, 13)))
                    .map_err(|e| draw_err(path, e))?;
                let colour = match correct {
                    None => RGBColor(60, 60, 60),
                    Some(true) => RGBColor(20, 170, 40),
                    Some(false) => RGBColor(220, 30, 30),
                };
                let frame = [
                    (x, y),
                    (x + (CELL.0 + 2 * FRAME) as i32, y + (CELL.1 + 2 * FRAME) as i32),
                ];
                root.draw(&Rectangle::new(frame, colour.filled()))
                    .map_err(|e| draw_err(path, e))?;
                let pixels = load_cell(img)?;
                let element = BitMapElement::with_owned_buffer((x + FRAME as i32, y + FRAME as i32), CELL, pixels)
                    .ok_or_else(|| draw_err(path, "bad image buffer"))?;
                root.draw(&element).map_err(|e| draw_err(path, e))?;
            }
        }
        Ok(())
    })
}

/// One row of a run's `metrics.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub kind: String,
    pub epoch: usize,
    pub step: u64,
    pub loss: f64,
    pub loss_id: f64,
    pub loss_verif: f64,
    /// The triplet term (0 in logs without one).
    pub loss_triplet: f64,
    pub id_acc: f64,
    pub verif_acc: f64,
    pub rank1: Option<f64>,
    /// Backbone gradient norms of (id1 + id2, verif, triplet, total), when logged.
    pub grad_norms: Option<[f64; 4]>,
}

/// Reads a run's `metrics.csv` (its format: `reid_data::metrics_csv`) as the
/// curves draw it.
pub fn read_training_log(path: &Path) -> Result<Vec<LogRow>, ReportError> {
    let rows = reid_data::metrics_csv::read(path).map_err(|e| ReportError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(rows.iter().map(LogRow::from).collect())
}

impl From<&reid_data::metrics_csv::MetricsRow> for LogRow {
    fn from(r: &reid_data::metrics_csv::MetricsRow) -> Self {
        let l = &r.losses;
        LogRow {
            kind: r.kind.clone(),
            epoch: r.epoch,
            step: r.step,
            loss: l.total,
            loss_id: (l.id1 + l.id2) / 2.0,
            loss_verif: l.verif,
            loss_triplet: l.triplet,
            id_acc: r.id_acc,
            verif_acc: r.verif_acc,
            rank1: r.validation.map(|(r1, _)| r1),
            grad_norms: r
                .grad_norms
                .map(|[a, b, v, t, all]| [(a * a + b * b).sqrt(), v, t, all]),
        }
    }
}

/// Reads one value out of a log row.
type LogField = fn(&LogRow) -> f64;

/// One chart of the training-curves picture.
struct Panel {
    caption: &'static str,
    max_step: f64,
    y_max: f64,
    /// Index into [`PALETTE`] of the first series.
    first_colour: usize,
    legend: SeriesLabelPosition,
}

/// Draws `series` of `rows` against the step into `area`.
fn draw_panel(
    path: &Path,
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    panel: &Panel,
    rows: &[&LogRow],
    series: &[(&str, LogField)],
) -> Result<(), ReportError> {
    let mut chart = ChartBuilder::on(area)
        .caption(panel.caption, (FONT_NAME, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..panel.max_step, 0f64..panel.y_max)
        .map_err(|e| draw_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style((FONT_NAME, 13))
        .draw()
        .map_err(|e| draw_err(path, e))?;
    for (i, (name, f)) in series.iter().enumerate() {
        let colour = PALETTE[(panel.first_colour + i) % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                rows.iter().map(|r| (r.step as f64, f(r))),
                colour.stroke_width(2),
            ))
            .map_err(|e| draw_err(path, e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(panel.legend.clone())
        .background_style(WHITE.mix(0.9))
        .label_font((FONT_NAME, 13))
        .draw()
        .map_err(|e| draw_err(path, e))
}

/// Draws losses and accuracies over training steps from `metrics.csv` rows, and
/// the backbone gradient norm of each loss when the run logged them
/// (`run.log_grad_norms`).
pub fn draw_training_curves(path: &Path, log: &[LogRow]) -> Result<(), ReportError> {
    ensure_font();
    let steps: Vec<&LogRow> = log.iter().filter(|r| r.kind == "step").collect();
    let rows = if steps.is_empty() { log.iter().collect() } else { steps };
    let normed: Vec<&LogRow> = rows.iter().copied().filter(|r| r.grad_norms.is_some()).collect();
    let width = if normed.is_empty() { 1000 } else { 1500 };
    render_png(path, (width, 420), |root| {
        root.fill(&WHITE).map_err(|e| draw_err(path, e))?;
        let areas = root.split_evenly((1, width as usize / 500));
        let max_step = rows.iter().map(|r| r.step).max().unwrap_or(1).max(1) as f64;
        let max_loss = rows.iter().map(|r| r.loss.max(r.loss_id)).fold(0.1, f64::max) * 1.05;
        let mut losses: Vec<(&str, LogField)> = vec![
            ("total", |r| r.loss),
            ("identification", |r| r.loss_id),
            ("verification", |r| r.loss_verif),
        ];
        if rows.iter().any(|r| r.loss_triplet != 0.0) {
            losses.push(("triplet", |r| r.loss_triplet));
        }
        let panel = |caption, y_max, first_colour, legend| Panel {
            caption,
            max_step,
            y_max,
            first_colour,
            legend,
        };
        draw_panel(
            path,
            &areas[0],
            &panel("losses", max_loss, 0, SeriesLabelPosition::UpperRight),
            &rows,
            &losses,
        )?;
        let accuracies: [(&str, LogField); 2] = [
            ("identification", |r| 100.0 * r.id_acc),
            ("verification", |r| 100.0 * r.verif_acc),
        ];
        let p = panel("accuracy (%)", 100.5, 1, SeriesLabelPosition::LowerRight);
        draw_panel(path, &areas[1], &p, &rows, &accuracies)?;
        if !normed.is_empty() {
            let y_max = normed
                .iter()
                .filter_map(|r| r.grad_norms)
                .flatten()
                .fold(1e-9, f64::max)
                * 1.05;
            let series: [(&str, LogField); 4] = [
                ("identification", |r| r.grad_norms.map_or(0.0, |g| g[0])),
                ("verification", |r| r.grad_norms.map_or(0.0, |g| g[1])),
                ("triplet", |r| r.grad_norms.map_or(0.0, |g| g[2])),
                ("sum (the update)", |r| r.grad_norms.map_or(0.0, |g| g[3])),
            ];
            let p = panel(
                "backbone gradient norm per loss",
                y_max,
                0,
                SeriesLabelPosition::UpperRight,
            );
            draw_panel(path, &areas[2], &p, &normed, &series)?;
        }
        Ok(())
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What the report page shows.
#[derive(Debug, Clone)]
pub struct ReportPage<'a> {
    pub title: String,
    /// (label, metrics) of each evaluated pair; the first is the main one.
    pub runs: Vec<(String, &'a Metrics)>,
    /// Picture file names in the report folder, with captions.
    pub pictures: Vec<(String, String)>,
}

/// Writes `report.html` in `dir`: the metrics table and the pictures.
pub fn write_html(dir: &Path, page: &ReportPage) -> Result<PathBuf, ReportError> {
    let mut rows = String::new();
    for (label, m) in &page.runs {
        let at = |k: usize| m.cmc.get(k - 1).copied().unwrap_or(f64::NAN) * 100.0;
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{} / {}</td><td>{}{}</td></tr>\n",
            escape(label),
            100.0 * m.rank1,
            100.0 * m.rank5,
            100.0 * m.rank10,
            at(20),
            100.0 * m.map,
            100.0 * m.minp,
            m.num_valid_queries,
            m.num_queries,
            m.metric,
            if m.rerank.is_some() { " + re-ranking" } else { "" }
        ));
    }
    let mut figures = String::new();
    for (file, caption) in &page.pictures {
        figures.push_str(&format!(
            "<figure><img src=\"{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>\n",
            escape(file),
            escape(caption),
            escape(caption)
        ));
    }
    let html = format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>{title}</h1>
<p>Market-1501 protocol: gallery images of the query's identity and camera are removed, junk never counts, distractors stay. Rates in %.</p>
<table id="metrics">
<tr><th>run</th><th>rank-1</th><th>rank-5</th><th>rank-10</th><th>rank-20</th><th>mAP</th><th>mINP</th><th>valid queries</th><th>distance</th></tr>
{rows}</table>
{figures}
</body></html>
"#,
        title = escape(&page.title)
    );
    let path = dir.join("report.html");
    reid_io::atomic::write_bytes_atomically(&path, html.as_bytes()).map_err(|e| ReportError::File {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pictures_are_written_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let cmc = dir.path().join("cmc.png");
        let series = CurveSeries {
            label: "a".into(),
            cmc: vec![0.5, 0.7, 0.9, 1.0],
            rank1: 0.5,
            map: 0.4,
        };
        draw_cmc(
            &cmc,
            &[
                series.clone(),
                CurveSeries {
                    label: "b".into(),
                    ..series
                },
            ],
        )
        .unwrap();
        let img = image::open(&cmc).unwrap();
        assert_eq!((img.width(), img.height()), (800, 560));

        let q = dir.path().join("q.png");
        image::RgbImage::from_pixel(32, 64, image::Rgb([10, 200, 10]))
            .save(&q)
            .unwrap();
        let ranked = dir.path().join("ranked.png");
        draw_ranked(
            &ranked,
            &[RankedRow {
                query: q.clone(),
                matches: vec![(q.clone(), true), (q.clone(), false)],
            }],
        )
        .unwrap();
        let img = image::open(&ranked).unwrap().to_rgb8();
        // The second match's frame is red, the first's green.
        let step = CELL.0 + 2 * FRAME + GAP;
        let y = GAP + 18 + 1;
        let green = img.get_pixel(GAP + step + GAP + 1, y);
        let red = img.get_pixel(GAP + 2 * step + GAP + 1, y);
        assert!(green[1] > 150 && green[0] < 50, "{green:?}");
        assert!(red[0] > 200 && red[1] < 50, "{red:?}");

        let err = draw_ranked(
            &ranked,
            &[RankedRow {
                query: dir.path().join("missing.jpg"),
                matches: vec![],
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("missing.jpg"));
    }

    #[test]
    fn training_log_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("metrics.csv");
        std::fs::write(
            &csv,
            "kind,epoch,step,lr,loss_id1,loss_id2,loss_verif,loss,id_acc,verif_acc,images_per_s,rank1,mAP\n\
             step,0,10,0.005,4.0,4.2,0.7,4.8,0.01,0.5,100.0,,\n\
             epoch,0,20,0.005,3.0,3.2,0.6,3.7,0.1,0.6,100.0,0.5,0.3\n",
        )
        .unwrap();
        let log = read_training_log(&csv).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!((log[0].step, log[0].loss_id), (10, 4.1));
        assert_eq!(log[1].rank1, Some(0.5));
        draw_training_curves(&dir.path().join("curves.png"), &log).unwrap();
        let img = image::open(dir.path().join("curves.png")).unwrap();
        assert_eq!(img.width(), 1000, "two panels without gradient norms");
        assert_eq!(log[0].grad_norms, None);

        // Today's columns: a triplet term and gradient norms on step rows.
        std::fs::write(
            &csv,
            "kind,epoch,step,lr,loss_id1,loss_id2,loss_verif,loss_triplet,loss,id_acc,verif_acc,images_per_s,rank1,mAP,gnorm_id1,gnorm_id2,gnorm_verif,gnorm_triplet,gnorm_total\n\
             step,0,10,0.005,4.0,4.2,0.7,0.3,5.1,0.01,0.5,100.0,,,3.0,4.0,2.0,1.0,6.5\n\
             epoch,0,20,0.005,3.0,3.2,0.6,0.2,3.9,0.1,0.6,100.0,0.5,0.3,,,,,\n",
        )
        .unwrap();
        let log = read_training_log(&csv).unwrap();
        assert_eq!(log[0].grad_norms, Some([5.0, 2.0, 1.0, 6.5]), "id1 and id2 combined");
        assert_eq!((log[0].loss_triplet, log[1].grad_norms), (0.3, None));
        draw_training_curves(&dir.path().join("curves.png"), &log).unwrap();
        let img = image::open(dir.path().join("curves.png")).unwrap();
        assert_eq!(img.width(), 1500, "a third panel: the gradient norms");
    }
}
