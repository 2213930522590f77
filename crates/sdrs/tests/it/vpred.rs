//! v-prediction and guidance off, on the tiny model, against k-diffusion's CompVisVDenoiser
//! and diffusers' v-prediction DDIM (fixtures/reference/vpred.json, made by
//! tools/make_vpred_fixtures.py); and how a checkpoint's prediction type is detected.

use crate::common;

use std::path::Path;

use sdrs::models::unet::Prediction;
use sdrs::pipeline::txt2img;
use sdrs::sampling::Flow;
use sdrs::weights::Checkpoint;

#[test]
fn v_prediction_and_unguided_runs_match_the_python_reference() {
    let manifest = common::reference_json("vpred.json");
    let cases = manifest["cases"].as_array().expect("vpred.json: cases");
    assert!(cases.len() >= 6, "only {} cases", cases.len());
    for case in cases {
        let file = case["file"].as_str().expect("file");
        let prediction = case["prediction"]
            .as_str()
            .expect("prediction")
            .parse()
            .expect("parse");
        let options = sdrs::pipeline::LoadOptions {
            prediction: Some(prediction),
            ..Default::default()
        };
        let sd = common::load_model_with("tiny-sd1", options);
        let images = txt2img(&sd, &common::request(case).validate().unwrap(), &mut |_| {
            Flow::Continue
        })
        .expect(file)
        .images;
        common::assert_images_close(file, &images[0].image, &common::reference_image(file), 2);
    }
}

#[test]
fn prediction_comes_from_the_scheduler_config_a_sidecar_yaml_or_the_name() {
    let fixtures = common::fixtures();
    let folder = Checkpoint::open(&fixtures.join("tiny-sd1")).expect("folder");
    assert_eq!(folder.prediction(), Prediction::Epsilon);

    let dir = std::env::temp_dir().join(format!("sdrs-vpred-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let v_folder = dir.join("tiny-v");
    std::fs::create_dir_all(v_folder.join("scheduler")).expect("mkdir");
    for part in [
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "model_index.json",
    ] {
        link(&fixtures.join("tiny-sd1").join(part), &v_folder.join(part));
    }
    std::fs::write(
        v_folder.join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"}"#,
    )
    .expect("write config");
    assert_eq!(
        Checkpoint::open(&v_folder).expect("v folder").prediction(),
        Prediction::V
    );

    let single = fixtures.join("tiny-sd1.safetensors");
    let plain = dir.join("model.safetensors");
    link(&single, &plain);
    assert_eq!(
        Checkpoint::open(&plain).expect("plain").prediction(),
        Prediction::Epsilon
    );
    let hinted = dir.join("v2-1_768-v-ema.safetensors");
    link(&single, &hinted);
    assert_eq!(
        Checkpoint::open(&hinted).expect("hint").prediction(),
        Prediction::V
    );
    std::fs::write(
        dir.join("model.yaml"),
        "model:\n  params:\n    parameterization: \"v\"\n",
    )
    .expect("yaml");
    assert_eq!(
        Checkpoint::open(&plain).expect("sidecar").prediction(),
        Prediction::V
    );
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!("v".parse::<Prediction>().expect("v"), Prediction::V);
    assert_eq!(
        "eps".parse::<Prediction>().expect("eps"),
        Prediction::Epsilon
    );
    assert!("x0".parse::<Prediction>().is_err());
}

fn link(from: &Path, to: &Path) {
    std::os::unix::fs::symlink(from, to).expect("symlink");
}
