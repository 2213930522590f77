//! The `sdrs` binary end to end on the tiny fixture model.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn sdrs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdrs"))
        .args(args)
        .output()
        .expect("run sdrs")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdrs-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn tiny_model() -> String {
    fixtures()
        .join("tiny-sd1.safetensors")
        .display()
        .to_string()
}

#[test]
fn txt2img_with_compvis_flags_writes_numbered_pngs_with_parameters_and_a_grid() {
    let out = temp_dir("batch");
    let model = tiny_model();
    let result = sdrs(&[
        "txt2img",
        "--ckpt",
        &model,
        "--prompt",
        "a tiny red fox",
        "--H",
        "64",
        "--W",
        "48",
        "--seed",
        "42",
        "--n_iter",
        "1",
        "--n_samples",
        "2",
        "--ddim_steps",
        "3",
        "--scale",
        "7.5",
        "--sampler",
        "Euler a",
        "--outdir",
        out.to_str().unwrap(),
        "--precision",
        "full",
        "--turbo",
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    for (name, seed) in [("00000-42.png", "42"), ("00001-43.png", "43")] {
        let bytes = std::fs::read(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let text = sdrs::image_io::read_png_parameters(&bytes)
            .unwrap()
            .expect("parameters");
        let info = sdrs::pipeline::infotext::parse(&text);
        assert_eq!(info.prompt, "a tiny red fox");
        assert_eq!(info.get("Seed"), Some(seed));
        assert_eq!(info.get("Size"), Some("48x64"));
        assert_eq!(info.get("Sampler"), Some("Euler a"));
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (48, 64));
    }
    let grid = image::open(out.join("grid-0000.png")).expect("grid");
    assert_eq!((grid.width(), grid.height()), (96, 64));

    // A second run continues the numbering and overwrites nothing.
    let again = sdrs(&[
        "txt2img",
        "--model",
        &model,
        "--height",
        "64",
        "--width",
        "48",
        "--seed",
        "7",
        "--steps",
        "2",
        "--sampler",
        "DDIM",
        "--out",
        out.to_str().unwrap(),
        "--skip_grid",
        "--format",
        "jpg",
    ]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(out.join("00002-7.jpg").exists());
    assert!(!out.join("grid-0001.jpg").exists());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn same_seed_gives_the_same_image() {
    let out = temp_dir("repro");
    let model = tiny_model();
    // The second run keeps one network resident at a time; with the fixture's f16 weights
    // that changes nothing in the image.
    for lowmem in [None, Some("--lowmem")] {
        let mut args = vec![
            "txt2img",
            "--model",
            &model,
            "--H",
            "64",
            "--W",
            "64",
            "--seed",
            "5",
            "--steps",
            "2",
            "--sampler",
            "Euler a",
            "--outdir",
            out.to_str().unwrap(),
        ];
        args.extend(lowmem);
        let r = sdrs(&args);
        assert!(r.status.success(), "{}", stderr(&r));
    }
    let a = image::open(out.join("00000-5.png")).unwrap().to_rgb8();
    let b = image::open(out.join("00001-5.png")).unwrap().to_rgb8();
    assert_eq!(a, b);
    std::fs::remove_dir_all(&out).unwrap();
}

fn assert_fails_with(args: &[&str], needle: &str) {
    let r = sdrs(args);
    let err = stderr(&r);
    assert!(!r.status.success(), "expected failure for {args:?}");
    assert!(
        err.contains(needle),
        "stderr for {args:?} lacks {needle:?}:\n{err}"
    );
    assert!(!err.contains("panicked"), "panic for {args:?}:\n{err}");
}

#[test]
fn bad_input_gets_a_clear_message() {
    let model = tiny_model();
    let out = temp_dir("bad");
    let o = out.to_str().unwrap();
    assert_fails_with(
        &["txt2img", "--model", &model, "--W", "500", "--outdir", o],
        "multiples of 8",
    );
    assert_fails_with(
        &[
            "txt2img", "--model", &model, "--W", "65536", "--H", "65536", "--outdir", o,
        ],
        "at most",
    );
    assert_fails_with(
        &[
            "txt2img",
            "--model",
            &model,
            "--sampler",
            "Euler b",
            "--outdir",
            o,
        ],
        "DPM++ 2M",
    );
    assert_fails_with(
        &[
            "txt2img",
            "--model",
            "/nonexistent/model.safetensors",
            "--outdir",
            o,
        ],
        "/nonexistent/model.safetensors",
    );
    let png = out.join("not-a-model.safetensors");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(&png, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    assert_fails_with(
        &["txt2img", "--model", png.to_str().unwrap(), "--outdir", o],
        "not-a-model.safetensors",
    );
    let blocker = out.join("file");
    std::fs::write(&blocker, b"").unwrap();
    let unwritable = blocker.join("sub");
    assert_fails_with(
        &[
            "txt2img",
            "--model",
            &model,
            "--outdir",
            unwritable.to_str().unwrap(),
        ],
        "output directory",
    );
    assert_fails_with(
        &[
            "txt2img", "--model", &model, "--device", "cuda", "--outdir", o,
        ],
        "CUDA",
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn tokenize_prints_ids_and_tokens_as_json() {
    let r = sdrs(&["tokenize", "a photo of an astronaut riding a horse, 4k!!"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).expect("json");
    let ids: Vec<u64> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [320, 1125, 539, 550, 18376, 6765, 320, 4558, 267, 275, 330, 748]
    );
    assert_eq!(v["tokens"][1], "photo</w>");
    assert_eq!(v["fits_one_chunk"], true);
    assert_eq!(v["parsed"]["reading"], "a1111");
    let long = "cat ".repeat(80);
    let r = sdrs(&["tokenize", &long]);
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).expect("json");
    assert_eq!(v["count"], 80);
    assert_eq!(v["fits_one_chunk"], false);
    assert_eq!(v["beyond_first_chunk"], "cat cat cat cat cat");
    let chunks = &v["parsed"]["parts"][0]["schedule"][0]["texts"][0]["chunks"];
    assert_eq!(chunks.as_array().map(Vec::len), Some(2));
    let r = sdrs(&["tokenize", "a [fox:bird:0.5]", "--steps", "10"]);
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).expect("json");
    let schedule = &v["parsed"]["parts"][0]["schedule"];
    assert_eq!(schedule[0]["until_step"], 5);
    assert_eq!(schedule[1]["texts"][0]["text"], "a bird");
    // 1.0 is the whole run on A1111's current timeline, step 1 on its old one.
    let edits = |extra: &[&str]| {
        let mut args = vec!["tokenize", "a [fox:bird:1.0]", "--steps", "10"];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_slice(&sdrs(&args).stdout).expect("json");
        v["parsed"]["parts"][0]["schedule"].as_array().map(Vec::len)
    };
    assert_eq!(edits(&[]), Some(1));
    assert_eq!(edits(&["--edit-timeline", "old"]), Some(2));
}

#[test]
fn tokenize_takes_lora_tags_out_and_lists_them() {
    let r = sdrs(&[
        "tokenize",
        "a fox <lora:detail:0.5:0.2>, snow <lyco:loha:unet=0.3> <hypernet:h:1>",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).expect("json");
    assert_eq!(v["text"], "a fox , snow  ");
    // The same ids as the prompt without its tags: no `<`, `lora` or `:` token.
    let plain: serde_json::Value =
        serde_json::from_slice(&sdrs(&["tokenize", "a fox , snow  "]).stdout).expect("json");
    assert_eq!(v["ids"], plain["ids"]);
    assert_eq!(v["parsed"], plain["parsed"]);
    let loras = v["loras"].as_array().expect("loras");
    assert_eq!(loras.len(), 2);
    assert_eq!(loras[0]["name"], "detail");
    assert_eq!(loras[0]["te"], 0.5);
    assert!((loras[0]["unet"].as_f64().unwrap() - 0.2).abs() < 1e-6);
    assert_eq!(loras[1]["name"], "loha");
    assert_eq!(loras[1]["te"], 1.0);
    assert!((loras[1]["unet"].as_f64().unwrap() - 0.3).abs() < 1e-6);
    assert_eq!(v["ignored_tags"], serde_json::json!(["hypernet"]));
    // A bad tag is the same error generation gives.
    let r = sdrs(&["tokenize", "a fox <lora:x:abc>"]);
    assert!(!r.status.success());
    assert!(stderr(&r).contains("<lora:x:abc>"), "{}", stderr(&r));
}

/// Writes a `w`×`h` RGBA PNG with a transparent left half and returns its path.
fn write_init_png(dir: &std::path::Path, w: u32, h: u32) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let img = image::RgbaImage::from_fn(w, h, |x, y| {
        let alpha = if x < w / 2 { 0 } else { 255 };
        image::Rgba([(x * 4) as u8, (y * 5) as u8, 90, alpha])
    });
    let path = dir.join(format!("init-{w}x{h}.png"));
    img.save(&path).unwrap();
    path
}

#[test]
fn img2img_keeps_the_init_size_rounded_to_8_or_fits_it_to_w_and_h() {
    let out = temp_dir("img2img");
    let model = tiny_model();
    let init = write_init_png(&out.join("in"), 50, 37);
    let o = out.join("samples");
    let r = sdrs(&[
        "img2img",
        "--model",
        &model,
        "--init-img",
        init.to_str().unwrap(),
        "--strength",
        "0.6",
        "--prompt",
        "a tiny red fox",
        "--seed",
        "3",
        "--steps",
        "4",
        "--sampler",
        "Euler a",
        "--outdir",
        o.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let bytes = std::fs::read(o.join("00000-3.png")).expect("image");
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (48, 32));
    let text = sdrs::image_io::read_png_parameters(&bytes)
        .unwrap()
        .expect("parameters");
    let info = sdrs::pipeline::infotext::parse(&text);
    assert_eq!(info.get("Denoising strength"), Some("0.6"));
    assert_eq!(info.get("Size"), Some("48x32"));

    for (mode, (w, h)) in [("fill", ("64", "48")), ("crop", ("40", "64"))] {
        let r = sdrs(&[
            "img2img",
            "--ckpt",
            &model,
            "--init_img",
            init.to_str().unwrap(),
            "--denoising-strength",
            "0.3",
            "--W",
            w,
            "--H",
            h,
            "--resize-mode",
            mode,
            "--seed",
            "4",
            "--ddim_steps",
            "3",
            "--sampler",
            "DDIM",
            "--outdir",
            o.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "{mode}: {}", stderr(&r));
    }
    let fill = image::open(o.join("00001-4.png")).expect("fill image");
    assert_eq!((fill.width(), fill.height()), (64, 48));
    let crop = image::open(o.join("00002-4.png")).expect("crop image");
    assert_eq!((crop.width(), crop.height()), (40, 64));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn img2img_bad_input_gets_a_clear_message() {
    let model = tiny_model();
    let out = temp_dir("img2img-bad");
    let o = out.join("samples");
    let o = o.to_str().unwrap();
    let init = write_init_png(&out, 16, 16);
    let init = init.to_str().unwrap();
    let run = |extra: &[&str], needle: &str| {
        let mut args = vec!["img2img", "--model", &model, "--outdir", o];
        args.extend_from_slice(extra);
        assert_fails_with(&args, needle);
    };
    run(
        &["--init-img", "/nonexistent/pic.png"],
        "/nonexistent/pic.png",
    );
    let text = out.join("notes.png");
    std::fs::write(&text, b"just some text").unwrap();
    run(
        &["--init-img", text.to_str().unwrap()],
        "not a PNG, JPEG or WebP",
    );
    run(
        &["--init-img", init, "--strength", "1.5"],
        "between 0 and 1",
    );
    run(
        &["--init-img", init, "--strength", "-0.5"],
        "between 0 and 1",
    );
    run(
        &["--init-img", init, "--resize-mode", "zoom"],
        "resize mode",
    );
    let tiny = write_init_png(&out, 5, 20);
    run(&["--init-img", tiny.to_str().unwrap()], "at least 8 pixels");
    run(&["--init-img", init, "--W", "60"], "multiples of 8");
    std::fs::remove_dir_all(&out).unwrap();
}

fn png_in(dir: &std::path::Path) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("outdir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "png"))
        .expect("a png in the outdir")
}

#[test]
fn hd_doubles_a_non_square_image_per_pass_and_says_how_in_its_parameters() {
    let out = temp_dir("hd");
    let model = tiny_model();
    let result = sdrs(&[
        "hd",
        "--model",
        &model,
        "--prompt",
        "a castle",
        "--W",
        "64",
        "--H",
        "40",
        "--seed",
        "5",
        "--steps",
        "4",
        "--sampler",
        "Euler",
        "--passes",
        "2",
        "--overlap",
        "16",
        "--detail-steps",
        "4",
        "--outdir",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let png = png_in(&out);
    let img = image::open(&png).expect("hd png").to_rgb8();
    assert_eq!(img.dimensions(), (256, 160));
    let bytes = std::fs::read(&png).expect("read");
    let text = sdrs::image_io::read_png_parameters(&bytes)
        .expect("png")
        .expect("parameters");
    assert!(
        text.contains("SD upscale overlap: 16") && text.contains("HD passes: 2"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&out);

    assert_fails_with(
        &[
            "hd", "--model", &model, "--passes", "6", "--W", "512", "--H", "512",
        ],
        "32768x32768",
    );

    // A network as the ×2 upscaler (a tiny random Real-ESRGAN compact x2 from the fixtures).
    let upscaler = fixtures().join("upscale/compact-x2.pth");
    let out = temp_dir("hd-model");
    let result = sdrs(&[
        "hd",
        "--model",
        &model,
        "--prompt",
        "a castle",
        "--W",
        "64",
        "--H",
        "64",
        "--seed",
        "5",
        "--steps",
        "3",
        "--sampler",
        "Euler",
        "--overlap",
        "16",
        "--upscaler",
        upscaler.to_str().unwrap(),
        "--outdir",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let png = png_in(&out);
    assert_eq!(
        image::open(&png).expect("png").to_rgb8().dimensions(),
        (128, 128)
    );
    let text = sdrs::image_io::read_png_parameters(&std::fs::read(&png).expect("read"))
        .expect("png")
        .expect("parameters");
    assert!(text.contains("SD upscale upscaler: compact-x2"), "{text}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn txt2img_hires_fix_writes_the_larger_image_with_a1111_hires_keys() {
    let out = temp_dir("hires");
    let model = tiny_model();
    let result = sdrs(&[
        "txt2img",
        "--model",
        &model,
        "--prompt",
        "a lake",
        "--W",
        "48",
        "--H",
        "64",
        "--seed",
        "9",
        "--steps",
        "3",
        "--sampler",
        "DPM++ 2M",
        "--hires-scale",
        "2",
        "--hires-steps",
        "2",
        "--hires-strength",
        "0.55",
        "--hires-upscaler",
        "lanczos",
        "--outdir",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let png = png_in(&out);
    let bytes = std::fs::read(&png).expect("read");
    let img = image::load_from_memory(&bytes).expect("png").to_rgb8();
    assert_eq!(img.dimensions(), (96, 128));
    let text = sdrs::image_io::read_png_parameters(&bytes)
        .expect("png")
        .expect("parameters");
    for key in [
        "Size: 48x64",
        "Denoising strength: 0.55",
        "Hires upscale: 2",
        "Hires steps: 2",
        "Hires upscaler: lanczos",
    ] {
        assert!(text.contains(key), "{key} missing from {text}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn prediction_flag_overrides_detection_and_rejects_unknown_types() {
    let model = fixtures().join("tiny-sd1").display().to_string();
    let run = |prediction: &str, name: &str| {
        let out = temp_dir(name);
        let r = sdrs(&[
            "txt2img",
            "--model",
            &model,
            "--prompt",
            "a boat",
            "--W",
            "64",
            "--H",
            "64",
            "--seed",
            "3",
            "--steps",
            "3",
            "--sampler",
            "Euler",
            "--prediction",
            prediction,
            "--outdir",
            out.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "{}", stderr(&r));
        let img = image::open(png_in(&out)).expect("png").to_rgb8();
        let _ = std::fs::remove_dir_all(&out);
        img
    };
    let eps = run("eps", "pred-eps");
    let v = run("v", "pred-v");
    let differing = eps
        .as_raw()
        .iter()
        .zip(v.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        differing > eps.as_raw().len() / 2,
        "only {differing} values differ"
    );
    assert_fails_with(
        &["txt2img", "--model", &model, "--prediction", "x0"],
        "unknown prediction type",
    );
}

#[test]
fn bench_reports_every_phase_with_the_flop_counts_of_the_model() {
    let out = sdrs(&[
        "bench",
        "--model",
        fixtures().join("tiny-sd1").to_str().unwrap(),
        "--size",
        "64",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let phases = report["phases"].as_array().unwrap();
    let names: Vec<_> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "load",
            "text encode",
            "UNet step (CFG)",
            "VAE decode",
            "whole image"
        ]
    );
    for p in phases {
        assert!(p["seconds"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["peak_rss_bytes"].as_u64().unwrap() > 0, "{p}");
    }
    // The counts of the flops module (itself checked against DESIGN's full-size figures) for
    // the tiny configs: prompt and negative of 77 tokens, the UNet at an 8² latent with
    // guidance, the VAE from 8² to 64², and the image as their sum over 2 steps.
    let ckpt = sdrs::weights::Checkpoint::open(&fixtures().join("tiny-sd1")).unwrap();
    let flops = sdrs::pipeline::flops::text_encode(ckpt.clip_config(), 77).total() * 2.0;
    assert_eq!(phases[1]["flops"].as_f64(), Some(flops));
    let step = sdrs::pipeline::flops::unet_cfg_step(ckpt.unet_config(), 8, 8, 77).total();
    assert_eq!(phases[2]["flops"].as_f64(), Some(step));
    let decode = sdrs::pipeline::flops::vae_decode(ckpt.vae_config(), 8, 8).total();
    assert_eq!(phases[3]["flops"].as_f64(), Some(decode));
    assert_eq!(
        phases[4]["flops"].as_f64(),
        Some(flops + 2.0 * step + decode)
    );

    let bad = sdrs(&[
        "bench",
        "--model",
        "tests/fixtures/tiny-sd1",
        "--size",
        "60",
    ]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("multiple of 8"), "{}", stderr(&bad));
    let missing = sdrs(&["bench", "--model", "/nonexistent/model.safetensors"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("/nonexistent/model.safetensors"));
}

#[test]
fn fast_mode_is_recorded_in_the_infotext_and_stays_close_to_the_exact_image() {
    let out = temp_dir("fast");
    let model = tiny_model();
    for fast in [None, Some("--fast")] {
        let mut args = vec![
            "txt2img", "--model", &model, "--H", "64", "--W", "64", "--seed", "7", "--steps", "3",
            "--outdir",
        ];
        args.push(out.to_str().unwrap());
        args.extend(fast);
        let r = sdrs(&args);
        assert!(r.status.success(), "{}", stderr(&r));
        let available = sdrs::fast_available();
        assert_eq!(
            stderr(&r).contains("running the exact f32 kernels"),
            fast.is_some() && !available,
            "{}",
            stderr(&r)
        );
    }
    let precision = |name: &str| {
        let bytes = std::fs::read(out.join(name)).unwrap();
        let text = sdrs::image_io::read_png_parameters(&bytes)
            .unwrap()
            .expect("parameters");
        sdrs::pipeline::infotext::parse(&text)
            .get("Precision")
            .map(String::from)
    };
    assert_eq!(precision("00000-7.png"), None);
    let want = sdrs::fast_available().then(|| "bf16".to_string());
    assert_eq!(precision("00001-7.png"), want);
    // The fast mode's tiny-model bound (tests/it/fast.rs in the library): mean under 2.5/255.
    let a = image::open(out.join("00000-7.png")).unwrap().to_rgb8();
    let b = image::open(out.join("00001-7.png")).unwrap().to_rgb8();
    let diffs: Vec<f64> = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| f64::from(x.abs_diff(*y)))
        .collect();
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    assert!(mean <= 2.5, "mean difference {mean}/255");

    let report = sdrs(&[
        "bench",
        "--model",
        &model,
        "--size",
        "64",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--json",
        "--fast",
    ]);
    assert!(report.status.success(), "{}", stderr(&report));
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).expect("JSON");
    assert_eq!(report["fast"].as_bool(), Some(sdrs::fast_available()));
    std::fs::remove_dir_all(&out).unwrap();
}
