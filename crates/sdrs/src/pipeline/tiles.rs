//! Overlapping tiles that cover a rectangle, and the linear-ramp blending that joins them.
//!
//! Placement follows A1111's `split_grid` (used by its SD-upscale script): along each axis,
//! `n = ceil((length − overlap) / (tile − overlap))` tiles, spread evenly so the first starts
//! at 0 and the last ends at the edge; every tile lies inside the rectangle and neighbours
//! overlap by at least `overlap`.

use crate::{Error, Result};

/// One tile: its top-left corner and size, in the units of the grid (pixels or latent cells).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    /// Left edge.
    pub x: usize,
    /// Top edge.
    pub y: usize,
    /// Width.
    pub width: usize,
    /// Height.
    pub height: usize,
}

/// Start positions of tiles of `tile` along an axis of `length`, neighbours overlapping by at
/// least `overlap`. A tile longer than the axis shrinks to it.
fn starts(length: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if tile >= length {
        return vec![0];
    }
    let count = (length - overlap).div_ceil(tile - overlap);
    let span = (length - tile) as f64;
    (0..count)
        .map(|i| {
            let x = (i as f64 * span / (count - 1) as f64) as usize;
            x.min(length - tile)
        })
        .collect()
}

/// The tiles, row by row, that cover a `width` × `height` rectangle.
pub fn grid(
    width: usize,
    height: usize,
    tile_width: usize,
    tile_height: usize,
    overlap: usize,
) -> Result<Vec<Tile>> {
    if width == 0 || height == 0 {
        return Err(Error::InvalidRequest(
            "nothing to tile: the size is 0".into(),
        ));
    }
    if overlap >= tile_width || overlap >= tile_height {
        return Err(Error::InvalidRequest(format!(
            "tiles of {tile_width}x{tile_height} cannot overlap by {overlap}: the overlap must be \
             smaller than the tile"
        )));
    }
    let (tw, th) = (tile_width.min(width), tile_height.min(height));
    let xs = starts(width, tile_width, overlap);
    let ys = starts(height, tile_height, overlap);
    Ok(ys
        .iter()
        .flat_map(|&y| {
            xs.iter().map(move |&x| Tile {
                x,
                y,
                width: tw,
                height: th,
            })
        })
        .collect())
}

/// Weight of position `i` of `len` along one axis: a linear ramp over `ramp` cells at each end
/// that faces another tile, 1 elsewhere. Ends at the rectangle's border are not ramped.
fn ramp_weight(i: usize, len: usize, ramp: usize, ramp_start: bool, ramp_end: bool) -> f32 {
    if ramp == 0 {
        return 1.0;
    }
    let mut w = 1.0f32;
    if ramp_start {
        w = w.min((i as f32 + 0.5) / ramp as f32);
    }
    if ramp_end {
        w = w.min(((len - 1 - i) as f32 + 0.5) / ramp as f32);
    }
    w.clamp(0.0, 1.0)
}

/// Accumulates tiles of a `channels` × `height` × `width` planar float image, each weighted by
/// linear ramps over `ramp` cells where it meets a neighbour, and returns their weighted mean.
pub struct Blender {
    channels: usize,
    width: usize,
    height: usize,
    ramp: usize,
    sum: Vec<f32>,
    weight: Vec<f32>,
}

impl Blender {
    /// An empty accumulator; `ramp` is the blend width (usually the tiles' overlap).
    pub fn new(channels: usize, width: usize, height: usize, ramp: usize) -> Self {
        Self {
            channels,
            width,
            height,
            ramp,
            sum: vec![0.0; channels * width * height],
            weight: vec![0.0; width * height],
        }
    }

    /// Adds a tile's planar data (`channels` × `tile.height` × `tile.width`).
    pub fn add(&mut self, tile: Tile, data: &[f32]) -> Result<()> {
        let plane = tile.width * tile.height;
        if data.len() != self.channels * plane
            || tile.x + tile.width > self.width
            || tile.y + tile.height > self.height
        {
            return Err(Error::InvalidRequest(format!(
                "tile {tile:?} with {} values does not fit a {}x{}x{} image",
                data.len(),
                self.channels,
                self.height,
                self.width
            )));
        }
        let (left, right) = (tile.x > 0, tile.x + tile.width < self.width);
        let (top, bottom) = (tile.y > 0, tile.y + tile.height < self.height);
        let wx: Vec<f32> = (0..tile.width)
            .map(|i| ramp_weight(i, tile.width, self.ramp, left, right))
            .collect();
        for ty in 0..tile.height {
            let wy = ramp_weight(ty, tile.height, self.ramp, top, bottom);
            let row = (tile.y + ty) * self.width + tile.x;
            for tx in 0..tile.width {
                let w = wy * wx[tx];
                self.weight[row + tx] += w;
                for c in 0..self.channels {
                    let v = data[c * plane + ty * tile.width + tx];
                    self.sum[c * self.width * self.height + row + tx] += w * v;
                }
            }
        }
        Ok(())
    }

