//! Arguments and files made to hurt, given to the real binary: each must end in a clear error
//! that names what was wrong (and the limit, where one was broken), with exit status 1 — no
//! signal, no panic, no hang — and nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny_model() -> String {
    fixtures()
        .join("tiny-sd1.safetensors")
        .display()
        .to_string()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdrs-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary folder");
    dir
}

fn sdrs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run sdrs")
}

/// Asserts a plain failure whose message holds every one of `expected`, and returns it.
fn refused(out: &Output, expected: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "want exit status 1, got {:?}: {stderr}",
        out.status
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{stderr}"
    );
    for e in expected {
        assert!(stderr.contains(e), "want {e:?} in: {stderr}");
    }
    stderr
}

/// The files under `dir`, recursively.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

fn txt2img(outdir: &Path, extra: &[&str]) -> Output {
    let model = tiny_model();
    let outdir = outdir.display().to_string();
    let mut args = vec![
        "txt2img", "--model", &model, "--H", "64", "--W", "64", "--seed", "1", "--outdir", &outdir,
    ];
    if !extra.contains(&"--steps") {
        args.extend(["--steps", "2"]);
    }
    args.extend_from_slice(extra);
    sdrs(&args)
}

#[test]
fn step_counts_past_the_schedule_are_refused_by_name() {
    let out = temp_dir("steps");
    for sampler in ["DDIM", "PLMS"] {
        let result = txt2img(&out, &["--steps", "1000", "--sampler", sampler]);
        refused(&result, &["MAX_TIMESTEP_STEPS", "1000", "999"]);
    }
    let result = txt2img(&out, &["--hires-scale", "2", "--hires-steps", "1000000000"]);
    refused(&result, &["MAX_STEPS", "1000000000"]);
    let result = txt2img(
        &out,
        &[
            "--hires-scale",
            "2",
            "--hires-steps",
            "20",
            "--hires-strength",
            "1e-300",
            "--sampler",
            "Euler",
        ],
    );
    refused(&result, &["MAX_SCHEDULE_STEPS"]);
    let result = sdrs(&["tokenize", "--steps", "100000000000", "[a|b]"]);
    refused(&result, &["MAX_STEPS", "100000000000"]);
    for (flag, value, limit) in [
        ("--size", "99999992", "MAX_PIXELS"),
        ("--steps", "99999992", "MAX_STEPS"),
        ("--repeats", "99999992", "MAX_BENCH_REPEATS"),
    ] {
        let result = sdrs(&["bench", "--model", &tiny_model(), flag, value]);
        refused(&result, &[limit]);
    }
    assert_eq!(files_in(&out), Vec::<PathBuf>::new());
}

#[test]
fn deeply_nested_prompts_are_refused_by_name() {
    let out = temp_dir("nesting");
    let prompt = "(".repeat(12_000);
    let result = txt2img(&out, &["--prompt", &prompt]);
    refused(&result, &["MAX_PROMPT_NESTING", "12000"]);
    let result = sdrs(&["tokenize", &"(".repeat(40_000)]);
    refused(&result, &["MAX_PROMPT_NESTING", "40000"]);
    assert_eq!(files_in(&out), Vec::<PathBuf>::new());
}

#[test]
fn overflowing_guidance_is_refused_as_nan_and_nothing_is_written() {
    let out = temp_dir("nan");
    let result = txt2img(&out, &["--scale", "1e308", "--skip-grid"]);
    refused(&result, &["NaN or infinite", "--no-nan-check"]);
    let images: Vec<_> = files_in(&out)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(images, Vec::<PathBuf>::new());
}

#[test]
fn a_folder_that_refuses_files_is_named() {
    let result = txt2img(Path::new("/proc"), &[]);
    refused(&result, &["/proc", "refuses new files"]);
}

#[test]
fn upscale_sizes_and_tiles_are_bounded_by_name() {
    let dir = temp_dir("upscale");
    let input = fixtures().join("upscale/input.png").display().to_string();
    let output = dir.join("out.png").display().to_string();
    let model = fixtures()
        .join("upscale/compact-x4.pth")
        .display()
        .to_string();
    for (args, expected) in [
        (vec!["--scale", "1000"], "MAX_UPSCALED_SIDE"),
        (vec!["--scale", "16777216"], "MAX_UPSCALED_SIDE"),
        (
            vec!["--model", &model, "--tile", "99999999999999"],
            "MAX_UPSCALE_TILE",
        ),
        (
            vec!["--model", &model, "--tile-pad", "18446744073709551615"],
            "MAX_UPSCALE_TILE",
        ),
    ] {
        let mut all = vec!["upscale"];
        all.extend(args.iter().copied());
        all.extend([input.as_str(), output.as_str()]);
        refused(&sdrs(&all), &[expected]);
    }
    // 5000² at 2x is 100 megapixels: within the side limit, over the pixel limit.
    let big = dir.join("big.png");
    image::RgbImage::new(5000, 5000)
        .save(&big)
        .expect("write big.png");
    let big = big.display().to_string();
    let result = sdrs(&["upscale", "--scale", "2", &big, &output]);
    refused(&result, &["MAX_UPSCALED_PIXELS", "10000x10000"]);
    assert!(!dir.join("out.png").exists());
}

#[test]
fn a_jpeg_that_cannot_hold_its_pixels_is_refused() {
    let dir = temp_dir("jpeg");
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(x * 16) as u8, (y * 16) as u8, 7])
    }))
    .write_to(
        &mut std::io::Cursor::new(&mut jpeg),
        image::ImageFormat::Jpeg,
    )
    .expect("encode");
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("frame header");
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0x1F, 0x40, 0x1F, 0x40]);
    let input = dir.join("claims-8000.jpg");
    std::fs::write(&input, &jpeg).expect("write");
    let output = dir.join("out.png");
    let result = sdrs(&[
        "upscale",
        "--scale",
        "1",
        &input.display().to_string(),
        &output.display().to_string(),
    ]);
    refused(&result, &["cannot hold the 8000x8000 pixels"]);
    assert!(!output.exists());
}

#[cfg(unix)]
#[test]
fn upscale_never_writes_through_a_link_and_one_of_two_racing_runs_wins() {
    let dir = temp_dir("links");
    let input = fixtures().join("upscale/input.png").display().to_string();
    let victim = dir.join("elsewhere.png");
    let link = dir.join("out.png");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    let result = sdrs(&[
        "upscale",
        "--scale",
        "2",
        &input,
        &link.display().to_string(),
    ]);
    refused(&result, &["exists", "not overwriting"]);
    assert!(!victim.exists(), "the link's target was created");

    let both = dir.join("both.png").display().to_string();
    let spawned: Vec<_> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_sdrs"))
                .args(["upscale", "--scale", "4", &input, &both])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let outputs: Vec<Output> = spawned
        .into_iter()
        .map(|child| child.wait_with_output().expect("wait"))
        .collect();
    let won = outputs.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "exactly one run writes the file");
    for lost in outputs.iter().filter(|o| !o.status.success()) {
        refused(lost, &["not overwriting"]);
    }
    let written = image::open(dir.join("both.png")).expect("a whole PNG");
    assert_eq!(written.width(), 23 * 4);
}
