//! Reading init images: PNG, JPEG or WebP → 8-bit RGB → the VAE's input tensor.
//!
//! Conventions (A1111's): the EXIF orientation is applied; an alpha channel is flattened onto
//! white (A1111's default `img2img_background_color`, #ffffff) with Pillow's
//! `Image.alpha_composite` integer arithmetic; 16-bit and grey images become 8-bit RGB.

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage, RgbaImage};

use crate::limits::{MAX_INPUT_PIXELS, MAX_INPUT_SIDE};
use crate::{Error, Result};

/// Reads an init image from a file (see [`decode_image`]).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes).map_err(|e| match e {
        Error::Image(reason) => Error::Image(format!("{}: {reason}", path.display())),
        other => other,
    })
}

/// Decodes a PNG, JPEG or WebP image to 8-bit RGB, its alpha flattened onto white; images
/// over [`MAX_INPUT_SIDE`] or [`MAX_INPUT_PIXELS`] are refused before they are decoded.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image(e.to_string()))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Some(other) => {
            return Err(Error::Image(format!(
                "{other:?} images are not supported; use PNG, JPEG or WebP"
            )))
        }
        None => return Err(Error::Image("not a PNG, JPEG or WebP image".into())),
    };
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| Error::Image(format!("cannot read the image: {e}")))?;
    let (width, height) = decoder.dimensions();
    if width > MAX_INPUT_SIDE
        || height > MAX_INPUT_SIDE
        || width as u64 * height as u64 > MAX_INPUT_PIXELS
    {
        return Err(Error::Image(format!(
            "the image is {width}x{height}; at most {MAX_INPUT_SIDE} pixels a side and \
             {MAX_INPUT_PIXELS} pixels in all are accepted"
        )));
    }
    if width == 0 || height == 0 {
        return Err(Error::Image("the image is empty".into()));
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(1 << 30);
    decoder
        .set_limits(limits)
        .map_err(|e| Error::Image(e.to_string()))?;
    let orientation = decoder.orientation().ok();
    let decoded = if format == ImageFormat::Jpeg {
        decode_jpeg_strictly(bytes, width, height)
    } else {
        DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())
    };
    let mut img = decoded.map_err(|e| Error::Image(format!("cannot decode the image: {e}")))?;
    if let Some(orientation) = orientation {
        img.apply_orientation(orientation);
    }
    Ok(if img.color().has_alpha() {
        flatten_alpha(&img.to_rgba8())
    } else {
        img.to_rgb8()
    })
}

/// Decodes a JPEG to RGB, refusing one whose data ends before its pixels do. The image crate
/// runs the same decoder leniently, which fills what is missing with grey: a 4 KB file whose
/// header claims 8000² pixels would pass as a grey picture.
fn decode_jpeg_strictly(
    bytes: &[u8],
    width: u32,
    height: u32,
) -> std::result::Result<DynamicImage, String> {
    // Every 8×8 block of the luma plane costs at least one bit (its DC code) in some scan of
    // a Huffman-coded JPEG, so a file smaller than that cannot hold the pixels it claims.
    // Strict mode alone misses a scan that stops at a marker: the decoder pads with zeros.
    let blocks = (width as u64).div_ceil(8) * (height as u64).div_ceil(8);
    if (bytes.len() as u64) * 8 < blocks {
        return Err(format!(
            "{} bytes cannot hold the {width}x{height} pixels the JPEG claims (truncated or \
             corrupt)",
            bytes.len()
        ));
    }
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(width as usize)
        .set_max_height(height as usize)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let pixels = decoder.decode().map_err(|e| e.to_string())?;
    RgbImage::from_raw(width, height, pixels)
        .map(DynamicImage::ImageRgb8)
        .ok_or_else(|| "the decoded pixels do not fill the image".to_string())
}

/// Composites an RGBA image over white exactly as Pillow's `Image.alpha_composite(white, img)`.
pub fn flatten_alpha(img: &RgbaImage) -> RgbImage {
    // Pillow's AlphaComposite.c with an opaque white destination: 7 extra bits of precision,
    // divisions by 255 done as shifts.
    const BITS: u32 = 7;
    let div255 = |v: u32| ((v >> 8) + v) >> 8;
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b, a] = img.get_pixel(x, y).0;
        let a = a as u32;
        if a == 0 {
            return image::Rgb([255, 255, 255]);
        }
        let out_a255 = a * 255 + 255 * (255 - a);
        let coef1 = a * 255 * 255 * (1 << BITS) / out_a255;
        let coef2 = 255 * (1 << BITS) - coef1;
        let blend = |c: u8| (div255(c as u32 * coef1 + 255 * coef2 + (0x80 << BITS)) >> BITS) as u8;
        image::Rgb([blend(r), blend(g), blend(b)])
    })
}

