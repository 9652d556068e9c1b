//! Drawing one synthetic image: identities' attributes and the palettes they
//! are drawn from, cameras, the canvas, backgrounds, the figure, and the JPEG
//! file of one planned image.

use std::io::Cursor;
use std::path::PathBuf;

use image::codecs::jpeg::JpegEncoder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use reid_io::seed::mix;

use super::plan::{ImageSpec, Subject};
use super::SynthConfig;
use crate::error::{DataError, Result};

/// Identity attributes, fixed across all of an identity's images.
#[derive(Debug, Clone)]
pub(super) struct Person {
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

pub(super) const PALETTE: [[f32; 3]; 16] = [
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

pub(super) const SKINS: [[f32; 3]; 5] = [
    [240.0, 200.0, 170.0],
    [220.0, 170.0, 130.0],
    [180.0, 130.0, 90.0],
    [130.0, 90.0, 60.0],
    [90.0, 60.0, 40.0],
];

pub(super) const HAIRS: [[f32; 3]; 5] = [
    [20.0, 15.0, 10.0],
    [70.0, 45.0, 25.0],
    [150.0, 110.0, 60.0],
    [200.0, 180.0, 120.0],
    [140.0, 140.0, 140.0],
];

pub(super) fn pick<R: Rng>(rng: &mut R, set: &[[f32; 3]]) -> [f32; 3] {
    let base = set[rng.gen_range(0..set.len())];
    let j = 18.0;
    [
        (base[0] + rng.gen_range(-j..j)).clamp(0.0, 255.0),
        (base[1] + rng.gen_range(-j..j)).clamp(0.0, 255.0),
        (base[2] + rng.gen_range(-j..j)).clamp(0.0, 255.0),
    ]
}

impl Person {
    pub(super) fn random<R: Rng>(rng: &mut R) -> Self {
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
pub(super) struct Camera {
    cast: [f32; 3],
    brightness: f32,
    wall: [f32; 3],
    floor: [f32; 3],
    horizon: f32,
    stripes: Option<(u32, [f32; 3])>,
    blur: f64,
}

impl Camera {
    pub(super) fn random<R: Rng>(rng: &mut R) -> Self {
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

/// An RGB float canvas.
pub(super) struct Canvas {
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

pub(super) fn draw_background<R: Rng>(canvas: &mut Canvas, cam: &Camera, rng: &mut R) {
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
pub(super) struct Figure<'a> {
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
pub(super) fn draw_person<R: Rng>(canvas: &mut Canvas, p: &Person, rng: &mut R) {
    let figure = Figure::place(canvas, p, rng);
    figure.bag(canvas, true);
    figure.legs(canvas);
    figure.arms(canvas, rng);
    figure.torso(canvas);
    figure.bag(canvas, false);
    figure.head(canvas);
}

pub(super) fn render(
    spec: &ImageSpec,
    people: &[Person],
    cameras: &[Camera],
    cfg: &SynthConfig,
    index: usize,
) -> Result<Vec<u8>> {
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
