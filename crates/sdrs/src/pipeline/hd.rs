//! `hd`: txt2imghd's loop — generate (or take) an image, then per pass enlarge it ×2, redraw
//! it in overlapping tiles of the generation size with img2img, and join the tiles with
//! linear ramps.
//!
//! Seeds: the base image uses the request's seed. Tile `t` (row by row, from 0) of pass `p`
//! (from 0) is redrawn with seed `seed + 1 + 10000·p + t`, so every tile is reproducible and
//! no two tiles share their noise.

use image::RgbImage;

use super::hires::enlarge;
use super::infotext;
use super::tiles::{self, Blender};
use super::{img2img, txt2img, Event, GenerationRequest, StableDiffusion};
use crate::image_io::resize_lanczos;
use crate::limits::{MAX_PIXELS, MAX_SIDE};
use crate::sampling::Flow;
use crate::upscale::Upscaler;
use crate::{Error, Result};

/// How `hd` redraws the enlarged image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HdOptions {
    /// Number of ×2 passes.
    pub passes: usize,
    /// img2img strength of each tile.
    pub strength: f64,
    /// Overlap of neighbouring tiles, in pixels (also the blend width).
    pub overlap: usize,
    /// Sampling steps per tile (before the strength cut); `None` = the request's steps.
    pub detail_steps: Option<usize>,
    /// CFG scale per tile; `None` = the request's.
    pub detail_scale: Option<f64>,
}

impl Default for HdOptions {
    fn default() -> Self {
        Self {
            passes: 1,
            strength: 0.3,
            overlap: 64,
            detail_steps: None,
            detail_scale: None,
        }
    }
}

/// What `hd` reports while it runs.
pub enum HdEvent<'a> {
    /// Progress of the base image's generation.
    Base(Event<'a>),
    /// Tile `tile` of `tiles` in pass `pass` of `passes` is starting.
    Tile {
        pass: usize,
        passes: usize,
        tile: usize,
        tiles: usize,
    },
    /// The tile in progress finished sampling step `step` of `steps`.
    Step { step: usize, steps: usize },
}

/// The finished image and what made it.
pub struct HdImage {
    pub image: RgbImage,
    pub infotext: String,
}

/// The seed of tile `tile` in pass `pass`.
pub fn tile_seed(seed: u64, pass: usize, tile: usize) -> u64 {
    seed.wrapping_add(1 + 10_000 * pass as u64 + tile as u64)
}

/// The size after `passes` ×2 passes, refused up front when it would be too large.
pub fn final_size(width: usize, height: usize, passes: usize) -> Result<(usize, usize)> {
    let factor = 1usize.checked_shl(passes as u32).unwrap_or(usize::MAX);
    let (w, h) = (width.saturating_mul(factor), height.saturating_mul(factor));
    if passes > 8 || w > MAX_SIDE || h > MAX_SIDE || w.saturating_mul(h) > MAX_PIXELS {
        return Err(Error::InvalidSize {
            width: w,
            height: h,
            reason: format!(
                "{passes} pass(es) from {width}x{height} would make this size; at most \
                 {MAX_SIDE} pixels a side and {MAX_PIXELS} in all"
            ),
        });
    }
    Ok((w, h))
}

