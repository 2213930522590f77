//! Tensor ↔ image conversion, init-image loading and resizing, grids, and the PNG
//! `parameters` text.

mod exif;
mod load;
mod resize;

use std::io::Write;

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::{Error, Result};

pub use exif::{read_user_comment, user_comment_exif};
pub use load::{decode_image, flatten_alpha, image_to_tensor, load_image};
pub use resize::{resize_for_mode, resize_lanczos, resize_region, ResampleFilter, ResizeMode};

/// The PNG text keyword A1111 stores the infotext under.
pub const PARAMETERS_KEY: &str = "parameters";

/// Converts decoded images `[B, 3, H, W]` in [-1, 1] to 8-bit RGB, as diffusers does:
/// `round(clamp(x/2 + 0.5, 0, 1) · 255)` with ties to even (numpy's rounding).
pub fn tensor_to_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (batch, channels, height, width) = images.dims4()?;
    if channels != 3 {
        return Err(Error::Image(format!(
            "expected 3 colour channels, got {channels}"
        )));
    }
    let unit = ((images.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let mut out = Vec::with_capacity(batch);
    for b in 0..batch {
        let chw: Vec<f32> = unit.get(b)?.flatten_all()?.to_vec1()?;
        let plane = height * width;
        let mut rgb = Vec::with_capacity(plane * 3);
        for p in 0..plane {
            for c in 0..3 {
                rgb.push((chw[c * plane + p] * 255.0).round_ties_even() as u8);
            }
        }
        let img = RgbImage::from_raw(width as u32, height as u32, rgb)
            .ok_or_else(|| Error::Image("image buffer has the wrong size".into()))?;
        out.push(img);
    }
    Ok(out)
}

/// Lays images out in a grid with `columns` per row (A1111's grid: no padding).
pub fn grid(images: &[RgbImage], columns: usize) -> Option<RgbImage> {
    let first = images.first()?;
    let (w, h) = first.dimensions();
    let columns = columns.clamp(1, images.len());
    let rows = images.len().div_ceil(columns);
    let mut out = RgbImage::new(w * columns as u32, h * rows as u32);
    for (i, img) in images.iter().enumerate() {
        let (x, y) = ((i % columns) as u32 * w, (i / columns) as u32 * h);
        image::imageops::replace(&mut out, img, x as i64, y as i64);
    }
    Some(out)
}

/// Encodes a PNG carrying `parameters` text: tEXt when it is Latin-1, else iTXt (as PIL,
/// and so A1111, does).
pub fn encode_png(img: &RgbImage, parameters: Option<&str>) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, img.width(), img.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            let latin1 = text.chars().all(|c| (c as u32) < 256);
            let added = if latin1 {
                encoder.add_text_chunk(PARAMETERS_KEY.into(), text.into())
            } else {
                encoder.add_itxt_chunk(PARAMETERS_KEY.into(), text.into())
            };
            added.map_err(|e| Error::Image(e.to_string()))?;
        }
        let mut writer = encoder
            .write_header()
            .map_err(|e| Error::Image(e.to_string()))?;
        writer
            .write_image_data(img.as_raw())
            .map_err(|e| Error::Image(e.to_string()))?;
    }
    Ok(bytes)
}

/// JPEG (quality 95) bytes of an image, with `parameters` (an infotext) as the EXIF
/// `UserComment`, where and as A1111 writes it.
pub fn encode_jpeg(img: &RgbImage, parameters: Option<&str>) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    let mut cursor = std::io::Cursor::new(&mut bytes);
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut cursor, 95);
    if let Some(text) = parameters {
        encoder
            .set_exif_metadata(user_comment_exif(text))
            .map_err(|e| Error::Image(e.to_string()))?;
    }
    encoder
        .encode_image(img)
        .map_err(|e| Error::Image(e.to_string()))?;
    cursor.flush().map_err(|e| Error::Image(e.to_string()))?;
    Ok(bytes)
}

/// The infotext an image file carries: a PNG's `parameters` text, or a JPEG's EXIF
/// `UserComment`; `None` for other files and for files without one.
pub fn read_parameters(bytes: &[u8]) -> Result<Option<String>> {
    if bytes.starts_with(b"\x89PNG") {
        return read_png_parameters(bytes);
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return Ok(read_jpeg_parameters(bytes));
    }
    Ok(None)
}

