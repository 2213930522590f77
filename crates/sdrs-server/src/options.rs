//! A1111's settings as this server keeps them: the few keys `GET /sdapi/v1/options` reports,
//! each with a value of its kind. Anything else is refused rather than kept forever.

use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// Longest model name a client may send (`sd_model_checkpoint`).
const MAX_NAME_BYTES: usize = 4096;

/// The options a new server reports (the loaded model is filled in when asked).
pub fn initial(outdir: &std::path::Path) -> Map<String, Value> {
    match json!({
        "samples_save": true,
        "samples_format": "png",
        "outdir_samples": outdir.display().to_string(),
        "CLIP_stop_at_last_layers": 1,
    }) {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Checks a `POST /sdapi/v1/options` body against the stored options: every key must be one
/// the server reports, with a value it can hold. Answers the changes to store (the model
/// switch and the model's hash are not stored: they follow the loaded model).
pub fn check(
    changes: &Map<String, Value>,
    stored: &Map<String, Value>,
) -> Result<Map<String, Value>, ApiError> {
    let mut problems = Vec::new();
    let mut keep = Map::new();
    for (key, value) in changes {
        let problem = match key.as_str() {
            "sd_model_checkpoint" => match value.as_str() {
                Some(name) if name.len() <= MAX_NAME_BYTES => None,
                Some(_) => Some(format!("at most {MAX_NAME_BYTES} bytes")),
                None => Some("a model title (a string)".into()),
            },
            "sd_checkpoint_hash" => match value {
                Value::Null => None,
                Value::String(s) if s.len() <= 64 => None,
                _ => Some("the loaded model's hash (it cannot be set)".into()),
            },
            "samples_save" => (!value.is_boolean()).then(|| "true or false".into()),
            "samples_format" => (value != "png").then(|| "\"png\" (sdrs saves PNG)".into()),
            "outdir_samples" => (stored.get(key) != Some(value))
                .then(|| "the folder given with --outdir (it cannot be changed over HTTP)".into()),
            "CLIP_stop_at_last_layers" => match value.as_u64() {
                Some(1..=12) => None,
                _ => Some("a whole number from 1 to 12".into()),
            },
            _ => Some("not a setting this server has".into()),
        };
        match problem {
            Some(wanted) => problems.push(format!("{}: {wanted}", shown(key))),
            None if !matches!(key.as_str(), "sd_model_checkpoint" | "sd_checkpoint_hash") => {
                keep.insert(key.clone(), value.clone());
            }
            None => {}
        }
    }
    if problems.is_empty() {
        return Ok(keep);
    }
    problems.sort();
    problems.truncate(10);
    Err(ApiError::invalid(format!(
        "{}; the settings are sd_model_checkpoint, samples_save, samples_format, \
         outdir_samples and CLIP_stop_at_last_layers",
        problems.join("; ")
    )))
}

/// A key as an error message quotes it, cut to 64 characters.
fn shown(key: &str) -> String {
    let mut quoted: String = key.chars().take(64).collect();
    if quoted.len() < key.len() {
        quoted.push('…');
    }
    format!("{quoted:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keys_with_sane_values_are_kept_and_the_rest_refused() {
        let stored = initial(std::path::Path::new("outputs"));
        let ok = json!({"sd_model_checkpoint": "a.safetensors", "samples_format": "png",
                        "samples_save": false, "outdir_samples": "outputs",
                        "CLIP_stop_at_last_layers": 2, "sd_checkpoint_hash": null});
        let kept = check(ok.as_object().unwrap(), &stored).unwrap();
        assert_eq!(kept.len(), 4, "{kept:?}");
        assert!(!kept.contains_key("sd_model_checkpoint"));
        for (bad, says) in [
            (json!({"made_up": 1}), "\"made_up\": not a setting"),
            (json!({"samples_format": "jpg"}), "png"),
            (json!({"outdir_samples": "/etc"}), "--outdir"),
            (json!({"CLIP_stop_at_last_layers": 1000000}), "1 to 12"),
            (json!({"samples_save": "x".repeat(100)}), "true or false"),
            (
                json!({"sd_model_checkpoint": "x".repeat(5000)}),
                "4096 bytes",
            ),
            (json!({"sd_model_checkpoint": 3}), "a string"),
        ] {
            let e = check(bad.as_object().unwrap(), &stored).unwrap_err();
            assert_eq!(e.status, 422);
            assert!(e.detail.contains(says), "{bad}: {}", e.detail);
        }
        let long_key = json!({ "k".repeat(10_000): 1 });
        let e = check(long_key.as_object().unwrap(), &stored).unwrap_err();
        assert!(e.detail.len() < 400, "{}", e.detail);
    }
}
