//! A synthetic pedestrian dataset in the exact layout and naming of Market-1501,
//! DukeMTMC-reID or MSMT17 (see [`SynthLayout`]).
//!
//! Every identity has fixed attributes (clothing colours and patterns, hair, height,
//! build, a bag); every camera has its own colour cast, brightness, background and
//! blur; every image varies pose, view, position, scale, occlusion and JPEG
//! quality. All draws come from RNGs seeded by (seed, what, index), so the same seed
//! gives byte-identical files whatever the thread count.

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::manifest::Split;
use crate::seed::mix;
pub use crate::synth_layout::SynthLayout;
use crate::synth_layout::{Namer, MSMT17_TRAIN_LIST, MSMT17_VAL_LIST};

/// Sizes and seed of a synthetic dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthConfig {
    pub seed: u64,
    /// Number of cameras (at most 6 for Market-1501's naming, 8 for Duke's, 15 for
    /// MSMT17's).
    pub cameras: usize,
    pub train_ids: usize,
    pub train_images: usize,
    pub test_ids: usize,
    /// Query images: one per test identity per camera it appears in.
    pub query_images: usize,
    /// Gallery images of test identities (distractors and junk come on top).
    pub gallery_images: usize,
    /// Gallery images of identity 0000: people who are not test identities.
    pub distractors: usize,
    /// Gallery images of identity -1: bad detections.
    pub junk: usize,
    /// Image height and width in pixels (Market-1501's crops are 128 x 64).
    pub height: u32,
    pub width: u32,
    /// The folder layout and file names (Market-1501's when absent from a record).
    #[serde(default)]
    pub layout: SynthLayout,
}

impl SynthConfig {
    /// The default: small enough for a demo that trains in minutes on 2 cores.
    pub fn demo(seed: u64) -> Self {
        SynthConfig {
            seed,
            cameras: 4,
            train_ids: 100,
            train_images: 1200,
            test_ids: 100,
            query_images: 250,
            gallery_images: 700,
            distractors: 100,
            junk: 50,
            height: 128,
            width: 64,
            layout: SynthLayout::Market,
        }
    }

    /// Market-1501's real split sizes: 12,936 train images of 751 identities,
    /// 3,368 queries of 750, 19,732 gallery files (2,793 distractors, 3,819 junk),
    /// 6 cameras.
    pub fn market(seed: u64) -> Self {
        SynthConfig {
            seed,
            cameras: 6,
            train_ids: 751,
            train_images: 12_936,
            test_ids: 750,
            query_images: 3_368,
            gallery_images: 13_120,
            distractors: 2_793,
            junk: 3_819,
            height: 128,
            width: 64,
            layout: SynthLayout::Market,
        }
    }

    /// MSMT17's real split sizes in its layout: 32,621 train images of 1,041
    /// identities (2,373 of them in the val list), 11,659 queries and 82,161 gallery
    /// images of 3,060 identities, 15 cameras, no distractors or junk.
    pub fn msmt17(seed: u64) -> Self {
        SynthConfig {
            seed,
            cameras: 15,
            train_ids: 1_041,
            train_images: 32_621,
            test_ids: 3_060,
            query_images: 11_659,
            gallery_images: 82_161,
            distractors: 0,
            junk: 0,
            height: 128,
            width: 64,
            layout: SynthLayout::Msmt17,
        }
    }

    /// Train images that go to MSMT17's val list (2,373 of 32,621, as in MSMT17).
    pub fn val_images(&self) -> usize {
        match self.layout {
            SynthLayout::Msmt17 => self.train_images * 2_373 / 32_621,
            _ => 0,
        }
    }

    /// Total number of image files.
    pub fn total_images(&self) -> usize {
        self.train_images + self.query_images + self.gallery_images + self.distractors + self.junk
    }

    /// Checks that the sizes can be met (every test identity in at least two
    /// cameras, one gallery image per camera it appears in, ...).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (c, max) = (self.cameras, self.layout.max_cameras());
        if !(2..=max).contains(&c) {
            return Err(format!(
                "cameras must be 2 to {max} in the {} layout, got {c}",
                self.layout
            ));
        }
        if self.layout == SynthLayout::Msmt17 && self.distractors + self.junk > 0 {
            return Err("the msmt17 layout has no distractors or junk: pass --distractors 0 --junk 0".into());
        }
        if self.train_ids == 0 || self.test_ids == 0 {
            return Err("train and test identities must be at least 1".into());
        }
        if self.train_ids + self.test_ids > 9999 {
            return Err("at most 9999 identities fit the 4-digit names".into());
        }
        if self.train_images < 2 * self.train_ids {
            return Err(format!(
                "train images ({}) must be at least 2 per train identity ({})",
                self.train_images,
                2 * self.train_ids
            ));
        }
        let (lo, hi) = (2 * self.test_ids, c * self.test_ids);
        if !(lo..=hi).contains(&self.query_images) {
            return Err(format!(
                "query images must be 2 to {c} per test identity: {lo}..={hi}, got {}",
                self.query_images
            ));
        }
        if self.gallery_images < self.query_images {
            return Err(format!(
                "gallery images ({}) must be at least the query images ({}): one per identity and camera",
                self.gallery_images, self.query_images
            ));
        }
        if self.height < 32 || self.width < 16 {
            return Err("images must be at least 32 x 16".into());
        }
        Ok(())
    }
}