/// Runs `hd`: `req` gives the prompt, sampler, seed and the generation (= tile) size; `start`
/// replaces the generated base image when given.
pub fn hd(
    sd: &StableDiffusion,
    req: &GenerationRequest,
    start: Option<&RgbImage>,
    upscaler: &Upscaler,
    opts: &HdOptions,
    on_event: &mut dyn FnMut(HdEvent) -> Flow,
) -> Result<HdImage> {
    if opts.passes == 0 {
        return Err(Error::InvalidRequest("hd needs at least one pass".into()));
    }
    if !(opts.strength > 0.0 && opts.strength <= 1.0) {
        return Err(Error::InvalidRequest(format!(
            "hd strength must be in (0, 1], got {}",
            opts.strength
        )));
    }
    let single = GenerationRequest {
        batch_size: 1,
        n_iter: 1,
        enable_hr: false,
        ..req.clone()
    };
    let sampling = single.validate()?;
    if opts.overlap >= single.width.min(single.height) {
        return Err(Error::InvalidRequest(format!(
            "tiles of {}x{} cannot overlap by {}: the overlap must be smaller than a tile",
            single.width, single.height, opts.overlap
        )));
    }
    let seed = super::resolve_seed(single.seed);
    let single = GenerationRequest {
        seed: seed as i64,
        ..single
    };
    let mut image = match start {
        Some(img) => {
            let (w, h) = (img.width() / 8 * 8, img.height() / 8 * 8);
            if w == 0 || h == 0 {
                return Err(Error::InvalidSize {
                    width: img.width() as usize,
                    height: img.height() as usize,
                    reason: "the start image needs at least 8 pixels a side".into(),
                });
            }
            if (w, h) == img.dimensions() {
                img.clone()
            } else {
                resize_lanczos(img, w, h)
            }
        }
        None => {
            final_size(single.width, single.height, opts.passes)?;
            let mut images = txt2img(sd, &single, &mut |e| on_event(HdEvent::Base(e)))?;
            images
                .pop()
                .ok_or_else(|| Error::Image("txt2img returned no image".into()))?
                .image
        }
    };
    final_size(image.width() as usize, image.height() as usize, opts.passes)?;

    let tile_req = GenerationRequest {
        denoising_strength: opts.strength,
        steps: opts.detail_steps.unwrap_or(single.steps),
        cfg_scale: opts.detail_scale.unwrap_or(single.cfg_scale),
        ..single.clone()
    };
    for pass in 0..opts.passes {
        let (w, h) = (image.width() * 2, image.height() * 2);
        let enlarged = enlarge(upscaler, &image, w as usize, h as usize)?;
        image = redraw(sd, &tile_req, &enlarged, pass, opts, on_event)?;
    }
    let mut text = infotext::render(
        &single,
        sampling.sampler.name(),
        sampling.schedule,
        &infotext::ImageFacts {
            seed,
            model_name: sd.model_name.clone(),
            model_hash: sd.model_hash.clone(),
            img2img: false,
            fast: sd.fast(),
        },
    );
    text.push_str(&format!(
        ", SD upscale overlap: {}, SD upscale upscaler: {}, HD passes: {}, HD strength: {}, \
         HD steps: {}, HD scale: {}",
        opts.overlap,
        upscaler.name(),
        opts.passes,
        opts.strength,
        tile_req.steps,
        tile_req.cfg_scale
    ));
    Ok(HdImage {
        image,
        infotext: text,
    })
}

/// One pass's redraw: img2img over every tile of `enlarged`, joined with ramps.
fn redraw(
    sd: &StableDiffusion,
    tile_req: &GenerationRequest,
    enlarged: &RgbImage,
    pass: usize,
    opts: &HdOptions,
    on_event: &mut dyn FnMut(HdEvent) -> Flow,
) -> Result<RgbImage> {
    let (w, h) = (enlarged.width() as usize, enlarged.height() as usize);
    let grid = tiles::grid(w, h, tile_req.width, tile_req.height, opts.overlap)?;
    let mut blender = Blender::new(3, w, h, opts.overlap);
    let base_seed = tile_req.seed as u64;
    for (index, &tile) in grid.iter().enumerate() {
        let started = HdEvent::Tile {
            pass,
            passes: opts.passes,
            tile: index,
            tiles: grid.len(),
        };
        if on_event(started) == Flow::Stop {
            return Err(Error::Cancelled);
        }
        let crop = image::imageops::crop_imm(
            enlarged,
            tile.x as u32,
            tile.y as u32,
            tile.width as u32,
            tile.height as u32,
        )
        .to_image();
        let req = GenerationRequest {
            width: tile.width,
            height: tile.height,
            seed: tile_seed(base_seed, pass, index) as i64,
            ..tile_req.clone()
        };
        let mut images = img2img(sd, &req, &crop, &mut |e| match e {
            Event::Step { step, steps, .. } => on_event(HdEvent::Step { step, steps }),
            Event::Image { .. } => Flow::Continue,
        })?;
        let redrawn = images
            .pop()
            .ok_or_else(|| Error::Image("img2img returned no image".into()))?
            .image;
        blender.add(tile, &planar(&redrawn))?;
    }
    let blended = blender.finish();
    let plane = w * h;
    let mut out = RgbImage::new(w as u32, h as u32);
    for (i, px) in out.pixels_mut().enumerate() {
        for c in 0..3 {
            px.0[c] = blended[c * plane + i].round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(out)
}

/// An RGB image as planar float32 channels.
fn planar(img: &RgbImage) -> Vec<f32> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px.0[c] as f32;
        }
    }
    out
}
