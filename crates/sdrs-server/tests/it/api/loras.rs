//! The LoRA folder through the server (issue 15): listed at `/sdapi/v1/loras` as A1111 lists
//! it, rescanned by `/sdapi/v1/refresh-loras`, used by jobs' `<lora:…>` tags.

use super::*;

/// A model folder with the tiny model and, beside it in `loras/`, one fixture LoRA.
fn models_with_a_lora(name: &str) -> PathBuf {
    let root = scratch(name);
    let models = root.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::create_dir_all(loras_of(&models)).unwrap();
    std::fs::copy(tiny_model(), models.join("tiny-sd1.safetensors")).unwrap();
    std::fs::copy(
        fixtures().join("lora/kohya_locon.safetensors"),
        loras_of(&models).join("kohya_locon.safetensors"),
    )
    .unwrap();
    models
}

/// The LoRA folder beside a model folder.
fn loras_of(models: &Path) -> PathBuf {
    models.parent().unwrap().join("loras")
}

fn infotext(reply: &Reply) -> String {
    let answer = ok_json(reply);
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    info["infotexts"][0].as_str().unwrap().to_string()
}

fn names(list: &Value) -> Vec<String> {
    let list = list.as_array().expect("a list");
    list.iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loras_beside_the_models_are_listed_used_by_jobs_and_rescanned_on_request() {
    let outdir = scratch("loras-out");
    let models = models_with_a_lora("loras-models");
    let mut cfg = config(&outdir);
    cfg.model = None;
    cfg.models_dir = Some(models.clone());
    let server = Server::start(&cfg).unwrap();
    let r = &server.router;

    // The LoRA is no checkpoint; it is a LoRA, listed in A1111's shape, its path relative
    // to the folder.
    let checkpoints = send(r, Method::GET, "/sdapi/v1/sd-models", None)
        .await
        .json();
    let titles: Vec<_> = checkpoints
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["title"].clone())
        .collect();
    assert_eq!(titles, [json!("tiny-sd1.safetensors")]);
    let reply = send(r, Method::GET, "/sdapi/v1/loras", None).await;
    let list = ok_json(&reply);
    assert_eq!(
        list,
        json!([{"name": "kohya_locon", "alias": "kohya_locon",
                "path": "kohya_locon.safetensors", "metadata": {}}])
    );
    let body = String::from_utf8_lossy(&reply.body);
    assert!(
        !body.contains(&*models.to_string_lossy()),
        "the server's folders leak: {body}"
    );

    // Two jobs with the same LoRA: both carry its hash, and give the same image (the merge
    // made for the first one serves the second). Without the tag, another image.
    let hash = sdrs::lora::LoraLibrary::new(None)
        .short_hash(&loras_of(&models).join("kohya_locon.safetensors"))
        .unwrap();
    let job =
        |prompt: &str| json!({"prompt": prompt, "width": 64, "height": 64, "steps": 2, "seed": 5});
    let with_lora = job("a fox <lora:kohya_locon:1>");
    let first = post(r, "/sdapi/v1/txt2img", &with_lora).await;
    let second = post(r, "/sdapi/v1/txt2img", &with_lora).await;
    let plain = post(r, "/sdapi/v1/txt2img", &job("a fox")).await;
    let want = format!("Lora hashes: \"kohya_locon: {hash}\"");
    for reply in [&first, &second] {
        let text = infotext(reply);
        assert!(text.contains(&want), "{text:?} lacks {want:?}");
    }
    assert!(!infotext(&plain).contains("Lora hashes"));
    let pixels = |reply: &Reply| decode_png(reply.json()["images"][0].as_str().unwrap());
    assert_eq!(pixels(&first), pixels(&second));
    assert_ne!(pixels(&first), pixels(&plain));

    // A LoRA added while the server runs is unknown until the folder is rescanned; then both
    // the listing and the worker know it.
    std::fs::copy(
        fixtures().join("lora/loha.safetensors"),
        loras_of(&models).join("loha.safetensors"),
    )
    .unwrap();
    let loha = job("a fox <lora:loha:1>");
    let before = post(r, "/sdapi/v1/txt2img", &loha).await;
    assert!(before.status.is_client_error(), "{}", before.status);
    assert!(String::from_utf8_lossy(&before.body).contains("no LoRA called \\\"loha\\\""));
    let refreshed = send(r, Method::POST, "/sdapi/v1/refresh-loras", None).await;
    assert_eq!(ok_json(&refreshed), Value::Null);
    let list = send(r, Method::GET, "/sdapi/v1/loras", None).await.json();
    assert_eq!(names(&list), ["kohya_locon", "loha"]);
    let after = post(r, "/sdapi/v1/txt2img", &loha).await;
    assert!(infotext(&after).contains("Lora hashes: \"loha: "));

    // The routes sit behind the server's guards like the rest.
    let reply = raw(
        r,
        Request::builder()
            .method(Method::POST)
            .uri("/sdapi/v1/refresh-loras")
            .header(header::HOST, "127.0.0.1:7860")
            .header(header::ORIGIN, "https://evil.example")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 403);
    let reply = send(r, Method::GET, "/sdapi/v1/refresh-loras", None).await;
    assert_eq!(reply.status, 405);
    server.shut_down();
    std::fs::remove_dir_all(&outdir).unwrap();
    std::fs::remove_dir_all(&models).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_dir_overrides_the_folder_beside_the_model() {
    let outdir = scratch("lora-dir-out");
    let models = models_with_a_lora("lora-dir-models");
    let elsewhere = scratch("lora-dir-elsewhere");
    std::fs::create_dir_all(elsewhere.join("styles")).unwrap();
    std::fs::copy(
        fixtures().join("lora/lokr.safetensors"),
        elsewhere.join("styles/lokr.safetensors"),
    )
    .unwrap();
    let mut cfg = config(&outdir);
    cfg.model = Some(models.join("tiny-sd1.safetensors"));
    let beside = Server::start(&cfg).unwrap();
    let list = send(&beside.router, Method::GET, "/sdapi/v1/loras", None)
        .await
        .json();
    assert_eq!(names(&list), ["kohya_locon"]);
    beside.shut_down();

    cfg.lora_dir = Some(elsewhere.clone());
    let server = Server::start(&cfg).unwrap();
    let list = send(&server.router, Method::GET, "/sdapi/v1/loras", None)
        .await
        .json();
    assert_eq!(names(&list), ["lokr"]);
    assert_eq!(list[0]["path"], "styles/lokr.safetensors");
    let reply = post(
        &server.router,
        "/sdapi/v1/txt2img",
        &json!({"prompt": "<lora:lokr:0.5> a fox", "width": 64, "height": 64, "steps": 1}),
    )
    .await;
    assert!(infotext(&reply).contains("Lora hashes: \"lokr: "));
    server.shut_down();
    for dir in [outdir, models, elsewhere] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}