/// Identity attributes, fixed across all of an identity's images.
#[derive(Debug, Clone)]
struct Person {
    skin: [f32; 3],
    hair: [f32; 3],
    hat: bool,
    upper: [f32; 3],
    upper_second: [f32; 3],
    upper_pattern: u8,
    long_sleeves: bool,
    lower: [f32; 3],
    shorts: bool,
    shoes: [f32; 3],
    height: f32,
    build: f32,
    /// 0 none, 1 backpack, 2 handbag.
    bag: u8,
    bag_colour: [f32; 3],
    bag_left: bool,
}

const PALETTE: [[f32; 3]; 16] = [
    [200.0, 30.0, 35.0],
    [30.0, 60.0, 190.0],
    [35.0, 150.0, 60.0],
    [230.0, 200.0, 40.0],
    [240.0, 240.0, 235.0],
    [25.0, 25.0, 30.0],
    [120.0, 120.0, 125.0],
    [240.0, 130.0, 30.0],
    [130.0, 50.0, 160.0],
    [235.0, 130.0, 170.0],
    [110.0, 70.0, 40.0],
    [40.0, 170.0, 180.0],
    [20.0, 30.0, 80.0],
    [190.0, 170.0, 120.0],
    [100.0, 120.0, 40.0],
    [140.0, 20.0, 40.0],
];

const SKINS: [[f32; 3]; 5] = [
    [240.0, 200.0, 170.0],
    [220.0, 170.0, 130.0],
    [180.0, 130.0, 90.0],
    [130.0, 90.0, 60.0],
    [90.0, 60.0, 40.0],
];

const HAIRS: [[f32; 3]; 5] = [
    [20.0, 15.0, 10.0],
    [70.0, 45.0, 25.0],
    [150.0, 110.0, 60.0],
    [200.0, 180.0, 120.0],
    [140.0, 140.0, 140.0],
];

fn pick<R: Rng>(rng: &mut R, set: &[[f32; 3]]) -> [f32; 3] {
    let base = set[rng.gen_range(0..set.len())];
    let j = 18.0;
    [
        (base[0] + rng.gen_range(-j..j)).clamp(0.0, 255.0),
        (base[1] + rng.gen_range(-j..j)).clamp(0.0, 255.0),
        (base[2] + rng.gen_range(-j..j)).clamp(0.0, 255.0),
    ]
}

impl Person {
    fn random<R: Rng>(rng: &mut R) -> Self {
        Person {
            skin: pick(rng, &SKINS),
            hair: pick(rng, &HAIRS),
            hat: rng.gen_bool(0.15),
            upper: pick(rng, &PALETTE),
            upper_second: pick(rng, &PALETTE),
            upper_pattern: rng.gen_range(0..5),
            long_sleeves: rng.gen_bool(0.6),
            lower: pick(rng, &PALETTE),
            shorts: rng.gen_bool(0.25),
            shoes: pick(rng, &PALETTE[4..7]),
            height: rng.gen_range(0.84..1.0),
            build: rng.gen_range(0.26..0.36),
            bag: rng.gen_range(0..3),
            bag_colour: pick(rng, &PALETTE),
            bag_left: rng.gen_bool(0.5),
        }
    }
}

/// How one camera sees the world.
#[derive(Debug, Clone)]
struct Camera {
    cast: [f32; 3],
    brightness: f32,
    wall: [f32; 3],
    floor: [f32; 3],
    horizon: f32,
    stripes: Option<(u32, [f32; 3])>,
    blur: f64,
}

impl Camera {
    fn random<R: Rng>(rng: &mut R) -> Self {
        let grey = |rng: &mut R| {
            let g: f32 = rng.gen_range(60.0..200.0);
            [
                g + rng.gen_range(-25.0..25.0),
                g + rng.gen_range(-25.0..25.0),
                g + rng.gen_range(-25.0..25.0),
            ]
        };
        let wall = grey(rng);
        let floor = grey(rng);
        let stripes = rng.gen_bool(0.5).then(|| (rng.gen_range(6..16), grey(rng)));
        Camera {
            cast: [
                rng.gen_range(0.9..1.1),
                rng.gen_range(0.9..1.1),
                rng.gen_range(0.9..1.1),
            ],
            brightness: rng.gen_range(0.85..1.15),
            wall,
            floor,
            horizon: rng.gen_range(0.45..0.8),
            stripes,
            blur: rng.gen_range(0.0..0.6),
        }
    }
}

