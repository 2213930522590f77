//! Getting a model by name: the whole download path against a Hub stand-in serving the tiny
//! SD 2 (v-prediction) folder as `stabilityai/sd-turbo`.

use crate::common;
use crate::common::fake_hub::{self, FakeHub};

use std::path::{Path, PathBuf};

use sdrs::hub::{catalogue, Hub};
use sdrs::models::unet::Prediction;
use sdrs::weights::Checkpoint;
use sdrs::Error;

const REPO: &str = fake_hub::TURBO_REPO;
const SERVED: &[(&str, &str)] = fake_hub::TURBO_FILES;
const UNET: &str = "unet/diffusion_pytorch_model.fp16.safetensors";
const VAE: &str = "vae/diffusion_pytorch_model.fp16.safetensors";

fn source() -> PathBuf {
    common::fixtures().join("tiny-sd2-v")
}

fn hub_serving_turbo() -> FakeHub {
    fake_hub::serving_turbo(&source())
}

fn config(name: &str, endpoint: &str) -> Hub {
    let root = std::env::temp_dir().join(format!("sdrs-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    Hub {
        endpoint: endpoint.into(),
        cache_dir: root.join("hub"),
        token: None,
        offline: false,
        model_dir: root.join("models"),
        default_model: catalogue::DEFAULT_MODEL.into(),
    }
}

fn assert_same_files(snapshot: &Path) {
    for (name, on_disk) in SERVED {
        let got = std::fs::read(snapshot.join(name)).unwrap();
        let want = std::fs::read(source().join(on_disk)).unwrap();
        assert!(got == want, "{name} differs from the served file");
    }
}

fn part_files(hub: &Hub) -> Vec<(PathBuf, u64)> {
    let blobs = hub.cache_dir.join("models--stabilityai--sd-turbo/blobs");
    std::fs::read_dir(blobs)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "part"))
                .map(|p| {
                    let len = std::fs::metadata(&p).unwrap().len();
                    (p, len)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_default_model_downloads_into_the_hub_cache_and_opens() {
    let server = hub_serving_turbo();
    let mut hub = config("default", &server.endpoint);
    hub.token = Some("hf_test".into());
    let model = hub.resolve(None, &mut ()).unwrap();
    assert_eq!(model.entry.unwrap().name, "sd-turbo");
    assert_eq!(
        model.path,
        hub.cache_dir
            .join("models--stabilityai--sd-turbo/snapshots")
            .join(fake_hub::COMMIT)
    );
    assert_same_files(&model.path);
    assert_eq!(hub.defaults(None).steps, 1);
    let checkpoint = Checkpoint::open(&model.path).unwrap();
    assert_eq!(checkpoint.prediction(), Prediction::V);

    let log = server.log();
    assert!(log
        .iter()
        .all(|r| r.authorization.as_deref() == Some("Bearer hf_test")));
    // The optional special_tokens_map.json was asked for and its 404 passed over.
    assert!(log
        .iter()
        .any(|r| r.path.ends_with("tokenizer/special_tokens_map.json")));

    // Complete in the cache: the second run asks the Hub nothing.
    let again = hub.resolve(Some("sd-turbo"), &mut ()).unwrap();
    assert_eq!(again.path, model.path);
    assert_eq!(server.log().len(), log.len());
    let _ = std::fs::remove_dir_all(hub.cache_dir.parent().unwrap());
}

#[test]
fn a_broken_transfer_resumes_from_where_it_stopped() {
    let server = hub_serving_turbo();
    let hub = config("resume", &server.endpoint);
    let entry = catalogue::find("sd-turbo").unwrap();

    // Broken once: the client's own retry continues with a range request.
    server.cut(REPO, UNET, 100_000, 1);
    hub.pull(entry, &mut ()).unwrap();
    let ranges: Vec<_> = server
        .log()
        .into_iter()
        .filter(|r| r.path.ends_with(UNET))
        .filter_map(|r| r.range)
        .collect();
    assert!(ranges.contains(&"bytes=100000-".to_string()), "{ranges:?}");
    assert_same_files(&hub.cached(entry).unwrap());
    let _ = std::fs::remove_dir_all(hub.cache_dir.parent().unwrap());

    // Broken more often than the client retries: the run fails, the partial file stays, and the
    // next run continues it.
    let hub = config("resume-later", &server.endpoint);
    server.cut(REPO, VAE, 60_000, 10);
    let start = server.log().len();
    let err = hub.pull(entry, &mut ()).unwrap_err().to_string();
    assert!(err.contains("could not download sd-turbo"), "{err}");
    assert!(err.contains(VAE), "{err}");
    let parts = part_files(&hub);
    assert_eq!(parts.len(), 1, "{parts:?}");
    // Every transfer resumed where the last stopped, so the part file holds all they sent.
    let transfers = server.log()[start..]
        .iter()
        .filter(|r| r.path.ends_with(VAE) && r.range.as_deref() != Some("bytes=0-0"))
        .count() as u64;
    assert!(transfers > 1);
    assert_eq!(parts[0].1, 60_000 * transfers);
    assert!(hub.cached(entry).is_none());

    server.cut(REPO, VAE, 0, 0);
    let before = server.log().len();
    let path = hub.pull(entry, &mut ()).unwrap();
    assert_same_files(&path);
    let resumed: Vec<_> = server.log()[before..]
        .iter()
        .filter(|r| r.path.ends_with(VAE))
        .filter_map(|r| r.range.clone())
        .collect();
    let from = format!("bytes={}-", parts[0].1);
    assert!(resumed.contains(&from), "{resumed:?}");
    assert!(part_files(&hub).is_empty());
    let _ = std::fs::remove_dir_all(hub.cache_dir.parent().unwrap());
}

#[test]
fn a_corrupted_download_is_rejected_and_deleted() {
    let server = hub_serving_turbo();
    let hub = config("corrupt", &server.endpoint);
    let entry = catalogue::find("sd-turbo").unwrap();
    server.corrupt(REPO, VAE, true);
    let err = hub.pull(entry, &mut ()).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains(VAE), "{err}");
    assert!(hub.cached(entry).is_none());
    let blobs = hub.cache_dir.join("models--stabilityai--sd-turbo/blobs");
    let vae_sha = {
        use sha2::Digest;
        let bytes =
            std::fs::read(source().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
        sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert!(!blobs.join(&vae_sha).exists(), "the corrupt blob stayed");

    server.corrupt(REPO, VAE, false);
    let path = hub.pull(entry, &mut ()).unwrap();
    assert_same_files(&path);
    let _ = std::fs::remove_dir_all(hub.cache_dir.parent().unwrap());
}

#[test]
fn without_a_hub_the_error_says_what_was_tried_and_where_to_put_a_file() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let hub = config("offline", &endpoint);
    let err = hub.resolve(None, &mut ()).unwrap_err();
    assert!(matches!(err, Error::Download { .. }));
    let msg = err.to_string();
    for part in [
        "could not download sd-turbo",
        endpoint.as_str(),
        "stabilityai/sd-turbo",
        "no connection",
        "sd-turbo.safetensors",
        "--model PATH",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }

    let mut offline = hub.clone();
    offline.offline = true;
    let msg = offline.resolve(None, &mut ()).unwrap_err().to_string();
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");

    let msg = hub.resolve(Some("sd-9"), &mut ()).unwrap_err().to_string();
    assert!(msg.contains("sd-turbo, sd-1.5, sd-2.1"), "{msg}");
    // A path that is not there is a missing file, not an unknown catalogue name.
    let err = hub.resolve(Some("/no/such/model.safetensors"), &mut ());
    assert!(matches!(err, Err(Error::Io { .. })), "{err:?}");

    // A model put in the model folder by hand is used without the network.
    std::fs::create_dir_all(&hub.model_dir).unwrap();
    let by_hand = hub.model_dir.join("sd-turbo.safetensors");
    std::fs::copy(common::fixtures().join("tiny-sd1.safetensors"), &by_hand).unwrap();
    let model = hub.resolve(None, &mut ()).unwrap();
    assert_eq!(model.path, by_hand);
    assert_eq!(model.entry.unwrap().name, "sd-turbo");
    let _ = std::fs::remove_dir_all(hub.cache_dir.parent().unwrap());
}

#[test]
fn removing_a_model_deletes_its_files_and_nothing_else() {
    let server = hub_serving_turbo();
    let hub = config("remove", &server.endpoint);
    let entry = catalogue::find("sd-turbo").unwrap();
    hub.pull(entry, &mut ()).unwrap();
    let other = hub.cache_dir.join("models--someone--else/blobs/x");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    std::fs::write(&other, b"keep").unwrap();

    let want: u64 = SERVED
        .iter()
        .map(|(_, f)| std::fs::metadata(source().join(f)).unwrap().len())
        .sum();
    assert_eq!(hub.remove(entry).unwrap(), want);
    assert!(!hub.cache_dir.join("models--stabilityai--sd-turbo").exists());
    assert!(other.exists());
    assert!(hub.cached(entry).is_none());
    assert_eq!(hub.remove(entry).unwrap(), 0);
    let _ = std::fs::remove_dir_all(hub.cache_dir.parent().unwrap());
}