    /// The blended image, planar; cells no tile covered are 0.
    pub fn finish(mut self) -> Vec<f32> {
        let plane = self.width * self.height;
        for c in 0..self.channels {
            for (v, &w) in self.sum[c * plane..(c + 1) * plane]
                .iter_mut()
                .zip(&self.weight)
            {
                if w > 0.0 {
                    *v /= w;
                }
            }
        }
        self.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_cover(width: usize, height: usize, tw: usize, th: usize, overlap: usize) {
        let tiles = grid(width, height, tw, th, overlap).unwrap();
        let mut covered = vec![0u32; width * height];
        for t in &tiles {
            assert!(
                t.x + t.width <= width && t.y + t.height <= height,
                "{t:?} outside"
            );
            for y in t.y..t.y + t.height {
                for x in t.x..t.x + t.width {
                    covered[y * width + x] += 1;
                }
            }
        }
        let missing = covered.iter().position(|&c| c == 0);
        assert_eq!(
            missing, None,
            "{width}x{height} tile {tw}x{th} ov {overlap}"
        );
        // Neighbours along each axis overlap by at least `overlap`.
        let xs: Vec<usize> = tiles.iter().filter(|t| t.y == 0).map(|t| t.x).collect();
        for pair in xs.windows(2) {
            assert!(pair[0] + tw.min(width) >= pair[1] + overlap, "{xs:?}");
        }
    }

    #[test]
    fn tiles_cover_square_and_non_square_images() {
        check_cover(1024, 1024, 512, 512, 64);
        check_cover(1536, 1024, 512, 512, 64);
        check_cover(1000, 700, 512, 384, 64);
        check_cover(2048, 1536, 768, 512, 128);
        check_cover(300, 200, 512, 512, 64);
        check_cover(513, 512, 512, 512, 0);
    }

    #[test]
    fn placement_matches_a1111_split_grid() {
        // A1111: cols = ceil((1024 − 64) / 448) = 3, dx = 512 / 2 = 256 → x = 0, 256, 512.
        let xs: Vec<usize> = grid(1024, 512, 512, 512, 64)
            .unwrap()
            .iter()
            .map(|t| t.x)
            .collect();
        assert_eq!(xs, vec![0, 256, 512]);
        // 1000 wide: cols = ceil(936 / 448) = 3, dx = 244 → 0, 244, 488.
        let xs: Vec<usize> = grid(1000, 512, 512, 512, 64)
            .unwrap()
            .iter()
            .map(|t| t.x)
            .collect();
        assert_eq!(xs, vec![0, 244, 488]);
    }

    #[test]
    fn overlap_not_smaller_than_tile_is_refused() {
        assert!(grid(1024, 1024, 64, 64, 64).is_err());
        assert!(grid(0, 1024, 64, 64, 8).is_err());
    }

    #[test]
    fn blending_a_constant_gives_the_constant() {
        let (w, h) = (37, 23);
        let tiles = grid(w, h, 16, 12, 5).unwrap();
        let mut blender = Blender::new(2, w, h, 5);
        for t in &tiles {
            blender
                .add(*t, &vec![0.25; 2 * t.width * t.height])
                .unwrap();
        }
        let out = blender.finish();
        let worst = out.iter().map(|v| (v - 0.25).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-6, "worst {worst}");
    }

    #[test]
    fn ramps_weigh_each_tile_towards_its_own_middle() {
        // Two 4-wide tiles over 6 cells with a 2-cell overlap: cells 2 and 3 are shared.
        let tiles = grid(6, 3, 4, 3, 2).unwrap();
        assert_eq!(tiles.len(), 2);
        let mut blender = Blender::new(1, 6, 3, 2);
        blender.add(tiles[0], &[0.0; 12]).unwrap();
        blender.add(tiles[1], &[1.0; 12]).unwrap();
        let out = &blender.finish()[6..12];
        // Left tile weights at cells 2, 3: 0.75, 0.25; right tile: 0.25, 0.75.
        let want = [0.0, 0.0, 0.25, 0.75, 1.0, 1.0];
        for (i, (g, w)) in out.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-6, "cell {i}: {g} vs {w}");
        }
    }
}
