//! `sdrs serve` as a process on a real socket, driven by the clients people use: the
//! `webuiapi` Python package, and headless Chromium on the web page.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `sdrs serve`, stopped when dropped.
struct Served {
    child: Child,
    port: u16,
}

impl Served {
    fn start(args: &[&str]) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_sdrs"))
            .arg("serve")
            .args(["--listen", &listen])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while TcpStream::connect(&listen).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the server did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }

    /// A plain HTTP GET: the status line and the body.
    fn get(&self, path: &str) -> (String, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn models_dir() -> PathBuf {
    let dir = scratch("models");
    std::fs::copy(
        fixtures().join("tiny-sd1.safetensors"),
        dir.join("tiny.safetensors"),
    )
    .unwrap();
    std::fs::copy(fixtures().join("tiny-sd1.ckpt"), dir.join("other.ckpt")).unwrap();
    dir
}

fn found(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A virtual environment with `webuiapi`, made once per target folder.
fn webuiapi_python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("webuiapi-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(".installed");
    if !ready.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(made.success(), "python3 -m venv failed");
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "-q", "webuiapi==0.9.17"])
            .status()
            .unwrap();
        assert!(
            installed.success(),
            "pip install webuiapi failed (PyPI is needed for this test)"
        );
        std::fs::write(&ready, b"").unwrap();
    }
    python
}

#[test]
fn the_webuiapi_package_drives_the_server_unchanged() {
    if !found("python3") {
        eprintln!("SKIPPED the webuiapi test: python3 is not installed");
        return;
    }
    let python = webuiapi_python();
    let models = models_dir();
    let outdir = scratch("webuiapi-out");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webuiapi_client.py");
    for auth in [None, Some("alice:s3cret")] {
        let model = models.join("tiny.safetensors");
        let mut args = vec![
            "--models-dir",
            models.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--outdir",
            outdir.to_str().unwrap(),
        ];
        if let Some(auth) = auth {
            args.extend(["--api-auth", auth]);
        }
        let server = Served::start(&args);
        let mut client = Command::new(&python);
        client.arg(&script).args([
            server.port.to_string(),
            "tiny.safetensors".into(),
            "other.ckpt".into(),
        ]);
        if let Some(auth) = auth {
            client.arg(auth);
        }
        let out = client.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "the webuiapi client failed");
        assert!(stdout.contains("webuiapi client: ok"));
    }
    // Every image the clients were sent is also on disk.
    let saved = std::fs::read_dir(outdir.join("txt2img-samples"))
        .unwrap()
        .count();
    assert_eq!(saved, 2 * 3);
}

#[test]
fn headless_chromium_generates_an_image_on_the_web_page() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdrs-server/tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let missing = if !found("node") {
        Some("node is not installed")
    } else if !Path::new(&chromium).exists() {
        Some("chromium is not installed (Debian package `chromium`)")
    } else if !browser_dir.join("node_modules/playwright-core").exists() {
        Some("playwright-core is not installed (npm ci in crates/sdrs-server/tests/browser)")
    } else {
        None
    };
    if let Some(why) = missing {
        eprintln!("SKIPPED the browser test: {why}; .ci/run installs these where it can");
        return;
    }
    let outdir = scratch("browser-out");
    let model = fixtures().join("tiny-sd1.safetensors");
    let server = Served::start(&[
        "--model",
        model.to_str().unwrap(),
        "--outdir",
        outdir.to_str().unwrap(),
    ]);
    let (status, page) = server.get("/");
    assert!(status.contains("200"), "{status}");
    assert!(page.contains("<title>sdrs</title>"));
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-page.png");
    let out = Command::new("node")
        .current_dir(&browser_dir)
        .arg("e2e.mjs")
        .arg(format!("http://127.0.0.1:{}/", server.port))
        .arg(&screenshot)
        .env("CHROMIUM", &chromium)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser test failed");
    assert!(stdout.contains("browser e2e: ok"));
    eprintln!("screenshot: {}", screenshot.display());
    let shot = image::open(&screenshot).unwrap();
    assert!(shot.width() >= 800);
    // The generated image was saved by the server too.
    assert!(outdir.join("txt2img-samples/00000-42.png").is_file());
}