/// What kind of picture an image file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    /// An identity's person (train, query, gallery).
    Identity(usize),
    /// A one-off person (a distractor, pid 0).
    Stranger,
    /// A bad detection (junk, pid -1): background and a sliver of someone.
    Junk,
}

/// One file to render.
#[derive(Debug, Clone)]
struct ImageSpec {
    relative_path: String,
    subject: Subject,
    camera: usize,
    /// MSMT17's (list file, line).
    listed: Option<(&'static str, String)>,
}

/// An RGB float canvas.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<[f32; 3]>,
}

impl Canvas {
    fn fill_rect(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, colour: impl Fn(usize, usize) -> [f32; 3]) {
        let xs = (x0.max(0.0).round() as usize).min(self.w);
        let xe = (x1.max(0.0).round() as usize).min(self.w);
        let ys = (y0.max(0.0).round() as usize).min(self.h);
        let ye = (y1.max(0.0).round() as usize).min(self.h);
        for y in ys..ye {
            for x in xs..xe {
                self.px[y * self.w + x] = colour(x, y);
            }
        }
    }

    fn fill_ellipse(&mut self, cx: f32, cy: f32, rx: f32, ry: f32, colour: impl Fn(usize, usize) -> [f32; 3]) {
        let ys = ((cy - ry).floor().max(0.0) as usize).min(self.h);
        let ye = ((cy + ry).ceil().max(0.0) as usize).min(self.h);
        let xs = ((cx - rx).floor().max(0.0) as usize).min(self.w);
        let xe = ((cx + rx).ceil().max(0.0) as usize).min(self.w);
        for y in ys..ye {
            for x in xs..xe {
                let dx = (x as f32 + 0.5 - cx) / rx;
                let dy = (y as f32 + 0.5 - cy) / ry;
                if dx * dx + dy * dy <= 1.0 {
                    self.px[y * self.w + x] = colour(x, y);
                }
            }
        }
    }

    fn box_blur(&mut self) {
        let src = self.px.clone();
        for y in 0..self.h {
            for x in 0..self.w {
                let mut acc = [0.0f32; 3];
                let mut n = 0.0;
                for yy in y.saturating_sub(1)..(y + 2).min(self.h) {
                    for xx in x.saturating_sub(1)..(x + 2).min(self.w) {
                        let p = src[yy * self.w + xx];
                        acc[0] += p[0];
                        acc[1] += p[1];
                        acc[2] += p[2];
                        n += 1.0;
                    }
                }
                self.px[y * self.w + x] = [acc[0] / n, acc[1] / n, acc[2] / n];
            }
        }
    }
}

fn draw_background<R: Rng>(canvas: &mut Canvas, cam: &Camera, rng: &mut R) {
    // Each image sees the camera's scene from a slightly different spot: the wall
    // and floor colours shift, so the background alone does not name the camera.
    let mut jitter = |c: [f32; 3], amount: f32| {
        let shift = rng.gen_range(-amount..amount);
        [
            (c[0] + shift + rng.gen_range(-12.0..12.0)).clamp(0.0, 255.0),
            (c[1] + shift + rng.gen_range(-12.0..12.0)).clamp(0.0, 255.0),
            (c[2] + shift + rng.gen_range(-12.0..12.0)).clamp(0.0, 255.0),
        ]
    };
    let cam = &Camera {
        wall: jitter(cam.wall, 40.0),
        floor: jitter(cam.floor, 40.0),
        stripes: cam.stripes.map(|(p, c)| (p, jitter(c, 40.0))),
        ..cam.clone()
    };
    let horizon = cam.horizon * canvas.h as f32 + rng.gen_range(-6.0..6.0);
    let offset = rng.gen_range(0..32);
    let (w, h) = (canvas.w, canvas.h);
    canvas.fill_rect(0.0, 0.0, w as f32, h as f32, |x, y| {
        if (y as f32) < horizon {
            match cam.stripes {
                Some((period, colour)) if ((x + offset) as u32 / period).is_multiple_of(2) => colour,
                _ => cam.wall,
            }
        } else {
            let t = (y as f32 - horizon) / h as f32;
            [
                cam.floor[0] * (1.0 - 0.3 * t),
                cam.floor[1] * (1.0 - 0.3 * t),
                cam.floor[2] * (1.0 - 0.3 * t),
            ]
        }
    });
    // A few background objects: poles, bins, other clutter.
    for _ in 0..rng.gen_range(0..3) {
        let x = rng.gen_range(0.0..w as f32);
        let bw = rng.gen_range(2.0..10.0);
        let top = rng.gen_range(0.0..h as f32 * 0.7);
        let c = pick(rng, &PALETTE);
        let c = [c[0] * 0.6, c[1] * 0.6, c[2] * 0.6];
        canvas.fill_rect(x, top, x + bw, h as f32, |_, _| c);
    }
}