/// A JPEG's EXIF `UserComment`, if its headers read and it has one.
fn read_jpeg_parameters(bytes: &[u8]) -> Option<String> {
    use zune_core::bytestream::ZCursor;
    use zune_core::options::DecoderOptions;
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(
        ZCursor::new(bytes),
        DecoderOptions::default().set_strict_mode(true),
    );
    decoder.decode_headers().ok()?;
    let text = read_user_comment(decoder.exif()?)?;
    (!text.is_empty()).then_some(text)
}

/// Reads the `parameters` text of a PNG, if it has one.
pub fn read_png_parameters(png_bytes: &[u8]) -> Result<Option<String>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = decoder
        .read_info()
        .map_err(|e| Error::Image(format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    let found = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == PARAMETERS_KEY)
        .map(|t| t.text.clone())
        .or_else(|| {
            info.compressed_latin1_text
                .iter()
                .find(|t| t.keyword == PARAMETERS_KEY)
                .and_then(|t| t.get_text().ok())
        })
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|t| t.keyword == PARAMETERS_KEY)
                .and_then(|t| t.get_text().ok())
        });
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn an_a1111_jpeg_gives_its_infotext() {
        // tools/make_exif_fixture.py: Pillow and piexif, as A1111's save_image_with_geninfo.
        let jpeg = include_bytes!("../../../../tests/fixtures/reference/a1111_exif.jpg");
        let text = include_str!("../../../../tests/fixtures/reference/a1111_exif.txt");
        assert_eq!(read_parameters(jpeg).unwrap().as_deref(), Some(text));
    }

    #[test]
    fn jpegs_carry_the_infotext_as_exif_and_still_decode_strictly() {
        let img = RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 77]));
        let text = "a cat, (tabby:1.2)\nNegative prompt: dog\nSteps: 20, Seed: -5, Size: 24x16";
        let jpeg = encode_jpeg(&img, Some(text)).unwrap();
        assert_eq!(read_parameters(&jpeg).unwrap().as_deref(), Some(text));
        assert_eq!(decode_image(&jpeg).unwrap().dimensions(), (24, 16));
        let bare = encode_jpeg(&img, None).unwrap();
        assert_eq!(read_parameters(&bare).unwrap(), None);
        let png = encode_png(&img, Some(text)).unwrap();
        assert_eq!(read_parameters(&png).unwrap().as_deref(), Some(text));
        assert_eq!(read_parameters(b"GIF89a").unwrap(), None);
    }

    #[test]
    fn tensor_maps_minus_one_to_zero_and_one_to_255_with_ties_to_even() {
        // 0.5/255 below mid-grey sits exactly on a tie in float32 for some values; check
        // the ends and a value that rounds down under ties-to-even.
        let v = vec![
            -1f32,
            1.0,
            0.0,
            2.0,
            -3.0,
            0.5,
            0.25,
            -0.5,
            1.0 / 255.0 - 1.0,
            0.1,
            0.2,
            0.3,
        ];
        let t = Tensor::from_vec(v, (1, 3, 2, 2), &Device::Cpu).unwrap();
        let img = &tensor_to_images(&t).unwrap()[0];
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(1, 0).0[0], 255);
        assert_eq!(img.get_pixel(0, 1).0[0], 128); // 127.5 → 128 (even)
        assert_eq!(img.get_pixel(1, 1).0[0], 255); // clamped
        assert_eq!(img.get_pixel(0, 0).0[1], 0); // -3 clamped
        assert_eq!(img.get_pixel(1, 0).0[1], 191); // 0.75·255 = 191.25
    }

    #[test]
    fn png_parameters_round_trip_latin1_and_utf8() {
        let img = RgbImage::from_pixel(4, 2, image::Rgb([1, 2, 3]));
        for text in ["a cat\nSteps: 20, Seed: 1", "猫 🐱\nSteps: 1"] {
            let png = encode_png(&img, Some(text)).unwrap();
            assert_eq!(read_png_parameters(&png).unwrap().as_deref(), Some(text));
            let back = image::load_from_memory(&png).unwrap().to_rgb8();
            assert_eq!(back, img);
        }
    }

    #[test]
    fn grid_places_images_row_major() {
        let a = RgbImage::from_pixel(2, 2, image::Rgb([10, 0, 0]));
        let b = RgbImage::from_pixel(2, 2, image::Rgb([20, 0, 0]));
        let c = RgbImage::from_pixel(2, 2, image::Rgb([30, 0, 0]));
        let g = grid(&[a, b, c], 2).unwrap();
        assert_eq!(g.dimensions(), (4, 4));
        assert_eq!(g.get_pixel(3, 0).0[0], 20);
        assert_eq!(g.get_pixel(0, 3).0[0], 30);
        assert_eq!(g.get_pixel(3, 3).0[0], 0);
    }
}
