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
    // The page's LoRA picker lists this folder's one LoRA (e2e.mjs picks it by name).
    let loras = scratch("browser-loras");
    std::fs::copy(
        fixtures().join("lora/kohya_locon.safetensors"),
        loras.join("kohya_locon.safetensors"),
    )
    .unwrap();
    let model = fixtures().join("tiny-sd1.safetensors");
    let server = Served::start(&[
        "--model",
        model.to_str().unwrap(),
        "--lora-dir",
        loras.to_str().unwrap(),
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
    // The generated images were saved by the server too, the second with its LoRA's hash.
    assert!(outdir.join("txt2img-samples/00000-42.png").is_file());
    let png = std::fs::read(outdir.join("txt2img-samples/00001-42.png")).unwrap();
    let text = sdrs::image_io::read_png_parameters(&png).unwrap().unwrap();
    assert!(text.contains("Lora hashes: \"kohya_locon: "), "{text}");
}

/// An HTTP answer: status, headers as text, body.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The detail of a JSON error answer with `status`.
    #[track_caller]
    fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{}", self.head);
        let detail = self.json()["detail"].as_str().unwrap().to_string();
        eprintln!("  → {status}: {detail}");
        detail
    }
}

/// Reads one answer from a stream whose server closes it after answering.
fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let body = raw.get(split + 4..).unwrap_or_default().to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Answer { status, head, body }
}

impl Served {
    /// Sends a request (adding `Host: 127.0.0.1:port` unless `headers` has a Host) and reads
    /// the answer.
    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: 127.0.0.1:{}\r\n", self.port));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        read_answer(&mut stream)
    }

    fn post_json(&self, path: &str, body: &serde_json::Value) -> Answer {
        let json = [("Content-Type", "application/json")];
        self.send("POST", path, &json, body.to_string().as_bytes())
    }

    /// Polls a job until `done` says so.
    fn wait_job(&self, id: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let job = self
                .send("GET", &format!("/sdrs/v1/jobs/{id}"), &[], b"")
                .json();
            if done(&job) {
                return job;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "{job}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs the small job every test runs before and after the hostile requests; its PNG.
    fn normal_image(&self) -> Vec<u8> {
        let job = serde_json::json!({"prompt": "a lighthouse", "width": 64, "height": 64,
                                     "steps": 3, "seed": 9});
        let queued = self.post_json("/sdrs/v1/jobs", &job);
        assert_eq!(
            queued.status,
            202,
            "{}",
            String::from_utf8_lossy(&queued.body)
        );
        let id = queued.json()["id"].as_str().unwrap().to_string();
        let done = self.wait_job(&id, |j| j["state"] != "queued" && j["state"] != "running");
        assert_eq!(done["state"], "done", "{done}");
        let png = self.send("GET", &format!("/sdrs/v1/jobs/{id}/images/0"), &[], b"");
        assert_eq!(png.status, 200);
        let decoded = image::load_from_memory(&png.body).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (64, 64));
        decoded.into_raw()
    }

    /// The worker processes this server started (its children).
    fn workers(&self) -> Vec<u32> {
        let tasks = format!("/proc/{}/task", self.child.id());
        let mut pids = Vec::new();
        for task in std::fs::read_dir(tasks).unwrap().flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        pids
    }
}

/// Opens a connection, sends `partial` and stops; answers what the server said, and how long
/// it took to close the connection.
fn stall(port: u16, partial: &str) -> (String, Duration) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(partial.as_bytes()).unwrap();
    let started = Instant::now();
    let mut said = Vec::new();
    let result = stream.read_to_end(&mut said);
    let took = started.elapsed();
    assert!(result.is_ok(), "the connection was not closed: {result:?}");
    (String::from_utf8_lossy(&said).to_string(), took)
}

