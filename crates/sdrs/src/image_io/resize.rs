//! Pillow's Lanczos resampling, bit for bit, and A1111's three img2img resize modes.
//!
//! A1111 resizes init images with PIL (`Image.resize(..., LANCZOS)`), whose 8-bit path uses
//! fixed-point weights; reproducing it exactly keeps img2img inputs identical to A1111's.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How an init image is fitted to the requested size (A1111's `resize_mode` 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "ResizeModeRepr", into = "u8")]
pub enum ResizeMode {
    /// 0: stretch to the target size, ignoring the aspect ratio.
    #[default]
    JustResize,
    /// 1: scale to cover the target, keep the aspect ratio, cut the overhang (centred).
    Crop,
    /// 2: scale to fit inside the target, keep the aspect ratio, and fill the borders by
    /// stretching the image's edge rows or columns.
    Fill,
}

/// A1111's API sends the mode as 0/1/2; people write names.
#[derive(Deserialize)]
#[serde(untagged)]
enum ResizeModeRepr {
    Number(u8),
    Name(String),
}

impl TryFrom<ResizeModeRepr> for ResizeMode {
    type Error = Error;
    fn try_from(repr: ResizeModeRepr) -> Result<Self> {
        match repr {
            ResizeModeRepr::Number(0) => Ok(Self::JustResize),
            ResizeModeRepr::Number(1) => Ok(Self::Crop),
            ResizeModeRepr::Number(2) => Ok(Self::Fill),
            ResizeModeRepr::Number(n) => Err(Error::InvalidRequest(format!(
                "resize_mode {n} is not 0 (just resize), 1 (crop) or 2 (fill)"
            ))),
            ResizeModeRepr::Name(name) => name.parse(),
        }
    }
}

impl From<ResizeMode> for u8 {
    fn from(mode: ResizeMode) -> u8 {
        match mode {
            ResizeMode::JustResize => 0,
            ResizeMode::Crop => 1,
            ResizeMode::Fill => 2,
        }
    }
}

impl std::str::FromStr for ResizeMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s
            .trim()
            .to_ascii_lowercase()
            .replace(['_', ' '], "-")
            .as_str()
        {
            "0" | "just-resize" | "resize" => Ok(Self::JustResize),
            "1" | "crop" | "crop-and-resize" => Ok(Self::Crop),
            "2" | "fill" | "resize-and-fill" => Ok(Self::Fill),
            _ => Err(Error::InvalidRequest(format!(
                "unknown resize mode {s:?}; valid: just-resize, crop, fill"
            ))),
        }
    }
}

impl std::fmt::Display for ResizeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::JustResize => "just-resize",
            Self::Crop => "crop",
            Self::Fill => "fill",
        })
    }
}

/// Pillow's `PRECISION_BITS` for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The two Pillow filters A1111's resizing uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleFilter {
    /// `Image.LANCZOS` (support 3): every resize A1111 asks for by name.
    Lanczos,
    /// `Image.BICUBIC` (a = −0.5, support 2): Pillow's default, which A1111's fill borders get.
    Bicubic,
}

impl ResampleFilter {
    fn support(self) -> f64 {
        match self {
            Self::Lanczos => 3.0,
            Self::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Lanczos => lanczos(x),
            Self::Bicubic => bicubic(x),
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input pixel, number of taps, and fixed-point weights
/// (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`).
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i64>,
    taps: usize,
}

fn coefficients(
    filter: ResampleFilter,
    in_size: usize,
    in0: f64,
    in1: f64,
    out_size: usize,
) -> Coefficients {
    let scale = (in1 - in0) / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let taps = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i64; out_size * taps];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
        let count = xmax.saturating_sub(xmin).min(taps);
        let raw: Vec<f64> = (0..count)
            .map(|x| filter.weight(((x + xmin) as f64 - center + 0.5) / filter_scale))
            .collect();
        let total: f64 = raw.iter().sum();
        for (x, w) in raw.iter().enumerate() {
            let w = if total != 0.0 { w / total } else { *w };
            let fixed = w * (1u64 << PRECISION_BITS) as f64;
            weights[xx * taps + x] = if w < 0.0 {
                (fixed - 0.5) as i64
            } else {
                (fixed + 0.5) as i64
            };
        }
        bounds.push((xmin, count));
    }
    Coefficients {
        bounds,
        weights,
        taps,
    }
}