/// Where a person stands in the picture: view (0 front, 1 back, 2 side) and the
/// lengths of the body, fractions of the person's height `unit`.
struct Figure<'a> {
    p: &'a Person,
    view: u8,
    cx: f32,
    top: f32,
    unit: f32,
    torso_w: f32,
    head_r: f32,
    shoulder: f32,
    hip: f32,
    foot: f32,
    stride: f32,
}

impl<'a> Figure<'a> {
    /// Places person `p` in `canvas` with random view, size, position and stride.
    fn place<R: Rng>(canvas: &Canvas, p: &'a Person, rng: &mut R) -> Self {
        let (w, h) = (canvas.w as f32, canvas.h as f32);
        let view = rng.gen_range(0..3u8);
        let scale = p.height * rng.gen_range(0.9..1.04);
        let unit = h * 0.93 * scale;
        let cx = w / 2.0 + rng.gen_range(-0.08..0.08) * w;
        let top = h - unit - rng.gen_range(0.0..0.05) * h;
        let torso_w = if view == 2 { p.build * 0.65 } else { p.build } * unit * 0.5;
        let head_r = 0.065 * unit;
        let stride = rng.gen_range(-1.0..1.0f32) * torso_w * 0.35;
        Figure {
            p,
            view,
            cx,
            top,
            unit,
            torso_w,
            head_r,
            shoulder: top + 2.0 * head_r + 0.01 * unit,
            hip: top + 0.52 * unit,
            foot: top + unit,
            stride,
        }
    }

    /// A backpack seen from behind sits over the torso (`behind` false); from the
    /// side it sticks out, from the front only its straps show (`behind` true).
    fn bag(&self, canvas: &mut Canvas, behind: bool) {
        let (p, cx, u, tw) = (self.p, self.cx, self.unit, self.torso_w);
        let (bag, side) = (p.bag_colour, if p.bag_left { -1.0 } else { 1.0 });
        match (p.bag, self.view, behind) {
            (1, 1, false) => canvas.fill_rect(
                cx - tw * 0.8,
                self.shoulder + 0.03 * u,
                cx + tw * 0.8,
                self.hip - 0.04 * u,
                |_, _| bag,
            ),
            (1, 2, true) => {
                let x0 = cx + side * tw;
                let (a, b) = (x0.min(x0 + side * 0.09 * u), x0.max(x0 + side * 0.09 * u));
                canvas.fill_rect(a, self.shoulder + 0.03 * u, b, self.hip - 0.06 * u, |_, _| bag)
            }
            (1, 0, true) => {
                let c = [bag[0] * 0.8, bag[1] * 0.8, bag[2] * 0.8];
                for s in [-1.0, 1.0] {
                    let x = cx + s * tw * 0.55;
                    canvas.fill_rect(x - 1.0, self.shoulder, x + 1.0, self.hip - 0.1 * u, |_, _| c);
                }
            }
            (2, _, false) => {
                let x = cx + side * (tw + 0.03 * u);
                canvas.fill_rect(
                    x - 0.06 * u,
                    self.hip - 0.02 * u,
                    x + 0.06 * u,
                    self.hip + 0.1 * u,
                    |_, _| bag,
                )
            }
            _ => {}
        }
    }

    /// Legs in trousers (or shorts and skin) and shoes, apart by the stride.
    fn legs(&self, canvas: &mut Canvas) {
        let (p, u) = (self.p, self.unit);
        let leg_w = self.torso_w * 0.42;
        let (lower, skin, shoes) = (p.lower, p.skin, p.shoes);
        let knee = self.hip + 0.22 * u;
        let ankle = self.foot - 0.04 * u;
        for (i, dx) in [(-1.0f32, -self.stride), (1.0, self.stride)] {
            let x = self.cx + i * self.torso_w * 0.45 + dx * 0.5;
            let legs_until = if p.shorts { knee } else { ankle };
            canvas.fill_rect(x - leg_w / 2.0, self.hip, x + leg_w / 2.0, legs_until, |_, _| lower);
            if p.shorts {
                canvas.fill_rect(x - leg_w / 2.5, knee, x + leg_w / 2.5, ankle, |_, _| skin);
            }
            canvas.fill_rect(x - leg_w / 2.0, ankle, x + leg_w / 1.6, self.foot, |_, _| shoes);
        }
    }