/// An RGB image as the VAE's input `[1, 3, H, W]` in [-1, 1]: `2·(v/255) − 1` in float32,
/// as diffusers' `VaeImageProcessor` computes it.
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut chw = vec![0f32; 3 * plane];
    for (p, px) in img.pixels().enumerate() {
        for c in 0..3 {
            chw[c * plane + p] = 2.0 * (px.0[c] as f32 / 255.0) - 1.0;
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, h, w), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_is_flattened_onto_white() {
        let img = RgbaImage::from_vec(
            4,
            1,
            vec![
                10, 20, 30, 0, 10, 20, 30, 255, 0, 0, 0, 128, 200, 100, 50, 64,
            ],
        )
        .unwrap();
        let flat = flatten_alpha(&img);
        assert_eq!(flat.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(flat.get_pixel(1, 0).0, [10, 20, 30]);
        // Half-transparent black over white is mid-grey (Pillow gives 127).
        assert_eq!(flat.get_pixel(2, 0).0, [127, 127, 127]);
        // 200·64/255 + 255·191/255 = 241.2, 100·… = 216.1, 50·… = 203.6 (Pillow: 241, 216, 204).
        assert_eq!(flat.get_pixel(3, 0).0, [241, 216, 204]);
    }

    #[test]
    fn png_with_alpha_decodes_flattened_and_garbage_is_refused() {
        let img = RgbaImage::from_pixel(3, 2, image::Rgba([0, 0, 0, 0]));
        let mut png = Vec::new();
        image::DynamicImage::ImageRgba8(img)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let rgb = decode_image(&png).unwrap();
        assert_eq!(rgb.dimensions(), (3, 2));
        assert_eq!(rgb.get_pixel(1, 1).0, [255, 255, 255]);
        let err = decode_image(b"hello, not an image")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a PNG, JPEG or WebP"), "{err}");
        let err = decode_image(&png[..40]).unwrap_err().to_string();
        assert!(err.contains("image"), "{err}");
    }

    #[test]
    fn huge_images_are_refused_before_decoding() {
        // A 1×1 PNG whose header is patched to claim 20000 × 20000 pixels.
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(RgbImage::new(1, 1))
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        png[16..20].copy_from_slice(&20000u32.to_be_bytes());
        png[20..24].copy_from_slice(&20000u32.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&png[12..29]);
        png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        let err = decode_image(&png).unwrap_err().to_string();
        assert!(
            err.contains("20000x20000") && err.contains("at most"),
            "{err}"
        );
    }

    fn jpeg(img: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
            .unwrap();
        out
    }

    fn noise(width: u32, height: u32) -> RgbImage {
        let mut state = 7u32;
        RgbImage::from_fn(width, height, |_, _| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let [a, b, c, _] = state.to_le_bytes();
            image::Rgb([a, b, c])
        })
    }

    #[test]
    fn jpegs_decode_as_the_image_crate_decodes_them() {
        let colour = jpeg(DynamicImage::ImageRgb8(noise(67, 45)));
        let grey = jpeg(DynamicImage::ImageLuma8(
            DynamicImage::ImageRgb8(noise(33, 20)).to_luma8(),
        ));
        for bytes in [colour, grey] {
            let want = image::load_from_memory(&bytes).unwrap().to_rgb8();
            let got = decode_image(&bytes).unwrap();
            assert!(got.dimensions() == want.dimensions() && got.as_raw() == want.as_raw());
        }
    }

    #[test]
    fn jpegs_without_their_pixels_are_refused() {
        let full = jpeg(DynamicImage::ImageRgb8(noise(256, 256)));
        let truncated = &full[..full.len() / 2];
        assert!(
            image::load_from_memory(truncated).is_ok(),
            "the lenient decoder accepts it"
        );
        let refusal = |bytes: &[u8]| match decode_image(bytes) {
            Ok(img) => panic!("a {:?} image was accepted", img.dimensions()),
            Err(e) => e.to_string(),
        };
        let err = refusal(truncated);
        assert!(err.contains("cannot decode"), "{err}");
        // A small JPEG whose frame header is patched to claim 8000 × 8000 pixels.
        let mut small = jpeg(DynamicImage::ImageRgb8(noise(16, 16)));
        let sof = small
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("a baseline frame header");
        small[sof + 5..sof + 7].copy_from_slice(&8000u16.to_be_bytes());
        small[sof + 7..sof + 9].copy_from_slice(&8000u16.to_be_bytes());
        assert!(small.len() < 4096);
        let err = refusal(&small);
        assert!(err.contains("cannot hold the 8000x8000 pixels"), "{err}");
        // The same for a PNG: its decoder finds the image data short.
        let mut png = Vec::new();
        DynamicImage::ImageRgb8(noise(16, 16))
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        png[16..20].copy_from_slice(&8000u32.to_be_bytes());
        png[20..24].copy_from_slice(&8000u32.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&png[12..29]);
        png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        let err = refusal(&png);
        assert!(err.contains("cannot decode"), "{err}");
    }

    #[test]
    fn tensor_is_in_minus_one_to_one_planar() {
        let img = RgbImage::from_vec(2, 1, vec![0, 255, 51, 255, 0, 0]).unwrap();
        let t = image_to_tensor(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 1, 2]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v[0], -1.0);
        assert_eq!(v[1], 1.0);
        assert!((v[4] - (2.0 * 51.0 / 255.0 - 1.0)).abs() < 1e-7);
    }
}