fn clip8(v: i64) -> u8 {
    if v >= 1 << (PRECISION_BITS + 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resamples the region `[x0, y0, x1, y1]` of `img` to `width` × `height`, as Pillow's
/// `Image.resize(size, filter, box)` does for an RGB image. A region of zero height (or
/// width) is allowed, as in Pillow: it blends the rows next to that edge.
pub fn resize_region(
    img: &RgbImage,
    width: u32,
    height: u32,
    region: [f64; 4],
    filter: ResampleFilter,
) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let [x0, y0, x1, y1] = region;
    let need_horizontal = out_w != in_w || x0 != 0.0 || x1 != out_w as f64;
    let need_vertical = out_h != in_h || y0 != 0.0 || y1 != out_h as f64;
    if out_w == 0 || out_h == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let horizontal = coefficients(filter, in_w, x0, x1, out_w);
    let mut vertical = coefficients(filter, in_h, y0, y1, out_h);
    let first_row = vertical.bounds[0].0;
    let last_row = vertical.bounds[out_h - 1].0 + vertical.bounds[out_h - 1].1;
    let src = img.as_raw();
    let (mut rows, mut rows_w, mut rows_h) = (src.clone(), in_w, in_h);
    if need_horizontal {
        let temp_h = last_row.saturating_sub(first_row);
        let mut temp = vec![0u8; out_w * temp_h * 3];
        for y in 0..temp_h {
            let row = &src[(y + first_row) * in_w * 3..][..in_w * 3];
            for (xx, &(xmin, count)) in horizontal.bounds.iter().enumerate() {
                let k = &horizontal.weights[xx * horizontal.taps..][..count];
                for c in 0..3 {
                    let mut sum = 1i64 << (PRECISION_BITS - 1);
                    for (x, w) in k.iter().enumerate() {
                        sum += row[(x + xmin) * 3 + c] as i64 * w;
                    }
                    temp[(y * out_w + xx) * 3 + c] = clip8(sum);
                }
            }
        }
        for b in &mut vertical.bounds {
            b.0 -= first_row;
        }
        (rows, rows_w, rows_h) = (temp, out_w, temp_h);
    }
    if need_vertical {
        let mut out = vec![0u8; out_w * out_h * 3];
        for (yy, &(ymin, count)) in vertical.bounds.iter().enumerate() {
            let k = &vertical.weights[yy * vertical.taps..][..count];
            for x in 0..rows_w * 3 {
                let mut sum = 1i64 << (PRECISION_BITS - 1);
                for (y, w) in k.iter().enumerate() {
                    sum += rows[(y + ymin) * rows_w * 3 + x] as i64 * w;
                }
                out[yy * out_w * 3 + x] = clip8(sum);
            }
        }
        (rows, rows_h) = (out, out_h);
    }
    RgbImage::from_raw(rows_w as u32, rows_h as u32, rows).unwrap_or_else(|| img.clone())
}

/// Pillow's `Image.resize((width, height), LANCZOS)`.
pub fn resize_lanczos(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let region = [0.0, 0.0, img.width() as f64, img.height() as f64];
    resize_region(img, width, height, region, ResampleFilter::Lanczos)
}

/// A1111's `images.resize_image(mode, img, width, height)` with Lanczos and no upscaler.
pub fn resize_for_mode(img: &RgbImage, mode: ResizeMode, width: u32, height: u32) -> RgbImage {
    let (w, h) = (width as i64, height as i64);
    let (iw, ih) = (img.width() as i64, img.height() as i64);
    if mode == ResizeMode::JustResize || iw == 0 || ih == 0 || w == 0 || h == 0 {
        return resize_lanczos(img, width, height);
    }
    let ratio = w as f64 / h as f64;
    let src_ratio = iw as f64 / ih as f64;
    // Crop covers the target (the wider side follows the target), fill fits inside it.
    let width_follows = if mode == ResizeMode::Crop {
        ratio > src_ratio
    } else {
        ratio < src_ratio
    };
    let height_follows = if mode == ResizeMode::Crop {
        ratio <= src_ratio
    } else {
        ratio >= src_ratio
    };
    let src_w = if width_follows { w } else { iw * h / ih };
    let src_h = if height_follows { h } else { ih * w / iw };
    let resized = resize_lanczos(img, src_w as u32, src_h as u32);
    let mut out = RgbImage::new(width, height);
    let (left, top) = (w / 2 - src_w / 2, h / 2 - src_h / 2);
    image::imageops::replace(&mut out, &resized, left, top);
    if mode == ResizeMode::Fill {
        // A1111 stretches the edges with `resize(size, box=...)` and no filter: Pillow's
        // default, bicubic.
        let edge = |size: (u32, u32), region| {
            resize_region(&resized, size.0, size.1, region, ResampleFilter::Bicubic)
        };
        let (rw, rh) = (resized.width() as f64, resized.height() as f64);
        if ratio < src_ratio && top > 0 {
            let fill = top as u32;
            let above = edge((width, fill), [0.0, 0.0, w as f64, 0.0]);
            let below = edge((width, fill), [0.0, rh, w as f64, rh]);
            image::imageops::replace(&mut out, &above, 0, 0);
            image::imageops::replace(&mut out, &below, 0, top + src_h);
        } else if ratio > src_ratio && left > 0 {
            let fill = left as u32;
            let before = edge((fill, height), [0.0, 0.0, 0.0, h as f64]);
            let after = edge((fill, height), [rw, 0.0, rw, h as f64]);
            image::imageops::replace(&mut out, &before, 0, 0);
            image::imageops::replace(&mut out, &after, left + src_w, 0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 5) as u8, (y * 7) as u8, 100]))
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = ramp(13, 9);
        assert_eq!(resize_lanczos(&img, 13, 9), img);
    }

    #[test]
    fn crop_covers_the_target_and_cuts_the_overhang() {
        // 2:1 into a square: scaled to 32x16 to cover 16x16, centred, 8 columns cut each side.
        let img = ramp(40, 20);
        let out = resize_for_mode(&img, ResizeMode::Crop, 16, 16);
        assert_eq!(out.dimensions(), (16, 16));
        let full = resize_lanczos(&img, 32, 16);
        assert_eq!(out.get_pixel(0, 5), full.get_pixel(8, 5));
        assert_eq!(out.get_pixel(15, 9), full.get_pixel(23, 9));
    }

    #[test]
    fn fill_fits_inside_and_stretches_the_edges_into_the_borders() {
        let img = ramp(40, 20);
        let out = resize_for_mode(&img, ResizeMode::Fill, 16, 16);
        assert_eq!(out.dimensions(), (16, 16));
        let fitted = resize_lanczos(&img, 16, 8);
        // Image rows 4..12; the borders repeat one blended edge row each.
        assert_eq!(out.get_pixel(3, 4), fitted.get_pixel(3, 0));
        assert_eq!(out.get_pixel(3, 11), fitted.get_pixel(3, 7));
        for y in 0..4 {
            assert_eq!(out.get_pixel(7, y), out.get_pixel(7, 0));
            assert_eq!(out.get_pixel(7, 12 + y), out.get_pixel(7, 15));
        }
        // Tall into wide: borders on the left and right.
        let tall = ramp(10, 30);
        let out = resize_for_mode(&tall, ResizeMode::Fill, 24, 12);
        assert_eq!(out.dimensions(), (24, 12));
        assert_eq!(out.get_pixel(0, 6), out.get_pixel(7, 6));
        assert_ne!(out.get_pixel(0, 6).0, [0, 0, 0]);
    }

    #[test]
    fn just_resize_ignores_the_aspect_ratio() {
        let out = resize_for_mode(&ramp(40, 20), ResizeMode::JustResize, 8, 24);
        assert_eq!(out.dimensions(), (8, 24));
    }

    #[test]
    fn modes_parse_from_names_and_a1111_numbers() {
        assert_eq!("crop".parse::<ResizeMode>().unwrap(), ResizeMode::Crop);
        assert_eq!(
            "Just resize".parse::<ResizeMode>().unwrap(),
            ResizeMode::JustResize
        );
        let m: ResizeMode = serde_json::from_str("2").unwrap();
        assert_eq!(m, ResizeMode::Fill);
        let m: ResizeMode = serde_json::from_str("\"crop\"").unwrap();
        assert_eq!(m, ResizeMode::Crop);
        assert_eq!(serde_json::to_string(&ResizeMode::Crop).unwrap(), "1");
        assert!(serde_json::from_str::<ResizeMode>("3").is_err());
    }
}