    /// Arms swinging by a random amount, sleeved short or long.
    fn arms<R: Rng>(&self, canvas: &mut Canvas, rng: &mut R) {
        let (p, u) = (self.p, self.unit);
        let arm_w = self.torso_w * 0.3;
        let (upper, sleeve) = (p.upper, if p.long_sleeves { p.upper } else { p.skin });
        let swing = rng.gen_range(-1.0..1.0f32) * 0.03 * u;
        let elbow = self.shoulder + 0.12 * u;
        for (i, sw) in [(-1.0f32, swing), (1.0, -swing)] {
            let x = self.cx + i * (self.torso_w + arm_w * 0.5) + sw;
            canvas.fill_rect(x - arm_w / 2.0, self.shoulder, x + arm_w / 2.0, elbow, |_, _| upper);
            canvas.fill_rect(x - arm_w / 2.0, elbow, x + arm_w / 2.0, self.hip + 0.02 * u, |_, _| {
                sleeve
            });
        }
    }

    /// The torso with its pattern; the front logo is not seen from the back.
    fn torso(&self, canvas: &mut Canvas) {
        let p = self.p;
        let (a, b) = (p.upper, p.upper_second);
        let pattern = if self.view == 1 && p.upper_pattern == 4 {
            0
        } else {
            p.upper_pattern
        };
        let period = (0.05 * self.unit).max(2.0) as usize;
        let (cx, tw, u) = (self.cx, self.torso_w, self.unit);
        let mid = (self.shoulder + self.hip) / 2.0;
        canvas.fill_rect(cx - tw, self.shoulder, cx + tw, self.hip, |x, y| match pattern {
            1 if (y / period).is_multiple_of(2) => b,
            2 if (x / period).is_multiple_of(2) => b,
            3 if (y as f32) > mid => b,
            4 if (x as f32 - cx).abs() < tw * 0.4 && ((y as f32) - mid).abs() < 0.05 * u => b,
            _ => a,
        });
    }

    /// The head with hair (more of it seen from the back) or a hat.
    fn head(&self, canvas: &mut Canvas) {
        let (p, cx, r) = (self.p, self.cx, self.head_r);
        let (skin, hair) = (p.skin, p.hair);
        let head_cy = self.top + r;
        canvas.fill_ellipse(cx, head_cy, r * 0.85, r, |_, _| skin);
        if p.hat {
            let hat = p.upper_second;
            canvas.fill_rect(
                cx - r,
                self.top - 0.01 * self.unit,
                cx + r,
                head_cy - r * 0.2,
                |_, _| hat,
            );
            return;
        }
        let hair_to = if self.view == 1 {
            head_cy + r * 0.6
        } else {
            head_cy - r * 0.3
        };
        canvas.fill_ellipse(cx, head_cy - r * 0.25, r * 0.9, r * 0.8, |_, y| {
            if (y as f32) < hair_to {
                hair
            } else {
                skin
            }
        });
    }
}

/// Draws a person at a random view, size, position and pose.
fn draw_person<R: Rng>(canvas: &mut Canvas, p: &Person, rng: &mut R) {
    let figure = Figure::place(canvas, p, rng);
    figure.bag(canvas, true);
    figure.legs(canvas);
    figure.arms(canvas, rng);
    figure.torso(canvas);
    figure.bag(canvas, false);
    figure.head(canvas);
}

fn render(spec: &ImageSpec, people: &[Person], cameras: &[Camera], cfg: &SynthConfig, index: usize) -> Result<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(cfg.seed, 3, index as u64));
    let cam = &cameras[spec.camera];
    let (w, h) = (cfg.width as usize, cfg.height as usize);
    let mut canvas = Canvas {
        w,
        h,
        px: vec![[0.0; 3]; w * h],
    };
    draw_background(&mut canvas, cam, &mut rng);
    match spec.subject {
        Subject::Identity(i) => draw_person(&mut canvas, &people[i], &mut rng),
        Subject::Stranger => {
            let p = Person::random(&mut rng);
            draw_person(&mut canvas, &p, &mut rng);
        }
        Subject::Junk => {
            // A badly placed box: a sliver of a person at an edge, or none at all.
            if rng.gen_bool(0.6) {
                let p = Person::random(&mut rng);
                let mut part = Canvas {
                    w,
                    h,
                    px: canvas.px.clone(),
                };
                draw_person(&mut part, &p, &mut rng);
                let shift = (rng.gen_range(0.5..0.8) * w as f32) as usize;
                let right = rng.gen_bool(0.5);
                for y in 0..h {
                    for x in 0..w {
                        let src = if right { x + shift } else { x.wrapping_sub(shift) };
                        if src < w {
                            canvas.px[y * w + x] = part.px[y * w + src];
                        }
                    }
                }
            }
        }
    }
    // Partial occlusion by an object in front.
    if rng.gen_bool(0.15) {
        let c = pick(&mut rng, &PALETTE);
        let c = [c[0] * 0.7, c[1] * 0.7, c[2] * 0.7];
        let frac = rng.gen_range(0.15..0.35);
        match rng.gen_range(0..3) {
            0 => canvas.fill_rect(0.0, h as f32 * (1.0 - frac), w as f32, h as f32, |_, _| c),
            1 => canvas.fill_rect(0.0, 0.0, w as f32 * frac, h as f32, |_, _| c),
            _ => canvas.fill_rect(w as f32 * (1.0 - frac), 0.0, w as f32, h as f32, |_, _| c),
        }
    }
    if rng.gen_bool(cam.blur) {
        canvas.box_blur();
    }
    let gain = cam.brightness * rng.gen_range(0.9..1.1);
    let noise = rng.gen_range(2.0..8.0f32);
    let mut bytes = Vec::with_capacity(w * h * 3);
    for p in &canvas.px {
        for (value, cast) in p.iter().zip(cam.cast) {
            let v = value * cast * gain + rng.gen_range(-noise..noise);
            bytes.push(v.clamp(0.0, 255.0) as u8);
        }
    }
    let quality = rng.gen_range(70..96);
    let mut out = Cursor::new(Vec::new());
    JpegEncoder::new_with_quality(&mut out, quality)
        .encode(&bytes, w as u32, h as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| DataError::Image {
            path: PathBuf::from(&spec.relative_path),
            message: e.to_string(),
        })?;
    Ok(out.into_inner())
}

