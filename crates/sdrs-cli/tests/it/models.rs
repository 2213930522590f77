//! The first run without `--model`, and `sdrs models`, against a Hub stand-in in the test
//! process that serves the tiny SD 2 (v-prediction) folder as `stabilityai/sd-turbo`.

// The library tests' Hub stand-in, of which these tests use a part.
#[allow(dead_code)]
#[path = "../../../sdrs/tests/it/common/fake_hub.rs"]
mod fake_hub;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fake_hub::FakeHub;

fn tiny_folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd2-v")
}

fn serve_turbo() -> FakeHub {
    fake_hub::serving_turbo(&tiny_folder())
}

/// Runs sdrs with a private Hub cache and model folder, and the Hub at `endpoint`.
fn sdrs(root: &Path, endpoint: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdrs"));
    for var in [
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "SDRS_DEFAULT_MODEL",
        "XDG_CACHE_HOME",
        "XDG_DATA_HOME",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", root.join("hf"))
        .env("SDRS_MODEL_DIR", root.join("models"))
        .args(args)
        .output()
        .expect("run sdrs")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdrs-models-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn parameters(png: &Path) -> sdrs::pipeline::infotext::Infotext {
    let bytes = std::fs::read(png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    let text = sdrs::image_io::read_png_parameters(&bytes)
        .unwrap()
        .expect("parameters");
    sdrs::pipeline::infotext::parse(&text)
}

#[test]
fn txt2img_without_a_model_downloads_sd_turbo_and_uses_its_settings() {
    let server = serve_turbo();
    let root = temp_dir("first-run");
    let out = root.join("out");
    // A 64² fox with seed 5 into `outdir`, plus `extra` flags.
    let fox = |endpoint: &str, outdir: &Path, extra: &[&str]| {
        let mut args = vec!["txt2img", "--prompt", "a red fox", "--W", "64", "--H", "64"];
        args.extend(["--seed", "5", "--outdir", outdir.to_str().unwrap()]);
        args.extend(extra);
        let run = sdrs(&root, endpoint, &args);
        assert!(run.status.success(), "{}", text(&run.stderr));
    };
    fox(&server.endpoint, &out, &[]);
    let info = parameters(&out.join("00000-5.png"));
    assert_eq!(info.get("Model"), Some("sd-turbo"));
    assert_eq!(info.get("Steps"), Some("1"));
    assert_eq!(info.get("Sampler"), Some("Euler a"));
    assert_eq!(info.get("Schedule type"), Some("SGM Uniform"));
    assert_eq!(info.get("CFG scale"), Some("1"));

    // The same image as from the folder the stand-in served, given the same settings.
    let folder = tiny_folder();
    fox(
        "http://127.0.0.1:9",
        &root.join("local"),
        &[
            "--model",
            folder.to_str().unwrap(),
            "--steps",
            "1",
            "--sampler",
            "Euler a",
            "--schedule",
            "sgm_uniform",
            "--scale",
            "1",
        ],
    );
    let a = image::open(out.join("00000-5.png")).unwrap().to_rgb8();
    let b = image::open(root.join("local/00000-5.png"))
        .unwrap()
        .to_rgb8();
    assert!(a == b, "the downloaded model drew a different image");

    // The second run finds the model in the cache: no Hub needed.
    fox("http://127.0.0.1:9", &out, &[]);
    assert!(out.join("00001-5.png").exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn models_list_pull_and_rm() {
    let server = serve_turbo();
    let root = temp_dir("manage");
    // A LoRA and an embedding beside the model folder are listed by name.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for (folder, file) in [
        ("loras", "lora/loha.safetensors"),
        ("embeddings", "embeddings/sdrsfox.pt"),
    ] {
        std::fs::create_dir_all(root.join(folder)).unwrap();
        let name = Path::new(file).file_name().unwrap();
        std::fs::copy(fixtures.join(file), root.join(folder).join(name)).unwrap();
    }
    let list = sdrs(&root, &server.endpoint, &["models", "list"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    let listed = text(&list.stdout);
    let loras = format!(
        "LoRA folder {} (<lora:NAME:1>):\n    loha\n",
        root.join("loras").display()
    );
    assert!(listed.contains(&loras), "{listed}");
    assert!(
        listed.contains("(by name in a prompt):\n    sdrsfox\n"),
        "{listed}"
    );
    assert!(listed.contains("sd-turbo (default)"), "{listed}");
    assert!(
        listed.contains("stable-diffusion-v1-5/stable-diffusion-v1-5"),
        "{listed}"
    );
    assert!(listed.contains("stabilityai/sdxl-turbo"), "{listed}");
    assert_eq!(listed.matches("not downloaded").count(), 5, "{listed}");

    let pull = sdrs(&root, &server.endpoint, &["models", "pull", "sd-turbo"]);
    assert!(pull.status.success(), "{}", text(&pull.stderr));
    let snapshot = PathBuf::from(text(&pull.stdout).trim());
    assert!(snapshot.starts_with(root.join("hf/hub/models--stabilityai--sd-turbo")));
    assert!(snapshot.join("unet/config.json").exists());

    let list = text(&sdrs(&root, &server.endpoint, &["models", "list"]).stdout);
    assert!(list.contains(&format!("{}", snapshot.display())), "{list}");
    assert_eq!(list.matches("not downloaded").count(), 4, "{list}");

    let rm = sdrs(&root, &server.endpoint, &["models", "rm", "sd-turbo"]);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert!(text(&rm.stderr).contains("removed sd-turbo"));
    assert!(!snapshot.exists());

    let unknown = sdrs(&root, &server.endpoint, &["models", "pull", "sd-9"]);
    assert!(!unknown.status.success());
    assert!(text(&unknown.stderr).contains("known models: sd-turbo, sd-1.5, sd-2.1"));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn an_unreachable_hub_gives_one_clear_message() {
    let root = temp_dir("offline");
    let run = sdrs(
        &root,
        "http://127.0.0.1:9",
        &[
            "txt2img",
            "--prompt",
            "a fox",
            "--seed",
            "1",
            "--outdir",
            root.join("out").to_str().unwrap(),
        ],
    );
    assert!(!run.status.success());
    let err = text(&run.stderr);
    assert!(err.contains("could not download sd-turbo"), "{err}");
    assert!(err.contains("sd-turbo.safetensors"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    assert!(err
        .trim()
        .lines()
        .last()
        .unwrap()
        .starts_with("error: could not download"));
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}
