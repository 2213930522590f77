//! `sdrs upscale` end to end on the upscaler fixtures.

use std::path::PathBuf;
use std::process::{Command, Output};

fn upscale_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/upscale")
}

fn fixture(name: &str) -> String {
    upscale_fixtures().join(name).display().to_string()
}

fn sdrs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .arg("upscale")
        .args(args)
        .output()
        .expect("run sdrs")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdrs-upscale-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read(path: &std::path::Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn max_difference(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[test]
fn upscale_with_a_model_in_tiles_matches_realesrganer() {
    let dir = temp_dir("model");
    let out = dir.join("big.png");
    let r = sdrs(&[
        "--model",
        &fixture("rrdb-x4-old.safetensors"),
        "--tile",
        "8",
        "--tile-pad",
        "3",
        &fixture("input.png"),
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let want = read(&upscale_fixtures().join("rrdb-x4-tile8-pad3.png"));
    let diff = max_difference(&read(&out), &want);
    assert!(
        diff <= 1,
        "max difference {diff}/255 to RealESRGANer's tiles"
    );
    // Never overwrites.
    let again = sdrs(&[
        "--model",
        &fixture("rrdb-x4.pth"),
        &fixture("input.png"),
        out.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not overwriting"));
}

#[test]
fn upscale_without_a_model_is_lanczos() {
    let dir = temp_dir("lanczos");
    let out = dir.join("big.png");
    let r = sdrs(&["--scale", "2", &fixture("input.png"), out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(read(&out).dimensions(), (46, 34));
}

fn assert_fails_with(args: &[&str], needle: &str) {
    let dir = temp_dir("bad");
    let out = dir.join("out.png");
    let mut all: Vec<&str> = args.to_vec();
    all.push(out.to_str().unwrap());
    let r = sdrs(&all);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "expected failure for {args:?}");
    assert!(
        err.contains(needle),
        "stderr for {args:?} lacks {needle:?}:\n{err}"
    );
    assert!(!err.contains("panicked"), "panic for {args:?}:\n{err}");
    assert!(!out.exists(), "{args:?} wrote an output");
}

#[test]
fn bad_input_gets_a_clear_message() {
    let input = fixture("input.png");
    let unknown = fixture("not-an-upscaler.safetensors");
    assert_fails_with(
        &["--model", &unknown, &input],
        "supported upscalers: RRDBNet",
    );
    let x2 = fixture("compact-x2.safetensors");
    assert_fails_with(
        &["--model", &x2, "--scale", "4", &input],
        "upscales 2x only",
    );
    let x4 = fixture("compact-x4.pth");
    assert_fails_with(
        &["--model", &x4, "--tile", "8", "--tile-pad", "10", &input],
        "must be larger than the tile overlap",
    );
    assert_fails_with(&["--model", &input, &input], "it is an image");
}