/// Splits `total` into `n` counts, each between `min` and `max`, at random.
fn spread<R: Rng>(rng: &mut R, n: usize, total: usize, min: usize, max: usize) -> Vec<usize> {
    let mut counts = vec![min; n];
    let mut left = total - min * n;
    let mut open: Vec<usize> = (0..n).collect();
    while left > 0 {
        let k = rng.gen_range(0..open.len());
        let i = open[k];
        counts[i] += 1;
        left -= 1;
        if counts[i] == max {
            open.swap_remove(k);
        }
    }
    counts
}

/// The file names of the dataset, in a fixed order, and what each one shows.
fn plan(cfg: &SynthConfig) -> (Vec<ImageSpec>, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(cfg.seed, 1, 0));
    let total_ids = cfg.train_ids + cfg.test_ids;
    let mut pids: Vec<i64> = (1..=total_ids as i64).collect();
    pids.shuffle(&mut rng);
    let (mut train, mut test) = (pids[..cfg.train_ids].to_vec(), pids[cfg.train_ids..].to_vec());
    train.sort_unstable();
    test.sort_unstable();
    if cfg.layout == SynthLayout::Msmt17 {
        // MSMT17 numbers train and test identities from 0, each on its own.
        train = (0..cfg.train_ids as i64).collect();
        test = (0..cfg.test_ids as i64).collect();
    }
    let mut namer = Namer::new(cfg.layout, cfg.cameras);
    let mut specs = Vec::with_capacity(cfg.total_images());
    let mut add = |rng: &mut ChaCha8Rng, split: Split, pid: i64, camera: usize, subject: Subject| {
        let placed = namer.place(rng, split, pid, camera);
        specs.push(ImageSpec {
            relative_path: placed.relative_path,
            subject,
            camera,
            listed: placed.listed,
        });
    };

    // Person index: train identities first, then test identities.
    let train_counts = spread(&mut rng, cfg.train_ids, cfg.train_images, 2, usize::MAX);
    for (i, (&pid, &count)) in train.iter().zip(&train_counts).enumerate() {
        let mut cams: Vec<usize> = (0..cfg.cameras).collect();
        cams.shuffle(&mut rng);
        let seen = &cams[..rng.gen_range(2..=cfg.cameras)];
        for k in 0..count {
            let camera = if k < seen.len() {
                seen[k]
            } else {
                seen[rng.gen_range(0..seen.len())]
            };
            add(&mut rng, Split::Train, pid, camera, Subject::Identity(i));
        }
    }
    let camera_counts = spread(&mut rng, cfg.test_ids, cfg.query_images, 2, cfg.cameras);
    let gallery_counts = {
        // At least one gallery image per (identity, camera); the rest at random.
        let extra = spread(
            &mut rng,
            cfg.test_ids,
            cfg.gallery_images - cfg.query_images,
            0,
            usize::MAX,
        );
        camera_counts.iter().zip(extra).map(|(c, e)| c + e).collect::<Vec<_>>()
    };
    for (j, &pid) in test.iter().enumerate() {
        let person = Subject::Identity(cfg.train_ids + j);
        let mut cams: Vec<usize> = (0..cfg.cameras).collect();
        cams.shuffle(&mut rng);
        let seen = cams[..camera_counts[j]].to_vec();
        for &camera in &seen {
            add(&mut rng, Split::Query, pid, camera, person);
        }
        for k in 0..gallery_counts[j] {
            let camera = if k < seen.len() {
                seen[k]
            } else {
                seen[rng.gen_range(0..seen.len())]
            };
            add(&mut rng, Split::Gallery, pid, camera, person);
        }
    }
    for (count, pid, subject) in [(cfg.distractors, 0, Subject::Stranger), (cfg.junk, -1, Subject::Junk)] {
        for _ in 0..count {
            let camera = rng.gen_range(0..cfg.cameras);
            add(&mut rng, Split::Gallery, pid, camera, subject);
        }
    }
    move_to_val(cfg, &mut specs);
    (specs, total_ids)
}