#[test]
fn stalled_connections_are_closed_and_hostile_requests_refused_over_a_real_socket() {
    let outdir = scratch("hostile-socket-out");
    let model = fixtures().join("tiny-sd1.safetensors");
    let server = Served::start(&[
        "--model",
        model.to_str().unwrap(),
        "--outdir",
        outdir.to_str().unwrap(),
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
    ]);
    let before = server.normal_image();

    // Stopped mid-header: closed without an answer once the header deadline passes.
    let (said, took) = stall(
        server.port,
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Ty",
    );
    eprintln!("mid-header: closed after {took:?}, said {said:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Stopped mid-body: answered 408 and closed once the body deadline passes.
    let (said, took) = stall(
        server.port,
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ",
    );
    eprintln!("mid-body: closed after {took:?}");
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("\"detail\""), "{said}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A 100 GB body announced: refused at once, before any of it is sent.
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    write!(
        stream,
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: 107374182400\r\n\r\n{{\"prompt\": \"x"
    )
    .unwrap();
    let answer = read_answer(&mut stream);
    answer.error(413);
    assert!(started.elapsed() < Duration::from_secs(5));

    let plain = server.send(
        "POST",
        "/sdapi/v1/txt2img",
        &[("Content-Type", "text/plain")],
        b"{\"prompt\": \"x\"}",
    );
    plain.error(415);
    let rebinding = server.send("GET", "/sdapi/v1/options", &[("Host", "evil.example")], b"");
    rebinding.error(403);
    let foreign = server.send(
        "POST",
        "/sdapi/v1/interrupt",
        &[("Origin", "http://evil.example")],
        b"",
    );
    foreign.error(403);
    let options = server.post_json("/sdapi/v1/options", &serde_json::json!({"evil": "x"}));
    options.error(422);
    // A1111 clients post /interrupt with no content type and no origin: still fine.
    assert_eq!(
        server.send("POST", "/sdapi/v1/interrupt", &[], b"").status,
        200
    );

    assert_eq!(server.normal_image(), before, "the same image after them");
}

#[test]
fn a_killed_worker_fails_its_job_only_and_the_next_job_runs_on_a_new_one() {
    let outdir = scratch("hostile-kill-out");
    let model = fixtures().join("tiny-sd1.safetensors");
    let server = Served::start(&[
        "--model",
        model.to_str().unwrap(),
        "--outdir",
        outdir.to_str().unwrap(),
    ]);
    let before = server.normal_image();
    let workers = server.workers();
    assert_eq!(workers.len(), 1, "one worker process: {workers:?}");

    let long = serde_json::json!({"prompt": "p", "width": 64, "height": 64, "steps": 1000});
    let running = server.post_json("/sdrs/v1/jobs", &long).json();
    let running = running["id"].as_str().unwrap().to_string();
    server.wait_job(&running, |j| j["step"].as_u64().unwrap_or(0) >= 1);
    let next = serde_json::json!({"prompt": "p", "width": 64, "height": 64, "steps": 30});
    let waiting = server.post_json("/sdrs/v1/jobs", &next).json();
    let waiting = waiting["id"].as_str().unwrap().to_string();
    let killed_at = Instant::now();
    let kill = Command::new("kill")
        .args(["-KILL", &workers[0].to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let failed = server.wait_job(&running, |j| j["state"] == "failed");
    let error = failed["error"].as_str().unwrap();
    eprintln!("  → the killed job: {error}");
    assert!(error.contains("SIGKILL"), "{error}");
    server.wait_job(&waiting, |j| {
        j["step"].as_u64().unwrap_or(0) >= 1 || j["state"] == "done"
    });
    eprintln!(
        "worker restart (sdrs serve, real socket): SIGKILL → the next job's first step in {:?}",
        killed_at.elapsed()
    );
    let done = server.wait_job(&waiting, |j| {
        j["state"] != "running" && j["state"] != "queued"
    });
    assert_eq!(done["state"], "done");
    assert_ne!(server.workers(), workers, "a new worker");

    // Deep enough to overflow the worker's stack while the prompt parser recurses: the
    // worker dies, the server answers.
    let deep = serde_json::json!({"prompt": "(".repeat(60_000), "width": 64, "height": 64,
                                  "steps": 1});
    let answer = server.post_json("/sdapi/v1/txt2img", &deep);
    assert!(matches!(answer.status, 200 | 422 | 500), "{}", answer.head);
    if answer.status != 200 {
        answer.error(answer.status);
    }
    assert_eq!(server.normal_image(), before, "the same image after them");
}
