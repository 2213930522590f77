//! A Hugging Face Hub stand-in on a local port, in the test process: it serves files under
//! `/{owner}/{name}/resolve/main/{file}` with the headers the Hub sends (`x-repo-commit`, an
//! `etag` that for weight files is their SHA-256, ranges), and can be told to break a transfer
//! after some bytes or to send a corrupted file. It logs every request it answers.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// The repository the tiny SD 2 (v-prediction) folder stands in for.
pub const TURBO_REPO: &str = "stabilityai/sd-turbo";

/// The catalogue's SD-Turbo file names, and the tiny folder's files served under them.
pub const TURBO_FILES: &[(&str, &str)] = &[
    ("model_index.json", "model_index.json"),
    (
        "scheduler/scheduler_config.json",
        "scheduler/scheduler_config.json",
    ),
    ("text_encoder/config.json", "text_encoder/config.json"),
    (
        "text_encoder/model.fp16.safetensors",
        "text_encoder/model.safetensors",
    ),
    (
        "tokenizer/tokenizer_config.json",
        "tokenizer/tokenizer_config.json",
    ),
    ("unet/config.json", "unet/config.json"),
    (
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
    ),
    ("vae/config.json", "vae/config.json"),
    (
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ),
];

/// A stand-in serving `tiny_folder` (tests/fixtures/tiny-sd2-v) as SD-Turbo.
pub fn serving_turbo(tiny_folder: &Path) -> FakeHub {
    let hub = FakeHub::start();
    hub.add_folder(TURBO_REPO, tiny_folder, TURBO_FILES);
    hub
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    /// URL path → (bytes sent before the connection drops, transfers left to break).
    cuts: HashMap<String, (usize, usize)>,
    corrupt: Vec<String>,
    log: Vec<Request>,
}

pub struct FakeHub {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl FakeHub {
    pub fn start() -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        FakeHub { endpoint, state }
    }

    /// Serves `bytes` as `file` of `repo`.
    pub fn add(&self, repo: &str, file: &str, bytes: Vec<u8>) {
        let path = format!("/{repo}/resolve/main/{file}");
        self.state.lock().unwrap().files.insert(path, bytes);
    }

    /// Serves the files of a folder under the given names: `(name on the Hub, file on disk)`.
    pub fn add_folder(&self, repo: &str, dir: &Path, files: &[(&str, &str)]) {
        for (name, on_disk) in files {
            let path = dir.join(on_disk);
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            self.add(repo, name, bytes);
        }
    }

    /// The next `times` transfers of `file` stop after `after` bytes.
    pub fn cut(&self, repo: &str, file: &str, after: usize, times: usize) {
        let path = format!("/{repo}/resolve/main/{file}");
        self.state.lock().unwrap().cuts.insert(path, (after, times));
    }

    /// `file` is sent with one byte changed, under the true file's SHA-256.
    pub fn corrupt(&self, repo: &str, file: &str, on: bool) {
        let path = format!("/{repo}/resolve/main/{file}");
        let mut state = self.state.lock().unwrap();
        state.corrupt.retain(|p| *p != path);
        if on {
            state.corrupt.push(path);
        }
    }

    pub fn log(&self) -> Vec<Request> {
        self.state.lock().unwrap().log.clone()
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned();
    let (body, cut) = {
        let mut st = state.lock().unwrap();
        st.log.push(Request {
            path: path.clone(),
            range: range.clone(),
            authorization: headers.get("authorization").cloned(),
        });
        let Some(file) = st.files.get(&path).cloned() else {
            drop(st);
            respond(stream, "404 Not Found", &[], b"Entry not found", None);
            return;
        };
        let mut served = file.clone();
        if st.corrupt.contains(&path) {
            let mid = served.len() / 2;
            served[mid] ^= 0xff;
        }
        let is_metadata = range.as_deref() == Some("bytes=0-0");
        let cut = match st.cuts.get_mut(&path) {
            Some((after, times)) if *times > 0 && !is_metadata => {
                *times -= 1;
                Some(*after)
            }
            _ => None,
        };
        ((file, served), cut)
    };
    let (file, served) = body;
    let sha = hex(&Sha256::digest(&file));
    // Weight files are LFS objects, named by their SHA-256; others by a 40-digit git id.
    let etag = if path.ends_with(".safetensors") {
        sha
    } else {
        sha[..40].to_string()
    };
    let total = served.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap_or((r, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().map(|b: usize| b + 1).unwrap_or(total);
            (a.min(total), b.min(total))
        }
        None => (0, total),
    };
    let quoted = format!("\"{etag}\"");
    let content_range = format!("bytes {start}-{}/{total}", end.max(start + 1) - 1);
    let mut extra = vec![
        ("x-repo-commit", COMMIT.to_string()),
        ("etag", quoted.clone()),
    ];
    if path.ends_with(".safetensors") {
        extra.push(("x-linked-etag", quoted));
    }
    let status = if range.is_some() {
        extra.push(("content-range", content_range));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    respond(stream, status, &extra, &served[start..end], cut);
}

fn respond(
    mut stream: TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
    cut: Option<usize>,
) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let sent = cut.map_or(body.len(), |c| c.min(body.len()));
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body[..sent]);
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