/// MSMT17: moves [`SynthConfig::val_images`] train images, never an identity's
/// first, from the train list to the val list (so list_train alone still holds
/// every train identity).
fn move_to_val(cfg: &SynthConfig, specs: &mut [ImageSpec]) {
    let mut seen = std::collections::HashSet::new();
    let mut candidates: Vec<usize> = (0..specs.len())
        .filter(|&i| match (&specs[i].listed, specs[i].subject) {
            (Some((MSMT17_TRAIN_LIST, _)), Subject::Identity(p)) => !seen.insert(p),
            _ => false,
        })
        .collect();
    candidates.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(cfg.seed, 5, 0)));
    for &i in candidates.iter().take(cfg.val_images()) {
        if let Some((list, _)) = &mut specs[i].listed {
            *list = MSMT17_VAL_LIST;
        }
    }
}

/// The file `reid synth` writes into the dataset root to record its settings.
pub const SYNTH_RECORD: &str = "synth.json";

/// Reads the settings a synthetic dataset at `root` was made with, if any.
pub fn read_synth_record(root: &Path) -> Option<SynthConfig> {
    let text = fs::read_to_string(root.join(SYNTH_RECORD)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Renders the dataset into `out` (which must not exist). Files are written into a
/// temporary sibling folder that is renamed to `out` when complete, so an
/// interrupted run never leaves a dataset that looks whole. `progress` is called
/// with the number of images written so far.
pub fn generate(cfg: &SynthConfig, out: &Path, progress: &(dyn Fn(usize) + Sync)) -> Result<usize> {
    cfg.validate().map_err(|m| DataError::invalid(out, m))?;
    if out.exists() {
        return Err(DataError::invalid(
            out,
            "already exists; remove it or choose another --out",
        ));
    }
    let (specs, total_ids) = plan(cfg);
    let people: Vec<Person> = (0..total_ids)
        .map(|i| Person::random(&mut ChaCha8Rng::seed_from_u64(mix(cfg.seed, 2, i as u64))))
        .collect();
    let cameras: Vec<Camera> = (0..cfg.cameras)
        .map(|c| Camera::random(&mut ChaCha8Rng::seed_from_u64(mix(cfg.seed, 4, c as u64))))
        .collect();
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let result = (|| {
        let folders: std::collections::BTreeSet<&str> = specs
            .iter()
            .filter_map(|s| s.relative_path.rsplit_once('/').map(|(dir, _)| dir))
            .collect();
        for folder in folders {
            let dir = staging.join(folder);
            fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        }
        let done = std::sync::atomic::AtomicUsize::new(0);
        specs.par_iter().enumerate().try_for_each(|(i, spec)| {
            let bytes = render(spec, &people, &cameras, cfg, i)?;
            let path = staging.join(&spec.relative_path);
            fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))?;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_multiple_of(256) {
                progress(n);
            }
            Ok::<_, DataError>(())
        })?;
        write_lists(&specs, &staging)?;
        let record = staging.join(SYNTH_RECORD);
        let json = serde_json::to_string_pretty(cfg).expect("config serialises");
        fs::write(&record, json).map_err(|e| DataError::io(&record, e))?;
        fs::rename(&staging, out).map_err(|e| DataError::io(out, e))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result.map(|_| specs.len())
}

/// Writes MSMT17's list files (one `<path> <pid>` line per image, in plan order).
fn write_lists(specs: &[ImageSpec], root: &Path) -> Result<()> {
    let mut lists: std::collections::BTreeMap<&str, String> = Default::default();
    for (list, line) in specs.iter().filter_map(|s| s.listed.as_ref()) {
        let text = lists.entry(list).or_default();
        text.push_str(line);
        text.push('\n');
    }
    if lists.contains_key(MSMT17_TRAIN_LIST) {
        lists.entry(MSMT17_VAL_LIST).or_default();
    }
    for (list, text) in lists {
        let path = root.join(list);
        fs::write(&path, text).map_err(|e| DataError::io(&path, e))?;
    }
    Ok(())
}

/// Generates the dataset unless `out` already holds one made with `cfg`; returns
/// whether anything was generated. A folder of other settings, or not a
/// synthetic dataset, is an error.
pub fn ensure(cfg: &SynthConfig, out: &Path, progress: &(dyn Fn(usize) + Sync)) -> Result<bool> {
    if !out.exists() {
        return generate(cfg, out, progress).map(|_| true);
    }
    match read_synth_record(out) {
        Some(existing) if &existing == cfg => Ok(false),
        Some(_) => Err(DataError::invalid(
            out,
            "holds a synthetic dataset made with other settings; remove it or choose another --out",
        )),
        None => Err(DataError::invalid(
            out,
            "already exists and is not a synthetic dataset; choose another --out",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(seed: u64) -> SynthConfig {
        SynthConfig {
            seed,
            cameras: 3,
            train_ids: 5,
            train_images: 20,
            test_ids: 4,
            query_images: 9,
            gallery_images: 14,
            distractors: 3,
            junk: 2,
            height: 64,
            width: 32,
            layout: SynthLayout::Market,
        }
    }

    #[test]
    fn spread_hits_the_total_within_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let c = spread(&mut rng, 10, 37, 2, 6);
        assert_eq!(c.iter().sum::<usize>(), 37);
        assert!(c.iter().all(|&x| (2..=6).contains(&x)));
    }

    #[test]
    fn the_market_preset_has_market_sizes() {
        let cfg = SynthConfig::market(0);
        cfg.validate().unwrap();
        let (specs, _) = plan(&cfg);
        let count = |prefix: &str| specs.iter().filter(|s| s.relative_path.starts_with(prefix)).count();
        assert_eq!(count("bounding_box_train/"), 12_936);
        assert_eq!(count("query/"), 3_368);
        assert_eq!(count("bounding_box_test/"), 19_732);
    }

    #[test]
    fn plans_are_unique_and_test_identities_span_two_cameras() {
        let cfg = SynthConfig::demo(5);
        let (specs, _) = plan(&cfg);
        let names: std::collections::HashSet<_> = specs.iter().map(|s| &s.relative_path).collect();
        assert_eq!(names.len(), specs.len());
        let mut cams: std::collections::HashMap<usize, std::collections::BTreeSet<usize>> = Default::default();
        for s in specs.iter().filter(|s| s.relative_path.starts_with("query/")) {
            if let Subject::Identity(i) = s.subject {
                cams.entry(i).or_default().insert(s.camera);
            }
        }
        assert_eq!(cams.len(), cfg.test_ids);
        assert!(cams.values().all(|c| c.len() >= 2));
    }

    #[test]
    fn the_msmt17_preset_has_msmt17_sizes_and_lists() {
        let cfg = SynthConfig::msmt17(0);
        cfg.validate().unwrap();
        let (specs, _) = plan(&cfg);
        let count = |list: &str| {
            specs
                .iter()
                .filter(|s| s.listed.as_ref().is_some_and(|l| l.0 == list))
                .count()
        };
        assert_eq!(count(MSMT17_TRAIN_LIST), 30_248);
        assert_eq!(count(MSMT17_VAL_LIST), 2_373);
        assert_eq!(count("list_query.txt"), 11_659);
        assert_eq!(count("list_gallery.txt"), 82_161);
        let names: std::collections::HashSet<_> = specs.iter().map(|s| &s.relative_path).collect();
        assert_eq!(names.len(), specs.len(), "unique paths");
        let first = &specs[0];
        assert!(
            first.relative_path.starts_with("train/0000/0000_000_"),
            "{}",
            first.relative_path
        );
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let read_all = |root: &Path| {
            let mut files = Vec::new();
            for (_, folder) in crate::layout::SPLIT_FOLDERS {
                let mut names: Vec<_> = fs::read_dir(root.join(folder))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                names.sort();
                for n in names {
                    files.push((n.strip_prefix(root).unwrap().to_path_buf(), fs::read(&n).unwrap()));
                }
            }
            files
        };
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let c = dir.path().join("c");
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| generate(&tiny(7), &a, &|_| {}))
            .unwrap();
        generate(&tiny(7), &b, &|_| {}).unwrap();
        generate(&tiny(8), &c, &|_| {}).unwrap();
        let (fa, fb, fc) = (read_all(&a), read_all(&b), read_all(&c));
        assert_eq!(fa.len(), tiny(7).total_images());
        assert_eq!(fa, fb);
        assert_ne!(fa, fc);
        assert_eq!(read_synth_record(&a), Some(tiny(7)));
        assert!(
            generate(&tiny(7), &a, &|_| {}).is_err(),
            "an existing folder is not overwritten"
        );
    }

    #[test]
    fn impossible_sizes_are_refused() {
        let mut cfg = tiny(1);
        cfg.query_images = 100;
        assert!(cfg.validate().is_err());
        let mut cfg = tiny(1);
        cfg.cameras = 7;
        assert!(cfg.validate().is_err());
        cfg.layout = SynthLayout::Duke;
        cfg.validate().unwrap();
        cfg.layout = SynthLayout::Msmt17;
        assert!(cfg.validate().unwrap_err().contains("no distractors or junk"));
    }
}
