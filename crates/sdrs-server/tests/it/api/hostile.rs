//! Requests made to hurt (issue 13): each gets a clear error — a status and a JSON detail —
//! and afterwards the server still answers and a normal job gives the right image.

use std::time::Instant;

use super::*;

/// Checks an error answer: one of `statuses`, JSON, with a detail that contains `words`.
#[track_caller]
fn assert_error(reply: &Reply, statuses: &[u16], words: &str) -> String {
    let body = String::from_utf8_lossy(&reply.body[..reply.body.len().min(500)]);
    assert!(
        statuses.contains(&reply.status.as_u16()),
        "status {} (wanted {statuses:?}): {body}",
        reply.status
    );
    let json: Value = serde_json::from_slice(&reply.body)
        .unwrap_or_else(|e| panic!("the error is not JSON ({e}): {body}"));
    let detail = json["detail"].as_str().expect("a detail").to_string();
    assert!(!detail.is_empty());
    eprintln!(
        "  → {}: {}",
        reply.status,
        detail.chars().take(300).collect::<String>()
    );
    assert!(detail.contains(words), "{detail:?} lacks {words:?}");
    assert!(
        !detail.contains("stack backtrace") && !detail.contains("   0: "),
        "a backtrace in {detail}"
    );
    detail
}

/// The small job every test runs before and after the hostile requests.
fn normal_job() -> Value {
    json!({"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 3, "seed": 9})
}

async fn normal_image(router: &Router) -> image::RgbImage {
    let reply = post(router, "/sdapi/v1/txt2img", &normal_job()).await;
    decode_png(ok_json(&reply)["images"][0].as_str().unwrap())
}

/// Asks until the job `id` has taken a step (or is done).
async fn wait_until_stepping(router: &Router, id: &str) {
    for _ in 0..6000 {
        let job = send(router, Method::GET, &format!("/sdrs/v1/jobs/{id}"), None)
            .await
            .json();
        if job["step"].as_u64().unwrap_or(0) >= 1 || job["state"] == "done" {
            return;
        }
        assert!(
            matches!(job["state"].as_str(), Some("queued" | "running")),
            "{job}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("job {id} never took a step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_used_to_kill_the_server_get_clear_errors_and_it_goes_on() {
    let outdir = scratch("hostile-requests");
    let server = Server::start(&config(&outdir)).unwrap();
    let r = &server.router;
    let before = normal_image(r).await;

    // The prompt parser once recursed per bracket: 12,000 overflowed the job thread's stack
    // and took the server with it. Now the request is refused before it is queued.
    for depth in [12_000, 60_000] {
        let brackets = json!({"prompt": "(".repeat(depth), "width": 64, "height": 64, "steps": 1});
        let reply = post(r, "/sdapi/v1/txt2img", &brackets).await;
        assert_error(&reply, &[422], "MAX_PROMPT_NESTING");
    }
    let hires = json!({"prompt": "x", "width": 64, "height": 64, "steps": 1, "enable_hr": true,
                       "hr_second_pass_steps": 1_000_000_000u64});
    let reply = post(r, "/sdapi/v1/txt2img", &hires).await;
    assert_error(&reply, &[422], "MAX_STEPS");
    let huge = json!({"prompt": "x".repeat(1 << 20), "n_iter": 10_000, "width": 64, "height": 64});
    let reply = post(r, "/sdapi/v1/txt2img", &huge).await;
    assert_error(&reply, &[422], "MAX_PROMPT_BYTES");
    // Under the prompt cap, but the answer would repeat it 10,000 times.
    let many = json!({"prompt": "x".repeat(30_000), "n_iter": 10_000, "width": 8, "height": 8});
    let reply = post(r, "/sdapi/v1/txt2img", &many).await;
    assert_error(&reply, &[422], "MAX_PROMPT_BYTES_TIMES_IMAGES");
    assert_eq!(normal_image(r).await, before, "the same job after them");
    server.shut_down();

    // --max-prompt-bytes lowers the cap, for both prompts.
    let mut cfg = config(&outdir);
    cfg.limits.max_prompt_bytes = 1000;
    let server = Server::start(&cfg).unwrap();
    let r = &server.router;
    let long = json!({"prompt": "x".repeat(1001), "width": 64, "height": 64});
    let reply = post(r, "/sdrs/v1/jobs", &long).await;
    assert_error(&reply, &[422], "--max-prompt-bytes");
    let long_negative = json!({"negative_prompt": "x".repeat(1001)});
    let reply = post(r, "/sdapi/v1/txt2img", &long_negative).await;
    assert_error(&reply, &[422], "negative_prompt");
    assert_eq!(normal_image(r).await, before);
    server.shut_down();
    let _ = std::fs::remove_dir_all(&outdir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_fails_that_job_only_and_a_new_one_takes_the_queue() {
    let outdir = scratch("hostile-kill");
    let mut cfg = config(&outdir);
    cfg.worker
        .env
        .push((sdrs_server::TEST_CRASH_VAR.into(), "1".into()));
    let server = Server::start(&cfg).unwrap();
    let r = &server.router;
    let before = normal_image(r).await;

    // Killed from outside mid-job (as the OOM killer does), while another job waits.
    let long = json!({"prompt": "p", "width": 64, "height": 64, "steps": 1000, "seed": 1});
    let running = post(r, "/sdrs/v1/jobs", &long).await.json();
    let running = running["id"].as_str().unwrap().to_string();
    wait_until_stepping(r, &running).await;
    let next = json!({"prompt": "p", "width": 64, "height": 64, "steps": 30, "seed": 2});
    let waiting = post(r, "/sdrs/v1/jobs", &next).await.json();
    let waiting = waiting["id"].as_str().unwrap().to_string();
    let pid = server.worker_pid().expect("a worker runs");
    let killed_at = Instant::now();
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let failed = wait_for_job(r, &running).await;
    assert_eq!(failed["state"], "failed");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("signal 9 (SIGKILL"), "{error}");
    assert!(error.contains("reloading tiny-sd1.safetensors"), "{error}");
    wait_until_stepping(r, &waiting).await;
    let restart = killed_at.elapsed();
    eprintln!("worker restart: SIGKILL → the next job's first step in {restart:?}");
    assert_eq!(wait_for_job(r, &waiting).await["state"], "done");
    assert_ne!(server.worker_pid(), Some(pid), "a new worker");

    // Crashes from inside: a segmentation fault, an abort, an exit.
    for (how, says) in [
        ("segv", "signal 11 (SIGSEGV"),
        ("abort", "signal 6 (SIGABRT"),
        ("exit", "exited with status 3"),
    ] {
        let crash = json!({"prompt": format!("sdrs-test-crash:{how}"), "width": 64, "height": 64,
                           "steps": 1});
        let reply = post(r, "/sdapi/v1/txt2img", &crash).await;
        assert_error(&reply, &[500], says);
    }
    assert_eq!(normal_image(r).await, before, "the same job after them");
    let progress = send(r, Method::GET, "/sdapi/v1/progress", None)
        .await
        .json();
    assert_eq!(progress["progress"], 0.0);
    server.shut_down();
    let _ = std::fs::remove_dir_all(&outdir);
}

/// A copy of the fixture with one VAE convolution's kernel reshaped from k×k to k²×1 (its
/// bytes kept): the model's configuration still reads right, and building the VAE is a shape
/// error from candle, which carries a backtrace when one is asked for.
fn misshapen_checkpoint(to: &Path) {
    let bytes = std::fs::read(tiny_model()).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let key = header
        .iter()
        .filter(|(k, v)| {
            k.starts_with("first_stage_model.decoder.up")
                && v["shape"]
                    .as_array()
                    .is_some_and(|s| s.len() == 4 && s[2] == 3)
        })
        .map(|(k, _)| k.clone())
        .next_back()
        .unwrap();
    let shape = header[&key]["shape"].as_array().unwrap().clone();
    header[&key]["shape"] = json!([shape[0], shape[1], 9, 1]);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(to, out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_a_malformed_checkpoint_fails_the_switch_and_keeps_the_old_model() {
    let outdir = scratch("hostile-models-out");
    let models = scratch("hostile-models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(tiny_model(), models.join("good.safetensors")).unwrap();
    let mut garbage = b"\xff\xff\xff\xff\xff\xff\xff\x7f".to_vec();
    garbage.extend_from_slice(b"{\"not\": \"a tensor\"}");
    std::fs::write(models.join("garbage.safetensors"), garbage).unwrap();
    std::fs::write(models.join("empty.ckpt"), b"").unwrap();
    misshapen_checkpoint(&models.join("misshapen.safetensors"));
    let mut cfg = config(&outdir);
    cfg.model = Some(models.join("good.safetensors"));
    cfg.models_dir = Some(models.clone());
    // A backtrace must not reach the client, even when the worker captures one.
    cfg.worker.env.push(("RUST_BACKTRACE".into(), "1".into()));
    cfg.worker
        .env
        .push(("RUST_LIB_BACKTRACE".into(), "1".into()));
    let server = Server::start(&cfg).unwrap();
    let r = &server.router;
    let before = normal_image(r).await;
    for name in ["garbage.safetensors", "empty.ckpt", "misshapen.safetensors"] {
        let reply = post(
            r,
            "/sdapi/v1/options",
            &json!({"sd_model_checkpoint": name}),
        )
        .await;
        let detail = assert_error(&reply, &[500], name);
        assert!(!detail.contains(".rs:"), "{detail}");
        wait_for_model(r).await;
        let options = send(r, Method::GET, "/sdapi/v1/options", None).await.json();
        assert_eq!(options["sd_model_checkpoint"], "good.safetensors", "{name}");
        assert_eq!(normal_image(r).await, before, "after {name}");
    }
    server.shut_down();
    let _ = std::fs::remove_dir_all(&outdir);
    let _ = std::fs::remove_dir_all(&models);
}

fn request(method: Method, uri: &str) -> axum::http::request::Builder {
    Request::builder().method(method).uri(uri)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_other_sites_cannot_drive_the_server_and_listed_origins_get_cors() {
    let outdir = scratch("hostile-origin");
    let mut cfg = config(&outdir);
    cfg.allowed_hosts = vec!["studio.lan".into()];
    cfg.cors_allow_origins = vec!["https://app.example".into()];
    let server = Server::start(&cfg).unwrap();
    let r = &server.router;
    wait_for_model(r).await;
    let job = normal_job().to_string();

    // A "simple" cross-site form post: text/plain, no preflight.
    for uri in [
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/sdapi/v1/options",
        "/sdapi/v1/png-info",
        "/sdrs/v1/jobs",
    ] {
        let plain = request(Method::POST, uri)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from(job.clone()))
            .unwrap();
        assert_error(&raw(r, plain).await, &[415], "application/json");
        let none = request(Method::POST, uri)
            .body(Body::from(job.clone()))
            .unwrap();
        assert_error(&raw(r, none).await, &[415], "application/json");
    }
    // Bodyless posts are guarded by the Origin browsers send with them.
    for (origin, site) in [
        (Some("http://evil.example"), None),
        (Some("null"), None),
        (Some("http://127.0.0.1:9999"), None),
        (None, Some("cross-site")),
    ] {
        for (method, uri) in [
            (Method::POST, "/sdapi/v1/interrupt"),
            (Method::POST, "/sdapi/v1/skip"),
            (Method::GET, "/sdrs/v1/jobs"),
            (Method::DELETE, "/sdrs/v1/jobs/1"),
        ] {
            let mut req = request(method.clone(), uri).header(header::HOST, "127.0.0.1:7860");
            if let Some(origin) = origin {
                req = req.header(header::ORIGIN, origin);
            }
            if let Some(site) = site {
                req = req.header("sec-fetch-site", site);
            }
            let reply = raw(r, req.body(Body::empty()).unwrap()).await;
            assert_error(&reply, &[403], "origin");
            assert!(!reply
                .headers
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        }
    }
    // DNS rebinding: the attacker's name for this machine.
    let rebinding = request(Method::GET, "/sdapi/v1/options")
        .header(header::HOST, "evil.example:7860")
        .body(Body::empty())
        .unwrap();
    assert_error(&raw(r, rebinding).await, &[403], "--allowed-hosts");
    let absolute = request(Method::GET, "http://evil.example/sdapi/v1/options")
        .body(Body::empty())
        .unwrap();
    assert_error(&raw(r, absolute).await, &[403], "DNS rebinding");

    // What stays open: the page itself (same origin), a link followed to it, IP literals,
    // loopback and listed names, and listed origins with CORS.
    let own = request(Method::POST, "/sdrs/v1/jobs")
        .header(header::HOST, "127.0.0.1:7860")
        .header(header::ORIGIN, "http://127.0.0.1:7860")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(job.clone()))
        .unwrap();
    assert_eq!(raw(r, own).await.status, StatusCode::ACCEPTED);
    let link = request(Method::GET, "/")
        .header(header::HOST, "localhost:7860")
        .header("sec-fetch-site", "cross-site")
        .header("sec-fetch-mode", "navigate")
        .body(Body::empty())
        .unwrap();
    assert_eq!(raw(r, link).await.status, 200);
    for host in ["studio.lan:7860", "[::1]:7860", "app.localhost"] {
        let named = request(Method::GET, "/sdapi/v1/samplers")
            .header(header::HOST, host)
            .body(Body::empty())
            .unwrap();
        assert_eq!(raw(r, named).await.status, 200, "{host}");
    }
    let preflight = request(Method::OPTIONS, "/sdapi/v1/txt2img")
        .header(header::HOST, "127.0.0.1:7860")
        .header(header::ORIGIN, "https://app.example")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "content-type")
        .body(Body::empty())
        .unwrap();
    let reply = raw(r, preflight).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(
        reply.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://app.example"
    );
    assert!(reply.headers[header::ACCESS_CONTROL_ALLOW_METHODS]
        .to_str()
        .unwrap()
        .contains("POST"));
    let listed = request(Method::POST, "/sdapi/v1/txt2img")
        .header(header::HOST, "127.0.0.1:7860")
        .header(header::ORIGIN, "https://app.example")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(job.clone()))
        .unwrap();
    let reply = raw(r, listed).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://app.example"
    );
    let listed_error = request(Method::POST, "/sdapi/v1/txt2img")
        .header(header::ORIGIN, "https://app.example")
        .header(header::HOST, "127.0.0.1:7860")
        .body(Body::empty())
        .unwrap();
    let reply = raw(r, listed_error).await;
    assert_error(&reply, &[415], "");
    assert!(reply
        .headers
        .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    let unlisted = request(Method::OPTIONS, "/sdapi/v1/txt2img")
        .header(header::ORIGIN, "https://other.example")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .body(Body::empty())
        .unwrap();
    assert_error(&raw(r, unlisted).await, &[403], "--cors-allow-origins");
    server.shut_down();
    let _ = std::fs::remove_dir_all(&outdir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_take_known_keys_with_bounded_values_and_bodies_are_bounded_early() {
    let outdir = scratch("hostile-options");
    let server = Server::start(&config(&outdir)).unwrap();
    let r = &server.router;
    wait_for_model(r).await;
    let before = send(r, Method::GET, "/sdapi/v1/options", None).await.json();
    for (body, says) in [
        (json!({"evil_key": "x"}), "evil_key"),
        (
            json!({"samples_save": true, "made_up": [1, 2, 3]}),
            "made_up",
        ),
        (json!({"outdir_samples": "/etc"}), "--outdir"),
        (json!({"CLIP_stop_at_last_layers": 1e300}), "1 to 12"),
        (json!({"samples_format": "x".repeat(10_000)}), "png"),
    ] {
        let reply = post(r, "/sdapi/v1/options", &body).await;
        assert_error(&reply, &[422], says);
    }
    // 50 MB values: refused from the declared length, and when streamed without one.
    let fifty = format!(r#"{{"sd_vae": "{}"}}"#, "x".repeat(50 << 20));
    let declared = request(Method::POST, "/sdapi/v1/options")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, fifty.len())
        .body(Body::from(fifty.clone()))
        .unwrap();
    let reply = raw(r, declared).await;
    assert_error(&reply, &[413], "bytes");
    assert_eq!(reply.headers[header::CONNECTION], "close");
    let streamed = request(Method::POST, "/sdapi/v1/options")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(fifty))
        .unwrap();
    assert_error(&raw(r, streamed).await, &[413], "bytes");
    let after = send(r, Method::GET, "/sdapi/v1/options", None).await.json();
    assert_eq!(after, before, "nothing was kept");

    // A 100 GB Content-Length is refused before a byte of the body is read, on every route.
    for (method, uri) in [
        (Method::POST, "/sdapi/v1/txt2img"),
        (Method::POST, "/sdapi/v1/interrupt"),
        (Method::POST, "/sdrs/v1/jobs"),
        (Method::GET, "/sdapi/v1/progress"),
    ] {
        let huge = request(method, uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, 100u64 << 30)
            .body(Body::empty())
            .unwrap();
        assert_error(&raw(r, huge).await, &[413], "larger than");
    }

    // Errors are JSON whoever makes them: router, extractors, middleware.
    let cases: [(Method, &str, u16); 6] = [
        (Method::GET, "/no/such/route", 404),
        (Method::GET, "/sdapi/v1/txt2img", 405),
        (Method::PUT, "/sdrs/v1/jobs", 405),
        (Method::GET, "/sdrs/v1/jobs/1/images/not-a-number", 404),
        (Method::GET, "/sdrs/v1/jobs/99999999999999999999999", 404),
        (
            Method::GET,
            "/sdapi/v1/progress?skip_current_image=maybe",
            400,
        ),
    ];
    for (method, uri, status) in cases {
        let reply = send(r, method.clone(), uri, None).await;
        assert_error(&reply, &[status], "");
    }
    assert_eq!(normal_image(r).await.dimensions(), (64, 64));
    server.shut_down();
    let _ = std::fs::remove_dir_all(&outdir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_auth_each_user_sees_and_controls_only_their_own_jobs() {
    let outdir = scratch("hostile-users");
    let mut cfg = config(&outdir);
    cfg.auth = sdrs_server::parse_auth("alice:a-secret,bob:b-secret").unwrap();
    let server = Server::start(&cfg).unwrap();
    let r = &server.router;
    let alice = Some("alice:a-secret");
    let bob = Some("bob:b-secret");
    let long =
        json!({"prompt": "p", "width": 64, "height": 64, "steps": 1000, "seed": 3}).to_string();
    let reply = send_with(r, Method::POST, "/sdrs/v1/jobs", Some(&long), alice).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let id = reply.json()["id"].as_str().unwrap().to_string();
    for _ in 0..6000 {
        let job = send_with(r, Method::GET, &format!("/sdrs/v1/jobs/{id}"), None, alice)
            .await
            .json();
        if job["step"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Bob sees none of it, and cannot stop it.
    let listed = send_with(r, Method::GET, "/sdrs/v1/jobs", None, bob)
        .await
        .json();
    assert_eq!(listed, json!([]));
    for (method, uri) in [
        (Method::GET, format!("/sdrs/v1/jobs/{id}")),
        (Method::GET, format!("/sdrs/v1/jobs/{id}/events")),
        (Method::GET, format!("/sdrs/v1/jobs/{id}/preview")),
        (Method::GET, format!("/sdrs/v1/jobs/{id}/images/0")),
        (Method::DELETE, format!("/sdrs/v1/jobs/{id}")),
    ] {
        let reply = send_with(r, method, &uri, None, bob).await;
        assert_error(&reply, &[404], "no job");
    }
    let progress = send_with(r, Method::GET, "/sdapi/v1/progress", None, bob)
        .await
        .json();
    assert_eq!(progress["progress"], 0.0);
    assert!(progress["current_image"].is_null());
    send_with(r, Method::POST, "/sdapi/v1/interrupt", None, bob).await;
    send_with(r, Method::POST, "/sdapi/v1/skip", None, bob).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let job = send_with(r, Method::GET, &format!("/sdrs/v1/jobs/{id}"), None, alice)
        .await
        .json();
    assert_eq!(job["state"], "running", "bob's interrupt left it alone");
    assert_eq!(job["image"], 0);

    // Alice sees and stops hers, with the scheme written in lower case.
    let encoded = base64::engine::general_purpose::STANDARD.encode("alice:a-secret");
    let lower = request(Method::POST, "/sdapi/v1/interrupt")
        .header(header::AUTHORIZATION, format!("basic {encoded}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(raw(r, lower).await.status, 200);
    for _ in 0..6000 {
        let job = send_with(r, Method::GET, &format!("/sdrs/v1/jobs/{id}"), None, alice)
            .await
            .json();
        if job["state"] == "interrupted" {
            break;
        }
        assert_eq!(job["state"], "running");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let listed = send_with(r, Method::GET, "/sdrs/v1/jobs", None, alice)
        .await
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let upper = request(Method::GET, "/sdrs/v1/jobs")
        .header(header::AUTHORIZATION, format!("BASIC {encoded}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(raw(r, upper).await.status, 200);
    server.shut_down();
    let _ = std::fs::remove_dir_all(&outdir);
}
