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
use super::{img2img, txt2img, Event, GeneratedImage, Generation, Outcome, StableDiffusion};
use crate::image_io::resize_lanczos;
use crate::limits::{image_fits, MAX_PIXELS, MAX_SIDE};
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
        /// Zero-based pass.
        pass: usize,
        /// Passes in all.
        passes: usize,
        /// Zero-based tile, row by row.
        tile: usize,
        /// Tiles in this pass.
        tiles: usize,
    },
    /// The tile in progress finished sampling step `step` of `steps`.
    Step {
        /// One-based step just taken.
        step: usize,
        /// Steps the tile takes.
        steps: usize,
    },
}

/// The seed of tile `tile` in pass `pass`.
pub fn tile_seed(seed: u64, pass: usize, tile: usize) -> u64 {
    seed.wrapping_add(1 + 10_000 * pass as u64 + tile as u64)
}

/// The size after `passes` ×2 passes, refused up front when it would be too large.
pub fn final_size(width: usize, height: usize, passes: usize) -> Result<(usize, usize)> {
    let factor = 1usize.checked_shl(passes as u32).unwrap_or(usize::MAX);
    let (w, h) = (width.saturating_mul(factor), height.saturating_mul(factor));
    if passes > 8 || !image_fits(w, h) {
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

/// Runs `hd`: `gen` gives the prompt, sampler, seed and the generation (= tile) size; `start`
/// replaces the generated base image when given. The finished image carries the request's seed
/// and an infotext with the redraw's settings appended; `None` when an event callback stopped
/// it.
pub fn hd(
    sd: &StableDiffusion,
    gen: &Generation,
    start: Option<&RgbImage>,
    upscaler: &Upscaler,
    opts: &HdOptions,
    on_event: &mut dyn FnMut(HdEvent) -> Flow,
) -> Result<Option<GeneratedImage>> {
    if opts.passes == 0 {
        return Err(Error::InvalidRequest("hd needs at least one pass".into()));
    }
    if !(opts.strength > 0.0 && opts.strength <= 1.0) {
        return Err(Error::InvalidRequest(format!(
            "hd strength must be in (0, 1], got {}",
            opts.strength
        )));
    }
    let single = gen.derive(|r| {
        (r.batch_size, r.n_iter, r.enable_hr) = (1, 1, false);
    })?;
    let (width, height) = (single.request.width, single.request.height);
    if opts.overlap >= width.min(height) {
        return Err(Error::InvalidRequest(format!(
            "tiles of {width}x{height} cannot overlap by {}: the overlap must be smaller than \
             a tile",
            opts.overlap
        )));
    }
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
            final_size(width, height, opts.passes)?;
            let outcome = txt2img(sd, &single, &mut |e| on_event(HdEvent::Base(e)))?;
            match only_image(outcome)? {
                Some(image) => image,
                None => return Ok(None),
            }
        }
    };
    final_size(image.width() as usize, image.height() as usize, opts.passes)?;

    let tile_gen = single.derive(|r| {
        r.denoising_strength = opts.strength;
        r.steps = opts.detail_steps.unwrap_or(r.steps);
        r.cfg_scale = opts.detail_scale.unwrap_or(r.cfg_scale);
    })?;
    for pass in 0..opts.passes {
        let (w, h) = (image.width() * 2, image.height() * 2);
        let enlarged = enlarge(upscaler, &image, w as usize, h as usize)?;
        image = match redraw(sd, &tile_gen, &enlarged, pass, opts, on_event)? {
            Some(image) => image,
            None => return Ok(None),
        };
    }
    let mut text = infotext::render(
        &single,
        &infotext::ImageFacts {
            seed: single.seed,
            model_name: sd.model_name.clone(),
            model_hash: sd.model_hash.clone(),
            img2img: false,
            fast: sd.fast(),
            lora_hashes: sd.lora_hashes(),
            ti_hashes: sd.ti_hashes(&single)?,
        },
    );
    text.push_str(&format!(
        ", SD upscale overlap: {}, SD upscale upscaler: {}, HD passes: {}, HD strength: {}, \
         HD steps: {}, HD scale: {}",
        opts.overlap,
        upscaler.name(),
        opts.passes,
        opts.strength,
        tile_gen.request.steps,
        tile_gen.request.cfg_scale
    ));
    Ok(Some(GeneratedImage {
        image,
        seed: single.seed,
        infotext: text,
    }))
}

/// The one image of a single-image run; `None` when it was stopped or skipped.
fn only_image(outcome: Outcome) -> Result<Option<RgbImage>> {
    if outcome.stopped {
        return Ok(None);
    }
    Ok(outcome
        .images
        .into_iter()
        .next()
        .map(|generated| generated.image))
}

/// One pass's redraw: img2img over every tile of `enlarged`, joined with ramps; `None` when
/// an event callback stopped it.
fn redraw(
    sd: &StableDiffusion,
    tile_gen: &Generation,
    enlarged: &RgbImage,
    pass: usize,
    opts: &HdOptions,
    on_event: &mut dyn FnMut(HdEvent) -> Flow,
) -> Result<Option<RgbImage>> {
    let (w, h) = (enlarged.width() as usize, enlarged.height() as usize);
    let tile_req = &tile_gen.request;
    let grid = tiles::grid(w, h, tile_req.width, tile_req.height, opts.overlap)?;
    let mut blender = Blender::new(3, w, h, opts.overlap);
    let base_seed = tile_gen.seed;
    for (index, &tile) in grid.iter().enumerate() {
        let started = HdEvent::Tile {
            pass,
            passes: opts.passes,
            tile: index,
            tiles: grid.len(),
        };
        if on_event(started) == Flow::Stop {
            return Ok(None);
        }
        let crop = image::imageops::crop_imm(
            enlarged,
            tile.x as u32,
            tile.y as u32,
            tile.width as u32,
            tile.height as u32,
        )
        .to_image();
        let tile_gen = tile_gen
            .derive(|r| (r.width, r.height) = (tile.width, tile.height))?
            .with_seed(tile_seed(base_seed, pass, index));
        let outcome = img2img(sd, &tile_gen, &crop, &mut |e| match e {
            Event::Step { step, steps, .. } => on_event(HdEvent::Step { step, steps }),
            Event::Image { .. } => Flow::Continue,
        })?;
        let Some(redrawn) = only_image(outcome)? else {
            return Ok(None);
        };
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
    Ok(Some(out))
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
