//! The server's routes on the tiny fixture model: A1111's answers, the job queue, bad input
//! and load. Requests go through the router in-process (no socket), as a client's would.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use base64::Engine;
use http_body_util::BodyExt;
use sdrs::pipeline::{GenerationRequest, StableDiffusion};
use sdrs_server::{Limits, Server, ServerConfig, WorkerCommand};
use serde_json::{json, Value};
use tower::ServiceExt;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny_model() -> PathBuf {
    fixtures().join("tiny-sd1.safetensors")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdrs-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config(outdir: &Path) -> ServerConfig {
    ServerConfig {
        model: Some(tiny_model()),
        models_dir: None,
        lora_dir: None,
        embeddings_dir: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        auth: Vec::new(),
        outdir: outdir.to_path_buf(),
        device: candle_core::Device::Cpu,
        network: Default::default(),
        nan_check: true,
        limits: Limits::default(),
        worker: WorkerCommand::new(env!("CARGO_BIN_EXE_sdrs-server-worker"), &[]),
        allowed_hosts: Vec::new(),
        cors_allow_origins: Vec::new(),
    }
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn send(router: &Router, method: Method, uri: &str, body: Option<&str>) -> Reply {
    send_with(router, method, uri, body, None).await
}

async fn send_with(
    router: &Router,
    method: Method,
    uri: &str,
    body: Option<&str>,
    auth: Option<&str>,
) -> Reply {
    let mut request = Request::builder().method(method).uri(uri);
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(credentials) = auth {
        let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
        request = request.header(header::AUTHORIZATION, format!("Basic {encoded}"));
    }
    let request = request
        .body(Body::from(body.unwrap_or_default().to_string()))
        .unwrap();
    raw(router, request).await
}

/// Sends a request as built, whatever its headers, and collects the answer.
async fn raw(router: &Router, request: Request<Body>) -> Reply {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

/// POSTs a JSON body.
async fn post(router: &Router, uri: &str, body: &Value) -> Reply {
    send(router, Method::POST, uri, Some(&body.to_string())).await
}

/// The JSON of a 200 answer.
fn ok_json(reply: &Reply) -> Value {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    reply.json()
}

fn decode_png(b64: &str) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

/// Polls `/progress` until the running job has taken `steps` steps.
async fn wait_for_steps(router: &Router, steps: u64) {
    for _ in 0..6000 {
        let p = send(router, Method::GET, "/sdapi/v1/progress", None)
            .await
            .json();
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) >= steps {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the job never reached step {steps}");
}

/// Waits for the model load queued at start.
async fn wait_for_model(router: &Router) {
    for _ in 0..6000 {
        let options = send(router, Method::GET, "/sdapi/v1/options", None)
            .await
            .json();
        if !options["sd_model_checkpoint"].is_null() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the model never loaded");
}

/// Polls a job until it ends.
async fn wait_for_job(router: &Router, id: &str) -> Value {
    for _ in 0..6000 {
        let job = send(router, Method::GET, &format!("/sdrs/v1/jobs/{id}"), None)
            .await
            .json();
        if !matches!(job["state"].as_str(), Some("queued" | "running")) {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job {id} never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txt2img_answers_as_a1111_does_with_the_pipelines_own_images_and_saves_them() {
    let outdir = scratch("txt2img");
    let server = Server::start(&config(&outdir)).unwrap();
    let body = json!({
        "prompt": "a red boat", "negative_prompt": "fog", "width": 64, "height": 48,
        "steps": 4, "seed": 42, "sampler_name": "Euler a", "scheduler": "Automatic",
        "batch_size": 2, "cfg_scale": 6, "override_settings": {}, "script_args": [],
        "alwayson_scripts": {}, "send_images": true, "save_images": false,
    });
    let reply = post(&server.router, "/sdapi/v1/txt2img", &body).await;
    let answer = ok_json(&reply);
    let images = answer["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 42);
    assert_eq!(info["all_seeds"], json!([42, 43]));
    assert_eq!(info["sampler_name"], "Euler a");
    assert_eq!(info["sd_model_name"], "tiny-sd1");
    assert_eq!(answer["parameters"]["steps"], 4);
    assert_eq!(answer["parameters"]["prompt"], "a red boat");

    // The same request through the library gives the same pixels and infotexts, with
    // A1111's default noise (GPU, which NV reproduces on any device).
    let checkpoint = sdrs::weights::Checkpoint::open(&tiny_model()).unwrap();
    let sd = StableDiffusion::load(&checkpoint, &candle_core::Device::Cpu).unwrap();
    let request = GenerationRequest {
        prompt: "a red boat".into(),
        negative_prompt: "fog".into(),
        width: 64,
        height: 48,
        steps: 4,
        seed: 42,
        sampler_name: "Euler a".into(),
        batch_size: 2,
        cfg_scale: 6.0,
        randn_source: sdrs::sampling::rng::RandnSource::Nv,
        ..Default::default()
    };
    let generation = request.validate().unwrap();
    let expected =
        sdrs::pipeline::txt2img(&sd, &generation, &mut |_| sdrs::sampling::Flow::Continue)
            .unwrap()
            .images;
    let infotexts = info["infotexts"].as_array().unwrap();
    for (i, want) in expected.iter().enumerate() {
        let got = decode_png(images[i].as_str().unwrap());
        assert_eq!(got, want.image, "image {i}");
        assert_eq!(infotexts[i], want.infotext.as_str());
        assert!(want.infotext.contains("RNG: NV"), "{}", want.infotext);
    }
    // Saved as the CLI saves them, with the infotext inside.
    let saved: Vec<_> = std::fs::read_dir(outdir.join("txt2img-samples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut saved = saved;
    saved.sort();
    assert_eq!(saved, ["00000-42.png", "00001-43.png"]);
    let png = std::fs::read(outdir.join("txt2img-samples/00000-42.png")).unwrap();
    let text = sdrs::image_io::read_png_parameters(&png).unwrap().unwrap();
    assert_eq!(text, expected[0].infotext);

    // png-info reads it back.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let reply = send(
        &server.router,
        Method::POST,
        "/sdapi/v1/png-info",
        Some(&json!({ "image": format!("data:image/png;base64,{b64}") }).to_string()),
    )
    .await;
    let info = reply.json();
    assert_eq!(info["info"], expected[0].infotext.as_str());
    assert_eq!(info["parameters"]["Seed"], "42");
    assert_eq!(info["parameters"]["Prompt"], "a red boat");
    // A JPEG carries it as EXIF UserComment, as A1111 writes it.
    let jpeg =
        sdrs::image_io::encode_jpeg(&expected[0].image, Some(&expected[0].infotext)).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&jpeg);
    let reply = send(
        &server.router,
        Method::POST,
        "/sdapi/v1/png-info",
        Some(&json!({ "image": format!("data:image/jpeg;base64,{b64}") }).to_string()),
    )
    .await;
    assert_eq!(reply.json()["info"], expected[0].infotext.as_str());
    server.shut_down();
    std::fs::remove_dir_all(&outdir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn img2img_takes_a1111s_base64_init_image() {
    let outdir = scratch("img2img");
    let server = Server::start(&config(&outdir)).unwrap();
    let init = image::RgbImage::from_fn(72, 40, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
    let png = sdrs::image_io::encode_png(&init, None).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let body = json!({
        "init_images": [format!("data:image/png;base64,{b64}")], "prompt": "x",
        "steps": 4, "seed": 7, "denoising_strength": 0.5, "sampler_name": "Euler",
        "include_init_images": false,
    });
    let reply = post(&server.router, "/sdapi/v1/img2img", &body).await;
    let answer = ok_json(&reply);
    let image = decode_png(answer["images"][0].as_str().unwrap());
    assert_eq!(image.dimensions(), (72, 40));
    assert!(answer["parameters"]["init_images"].is_null());
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert!(info["infotexts"][0]
        .as_str()
        .unwrap()
        .contains("Denoising strength: 0.5"));
    assert!(outdir.join("img2img-samples/00000-7.png").is_file());
    server.shut_down();
    std::fs::remove_dir_all(&outdir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_with_a_status_and_a_reason() {
    let outdir = scratch("bad");
    let mut cfg = config(&outdir);
    cfg.limits.max_body_bytes = 64 << 10;
    let server = Server::start(&cfg).unwrap();
    let r = &server.router;
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/sdapi/v1/txt2img", "{\"prompt\": ", 422, "not valid JSON"),
        (
            "/sdapi/v1/txt2img",
            r#"{"width": -64}"#,
            422,
            "invalid value",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"width": 8192, "height": 8192}"#,
            422,
            "at most",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"steps": "ten"}"#,
            422,
            "invalid type",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"sampler_name": "DPM fast"}"#,
            422,
            "unknown sampler",
        ),
        (
            "/sdapi/v1/img2img",
            r#"{"init_images": ["bm90IGFuIGltYWdl"]}"#,
            422,
            "not an image",
        ),
        (
            "/sdapi/v1/img2img",
            r#"{"prompt": "x"}"#,
            422,
            "init_images",
        ),
        (
            "/sdapi/v1/options",
            r#"{"sd_model_checkpoint": "nope.safetensors"}"#,
            422,
            "no model",
        ),
        (
            "/sdapi/v1/png-info",
            r#"{"image": "AAAA"}"#,
            422,
            "not an image",
        ),
    ];
    for (uri, body, status, reason) in cases {
        let reply = send(r, Method::POST, uri, Some(body)).await;
        assert_eq!(reply.status.as_u16(), *status, "{uri} {body}");
        let detail = reply.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains(reason), "{uri} {body}: {detail}");
    }
    let huge = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(100 << 10));
    let reply = send(r, Method::POST, "/sdapi/v1/txt2img", Some(&huge)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    let reply = send(r, Method::GET, "/sdrs/v1/jobs/999", None).await;
    assert_eq!(reply.status, 404);
    let reply = send(r, Method::GET, "/sdapi/v1/no-such-route", None).await;
    assert_eq!(reply.status, 404);
    // Nothing reached the queue.
    assert_eq!(
        send(r, Method::GET, "/sdrs/v1/jobs", None)
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1,
        "only the model load"
    );
    server.shut_down();
    let _ = std::fs::remove_dir_all(&outdir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_authentication_guards_every_route() {
    let outdir = scratch("auth");
    let mut cfg = config(&outdir);
    cfg.auth = sdrs_server::parse_auth("alice:secret").unwrap();
    let server = Server::start(&cfg).unwrap();
    let r = &server.router;
    for uri in ["/sdapi/v1/samplers", "/", "/sdrs/v1/jobs"] {
        let none = send(r, Method::GET, uri, None).await;
        assert_eq!(none.status, 401, "{uri}");
        assert!(none.headers.contains_key(header::WWW_AUTHENTICATE));
        let wrong = send_with(r, Method::GET, uri, None, Some("alice:guess")).await;
        assert_eq!(wrong.status, 401, "{uri}");
        let right = send_with(r, Method::GET, uri, None, Some("alice:secret")).await;
        assert_eq!(right.status, 200, "{uri}");
    }
    server.shut_down();
    let _ = std::fs::remove_dir_all(&outdir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_queued_followed_by_events_fetched_and_cancelled() {
    let outdir = scratch("jobs");
    let server = Server::start(&config(&outdir)).unwrap();
    let r = &server.router;
    let body = json!({"prompt": "p", "width": 64, "height": 64, "steps": 3, "seed": 5});
    let reply = post(r, "/sdrs/v1/jobs", &body).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let job = reply.json();
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(
        reply.headers[header::LOCATION],
        format!("/sdrs/v1/jobs/{id}").as_str()
    );

    // The event stream ends with a `done` event carrying the results.
    let events = send(r, Method::GET, &format!("/sdrs/v1/jobs/{id}/events"), None).await;
    assert_eq!(events.headers[header::CONTENT_TYPE], "text/event-stream");
    let text = String::from_utf8(events.body).unwrap();
    let last = text
        .split("\n\n")
        .filter(|e| e.contains("event: done"))
        .last()
        .expect("a done event");
    let data: Value = serde_json::from_str(last.split("data: ").nth(1).unwrap().trim()).unwrap();
    assert_eq!(data["state"], "done");
    assert_eq!(data["results"][0]["seed"], 5);
    let url = data["results"][0]["url"].as_str().unwrap();
    let png = send(r, Method::GET, url, None).await;
    assert_eq!(png.headers[header::CONTENT_TYPE], "image/png");
    assert_eq!(
        image::load_from_memory(&png.body)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (64, 64)
    );
    let preview = send(r, Method::GET, &format!("/sdrs/v1/jobs/{id}/preview"), None).await;
    assert_eq!(preview.status, 200);
    // The preview is the 8× smaller latent picture.
    assert_eq!(
        image::load_from_memory(&preview.body)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (8, 8)
    );

    // A long job runs; one queued behind it is cancelled before it starts, and the long
    // one is cancelled while it runs.
    let long = json!({"prompt": "p", "width": 64, "height": 64, "steps": 1000, "seed": 1});
    let running = post(r, "/sdrs/v1/jobs", &long).await.json();
    wait_for_steps(r, 2).await;
    let waiting = post(r, "/sdrs/v1/jobs", &body).await.json();
    assert_eq!(waiting["position"], 0);
    let running_id = running["id"].as_str().unwrap();
    let waiting_id = waiting["id"].as_str().unwrap();
    let cancelled = send(
        r,
        Method::DELETE,
        &format!("/sdrs/v1/jobs/{waiting_id}"),
        None,
    )
    .await;
    assert_eq!(cancelled.json()["state"], "cancelled");
    send(
        r,
        Method::DELETE,
        &format!("/sdrs/v1/jobs/{running_id}"),
        None,
    )
    .await;
    let ended = wait_for_job(r, running_id).await;
    assert_eq!(ended["state"], "interrupted");
    assert!(ended["step"].as_u64().unwrap() < 1000);
    server.shut_down();
    std::fs::remove_dir_all(&outdir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_skip_and_progress_act_on_the_running_job() {
    let outdir = scratch("interrupt");
    let server = Server::start(&config(&outdir)).unwrap();
    let r = server.router.clone();
    let idle = send(&r, Method::GET, "/sdapi/v1/progress", None)
        .await
        .json();
    assert_eq!(idle["progress"], 0.0);

    // Skip gives up the first image and goes on with the second.
    let body = json!({"prompt": "p", "width": 64, "height": 64, "steps": 1000, "seed": 10,
                      "batch_size": 2});
    let call = {
        let r = r.clone();
        tokio::spawn(async move { post(&r, "/sdapi/v1/txt2img", &body).await })
    };
    wait_for_steps(&r, 3).await;
    let progress = send(&r, Method::GET, "/sdapi/v1/progress", None)
        .await
        .json();
    assert_eq!(progress["state"]["job_count"], 2);
    assert_eq!(progress["state"]["sampling_steps"], 1000);
    let p = progress["progress"].as_f64().unwrap();
    assert!(p > 0.0 && p < 0.5, "{p}");
    let preview = decode_png(progress["current_image"].as_str().unwrap());
    assert_eq!(preview.dimensions(), (8, 8));
    send(&r, Method::POST, "/sdapi/v1/skip", None).await;
    // Then interrupt the second image: the answer holds what was finished (nothing).
    for _ in 0..2000 {
        let p = send(&r, Method::GET, "/sdapi/v1/progress", None)
            .await
            .json();
        if p["state"]["job_no"] == 1 && p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    send(&r, Method::POST, "/sdapi/v1/interrupt", None).await;
    let reply = call.await.unwrap();
    let answer = ok_json(&reply);
    assert_eq!(answer["images"].as_array().unwrap().len(), 0);
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);

    // Interrupting after the first of two images keeps that image.
    let body = json!({"prompt": "p", "width": 64, "height": 64, "steps": 2, "seed": 20,
                      "n_iter": 2});
    let reply = post(&r, "/sdapi/v1/txt2img", &body).await;
    assert_eq!(reply.json()["images"].as_array().unwrap().len(), 2);
    server.shut_down();
    std::fs::remove_dir_all(&outdir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_are_all_answered_in_queue_order() {
    let outdir = scratch("load");
    let server = Server::start(&config(&outdir)).unwrap();
    let r = server.router.clone();
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(async move {
                let body = json!({"prompt": "p", "width": 64, "height": 64, "steps": 1,
                                  "seed": 1000 + i});
                post(&r, "/sdapi/v1/txt2img", &body).await
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, 200, "request {i}");
        let info: Value = serde_json::from_str(reply.json()["info"].as_str().unwrap()).unwrap();
        assert_eq!(info["seed"], 1000 + i as i64);
    }
    // FIFO: jobs ran in the order they were queued, so their files are numbered in that
    // order.
    let jobs = send(&r, Method::GET, "/sdrs/v1/jobs", None).await.json();
    let numbers: Vec<u64> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "txt2img")
        .map(|j| {
            let path = j["results"][0]["path"].as_str().unwrap();
            let name = Path::new(path).file_name().unwrap().to_str().unwrap();
            name[..5].parse().unwrap()
        })
        .collect();
    assert_eq!(numbers, (0..50).collect::<Vec<_>>());
    server.shut_down();
    std::fs::remove_dir_all(&outdir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_and_a_vanished_client_loses_nothing() {
    let outdir = scratch("full");
    let mut cfg = config(&outdir);
    cfg.limits.max_queue = 1;
    let server = Server::start(&cfg).unwrap();
    let r = server.router.clone();
    // With one queue place, the first model load has to leave the queue first.
    wait_for_model(&r).await;
    // A client starts a long job and goes away (its request future is dropped).
    let long = json!({"prompt": "p", "width": 64, "height": 64, "steps": 200, "seed": 77});
    let call = {
        let r = r.clone();
        tokio::spawn(async move { post(&r, "/sdapi/v1/txt2img", &long).await })
    };
    wait_for_steps(&r, 1).await;
    call.abort();
    let jobs = send(&r, Method::GET, "/sdrs/v1/jobs", None).await.json();
    assert_eq!(jobs[1]["state"], "running", "the client left mid-job");
    let short = json!({"prompt": "p", "width": 64, "height": 64, "steps": 1, "seed": 78});
    let queued = post(&r, "/sdrs/v1/jobs", &short).await;
    assert_eq!(queued.status, StatusCode::ACCEPTED);
    let refused = post(&r, "/sdapi/v1/txt2img", &short).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers.contains_key(header::RETRY_AFTER));
    let id = queued.json()["id"].as_str().unwrap().to_string();
    assert_eq!(wait_for_job(&r, &id).await["state"], "done");
    // The abandoned job ran to the end and its image was saved.
    assert!(outdir.join("txt2img-samples/00000-77.png").is_file());
    assert!(outdir.join("txt2img-samples/00001-78.png").is_file());
    server.shut_down();
    std::fs::remove_dir_all(&outdir).unwrap();
}

/// A server without `--model` over a models folder holding `files` (source, name); returns
/// it with its output and models folders.
fn models_dir_server(name: &str, files: &[(PathBuf, &str)]) -> (Server, PathBuf, PathBuf) {
    let outdir = scratch(name);
    let models = scratch(&format!("{name}-models"));
    std::fs::create_dir_all(&models).unwrap();
    for (source, file) in files {
        std::fs::copy(source, models.join(file)).unwrap();
    }
    let mut cfg = config(&outdir);
    cfg.model = None;
    cfg.models_dir = Some(models.clone());
    (Server::start(&cfg).unwrap(), outdir, models)
}

/// The titles `/sdapi/v1/sd-models` lists.
async fn titles(router: &Router) -> Vec<String> {
    let list = send(router, Method::GET, "/sdapi/v1/sd-models", None)
        .await
        .json();
    list.as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_list_and_switch_models() {
    let (server, outdir, models) = models_dir_server(
        "models",
        &[
            (tiny_model(), "first.safetensors"),
            (fixtures().join("tiny-sd1.ckpt"), "second.ckpt"),
        ],
    );
    let r = &server.router;
    assert_eq!(titles(r).await, ["first.safetensors", "second.ckpt"]);
    // The first model loads at start; a generation waits for it.
    let body = json!({"prompt": "p", "width": 64, "height": 64, "steps": 1, "seed": 3});
    let first = post(r, "/sdapi/v1/txt2img", &body).await;
    let options = send(r, Method::GET, "/sdapi/v1/options", None).await.json();
    assert_eq!(options["sd_model_checkpoint"], "first.safetensors");
    let switch = json!({"sd_model_checkpoint": "second [0123456789]", "samples_format": "png"});
    let reply = post(r, "/sdapi/v1/options", &switch).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let options = send(r, Method::GET, "/sdapi/v1/options", None).await.json();
    assert_eq!(options["sd_model_checkpoint"], "second.ckpt");
    assert_eq!(options["samples_format"], "png");
    let second = post(r, "/sdapi/v1/txt2img", &body).await;
    let info = |reply: &Reply| -> Value {
        serde_json::from_str(reply.json()["info"].as_str().unwrap()).unwrap()
    };
    assert_eq!(info(&first)["sd_model_name"], "first");
    assert_eq!(info(&second)["sd_model_name"], "second");
    // Same weights in both files, so the same pixels.
    let pixels = |reply: &Reply| decode_png(reply.json()["images"][0].as_str().unwrap());
    assert_eq!(pixels(&first), pixels(&second));
    let samplers = send(r, Method::GET, "/sdapi/v1/samplers", None)
        .await
        .json();
    assert!(samplers
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "DPM++ 2M"));
    let schedulers = send(r, Method::GET, "/sdapi/v1/schedulers", None)
        .await
        .json();
    assert_eq!(schedulers[1]["label"], "Karras");
    server.shut_down();
    std::fs::remove_dir_all(&outdir).unwrap();
    std::fs::remove_dir_all(&models).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_between_sd1_and_sdxl_gives_each_models_images() {
    let (server, outdir, models) = models_dir_server(
        "sdxl",
        &[
            (tiny_model(), "a-sd1.safetensors"),
            (fixtures().join("tiny-sdxl.safetensors"), "b-xl.safetensors"),
        ],
    );
    let r = &server.router;
    assert_eq!(titles(r).await, ["a-sd1.safetensors", "b-xl.safetensors"]);
    let sd1 = json!({"prompt": "p", "width": 64, "height": 64, "steps": 1, "seed": 3});
    let before = post(r, "/sdapi/v1/txt2img", &sd1).await;
    let switch = |name: &str| json!({ "sd_model_checkpoint": name });
    let reply = post(r, "/sdapi/v1/options", &switch("b-xl")).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    // The reference case euler_a of tools/make_sdxl_fixtures.py, as an A1111 client asks
    // for it (its noise from torch's CPU generator, A1111's "CPU" source).
    let xl = json!({
        "prompt": "a tiny red fox in the snow", "negative_prompt": "blurry",
        "sampler_name": "Euler a", "steps": 8, "cfg_scale": 5, "seed": 42,
        "width": 64, "height": 64, "override_settings": {"randn_source": "CPU"},
    });
    let reply = post(r, "/sdapi/v1/txt2img", &xl).await;
    let reply = ok_json(&reply);
    let want = image::open(fixtures().join("reference/sdxl/euler_a_seed42.png"))
        .unwrap()
        .to_rgb8();
    let got = decode_png(reply["images"][0].as_str().unwrap());
    let worst = got
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max();
    assert!(worst <= Some(1), "SDXL through the API: {worst:?}/255 off");
    let info: Value = serde_json::from_str(reply["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sd_model_name"], "b-xl");
    // The infotext reads back into the same request.
    let infotext = info["infotexts"][0].as_str().unwrap();
    let back = sdrs::pipeline::infotext::parse(infotext).to_request();
    assert_eq!(
        (
            back.seed,
            back.steps,
            back.cfg_scale,
            back.width,
            back.height
        ),
        (42, 8, 5.0, 64, 64)
    );
    assert_eq!(back.sampler_name, "Euler a");
    assert_eq!(back.negative_prompt, "blurry");
    // And back to SD 1: the same image as before the switch.
    let reply = post(r, "/sdapi/v1/options", &switch("a-sd1.safetensors")).await;
    assert_eq!(reply.status, 200);
    let after = post(r, "/sdapi/v1/txt2img", &sd1).await;
    let pixels = |reply: &Reply| decode_png(reply.json()["images"][0].as_str().unwrap());
    assert_eq!(pixels(&before), pixels(&after));
    server.shut_down();
    std::fs::remove_dir_all(&outdir).unwrap();
    std::fs::remove_dir_all(&models).unwrap();
}

mod hostile;
mod loras;
