//! A1111 request bodies → `GenerationRequest`: A1111's defaults, its spellings, its base64
//! images; every mistake a 422 that says which field.

use base64::Engine;
use image::RgbImage;
use sdrs::image_io::decode_image;
use sdrs::limits::{exceeded, MAX_PROMPT_BYTES_TIMES_IMAGES};
use sdrs::pipeline::{Generation, GenerationRequest};
use sdrs::sampling::rng::RandnSource;
use sdrs::sampling::SigmaSchedule;
use serde_json::{Map, Value};

use crate::config::Limits;
use crate::error::ApiError;

/// A request read from a body, validated (seed settled) and within the server's limits.
pub struct ParsedRequest {
    pub request: Generation,
    /// img2img's first `init_images` entry.
    pub init: Option<RgbImage>,
    /// The body with A1111's defaults filled in, as A1111 echoes it in `parameters`.
    pub parameters: Value,
}

/// A1111's API defaults where sdrs' CLI (CompVis') differ: 50 Euler steps at CFG 7, and
/// A1111's default noise ("GPU": torch's CUDA generator, which NV is on any device), so that
/// the same request gives A1111's image.
fn a1111_defaults() -> GenerationRequest {
    GenerationRequest {
        steps: 50,
        cfg_scale: 7.0,
        sampler_name: "Euler".into(),
        randn_source: RandnSource::Nv,
        ..Default::default()
    }
}

/// Reads a txt2img (`init_images` absent) or img2img body. `needs_init` makes a missing
/// init image an error (the img2img route).
pub fn parse(body: &[u8], needs_init: bool, limits: &Limits) -> Result<ParsedRequest, ApiError> {
    let mut fields = json_object(body)?;
    // FastAPI treats null as "use the default" for A1111's optional fields.
    fields.retain(|_, v| !v.is_null());
    normalise(&mut fields)?;
    let init_images = fields.remove("init_images");
    if fields.contains_key("mask") {
        return Err(ApiError::invalid(
            "mask: inpainting is not supported by sdrs yet",
        ));
    }

    let mut merged = match serde_json::to_value(a1111_defaults()) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let sized = (fields.contains_key("width"), fields.contains_key("height"));
    merged.extend(fields);
    let mut request: GenerationRequest = serde_json::from_value(Value::Object(merged.clone()))
        .map_err(|e| ApiError::invalid(format!("invalid field: {e}")))?;

    let init = match init_images {
        Some(Value::Array(images)) if !images.is_empty() => Some(decode_init(&images[0])?),
        Some(Value::Array(_)) | None if needs_init => {
            return Err(ApiError::invalid("init_images: img2img needs one image"))
        }
        Some(Value::Array(_)) | None => None,
        Some(_) => return Err(ApiError::invalid("init_images must be a list")),
    };
    if let Some(init) = &init {
        // Without a size, img2img keeps the picture's (rounded down to 8), as the CLI does.
        let round = |v: u32| (v as usize) / 8 * 8;
        if !sized.0 {
            request.width = round(init.width()).max(8);
        }
        if !sized.1 {
            request.height = round(init.height()).max(8);
        }
    }
    let request = check(&request, limits)?;
    merged.insert("seed".into(), request.request().seed.into());
    if init.is_some() {
        merged.insert("init_images".into(), Value::Null);
    }
    Ok(ParsedRequest {
        request,
        init,
        parameters: Value::Object(merged),
    })
}

/// Runs [`parse`] on arbitrary bytes as both the txt2img and the img2img route would: the
/// fuzz target's entry point, not part of the API.
#[doc(hidden)]
pub fn fuzz_parse(body: &[u8]) {
    let limits = Limits::default();
    let _ = parse(body, false, &limits);
    let _ = parse(body, true, &limits);
}

/// A1111's other spellings: `sampler_index` (deprecated) for `sampler_name`, scheduler
/// labels ("Automatic", "Karras", "SGM Uniform") for sdrs' names, and the per-request
/// settings sdrs reads from `override_settings`: `use_old_scheduling` (the editing timeline)
/// and `randn_source` (GPU, CPU or NV).
fn normalise(fields: &mut Map<String, Value>) -> Result<(), ApiError> {
    if let Some(Value::Object(settings)) = fields.get("override_settings") {
        match settings.get("randn_source") {
            None | Some(Value::Null) => {}
            Some(Value::String(source)) => {
                let source: RandnSource = source.parse().map_err(|e: sdrs::Error| {
                    ApiError::invalid(format!("override_settings.randn_source: {e}"))
                })?;
                fields
                    .entry("randn_source")
                    .or_insert_with(|| source.to_string().into());
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "override_settings.randn_source must be a string",
                ))
            }
        }
    }
    if let Some(Value::Object(settings)) = fields.get("override_settings") {
        match settings.get("use_old_scheduling") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(old)) => {
                let timeline = if *old { "old" } else { "current" };
                fields
                    .entry("edit_timeline")
                    .or_insert_with(|| timeline.into());
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "override_settings.use_old_scheduling must be true or false",
                ))
            }
        }
    }
    if let Some(index) = fields.remove("sampler_index") {
        fields.entry("sampler_name").or_insert(index);
    }
    if let Some(Value::String(s)) = fields.get("scheduler").cloned() {
        let schedule: SigmaSchedule = s
            .parse()
            .map_err(|e: sdrs::Error| ApiError::invalid(format!("scheduler: {e}")))?;
        let canonical = serde_json::to_value(schedule).unwrap_or(Value::Null);
        fields.insert("scheduler".into(), canonical);
    }
    Ok(())
}

/// A request body that must be a JSON object.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(ApiError::invalid("the body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

/// The bytes of a base64 field, with or without a `data:image/...;base64,` prefix.
pub fn decode_base64(value: &Value, field: &str) -> Result<Vec<u8>, ApiError> {
    let text = value
        .as_str()
        .ok_or_else(|| ApiError::invalid(format!("{field} must be a base64 string")))?;
    let payload = match text.split_once(";base64,") {
        Some((head, data)) if head.starts_with("data:") => data,
        _ => text,
    };
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::invalid(format!("{field} is not base64: {e}")))
}

/// Decodes an image sent as base64 (see [`decode_base64`]).
fn decode_base64_image(value: &Value, field: &str) -> Result<RgbImage, ApiError> {
    image_from_bytes(&decode_base64(value, field)?, field)
}

/// Decodes a field's image file bytes.
pub fn image_from_bytes(bytes: &[u8], field: &str) -> Result<RgbImage, ApiError> {
    decode_image(bytes).map_err(|e| ApiError::invalid(format!("{field} is not an image: {e}")))
}

fn decode_init(value: &Value) -> Result<RgbImage, ApiError> {
    let image = decode_base64_image(value, "init_images[0]")?;
    if image.width() < 8 || image.height() < 8 {
        return Err(ApiError::invalid(format!(
            "init_images[0] is {}x{}; it needs at least 8 pixels a side",
            image.width(),
            image.height()
        )));
    }
    Ok(image)
}

/// The request's own checks, then the server's limits.
fn check(request: &GenerationRequest, limits: &Limits) -> Result<Generation, ApiError> {
    let generation = request
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    for (field, text) in [
        ("prompt", &request.prompt),
        ("negative_prompt", &request.negative_prompt),
    ] {
        if text.len() > limits.max_prompt_bytes {
            return Err(ApiError::invalid(format!(
                "{field} is {} bytes; this server accepts at most {} (--max-prompt-bytes)",
                text.len(),
                limits.max_prompt_bytes
            )));
        }
    }
    // The answer and the job's infotexts repeat both prompts for every image.
    let text = request.prompt.len() + request.negative_prompt.len();
    let total = text.saturating_mul(request.image_count());
    if total > MAX_PROMPT_BYTES_TIMES_IMAGES {
        return Err(ApiError::invalid(
            exceeded(
                format!(
                    "(prompt + negative prompt bytes) × images ({text} × {})",
                    request.image_count()
                ),
                total,
                "MAX_PROMPT_BYTES_TIMES_IMAGES",
                MAX_PROMPT_BYTES_TIMES_IMAGES,
            )
            .to_string(),
        ));
    }
    let pixels = request
        .width
        .saturating_mul(request.height)
        .saturating_mul(request.image_count());
    if pixels > limits.max_pixels {
        return Err(ApiError::invalid(format!(
            "{}x{} × {} images is {pixels} pixels; this server accepts at most {} per request",
            request.width,
            request.height,
            request.image_count(),
            limits.max_pixels
        )));
    }
    Ok(generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(body: &str) -> Result<ParsedRequest, ApiError> {
        parse(body.as_bytes(), false, &Limits::default())
    }

    #[test]
    fn a1111_defaults_fill_what_the_body_leaves_out() {
        let p = parse_json(r#"{"prompt": "a cat", "seed": 5, "unknown_field": [1, 2]}"#).unwrap();
        assert_eq!(p.request.request().prompt, "a cat");
        assert_eq!(p.request.request().steps, 50);
        assert_eq!(p.request.request().cfg_scale, 7.0);
        assert_eq!(p.request.request().sampler_name, "Euler");
        assert_eq!(p.request.request().seed, 5);
        assert_eq!(p.parameters["steps"], 50);
        assert!(p.init.is_none());
    }

    #[test]
    fn a1111_spellings_and_nulls_are_understood() {
        let p = parse_json(
            r#"{"sampler_index": "Euler a", "scheduler": "Automatic", "hr_sampler_name": null,
                "steps": 20, "seed": -1, "cfg_scale": 7}"#,
        )
        .unwrap();
        assert_eq!(p.request.request().sampler_name, "Euler a");
        assert_eq!(p.request.request().scheduler, SigmaSchedule::Normal);
        assert!(
            p.request.request().seed >= 0,
            "a random seed is drawn at once"
        );
        let old = parse_json(r#"{"override_settings": {"use_old_scheduling": true}}"#).unwrap();
        assert_eq!(
            old.request.request().edit_timeline,
            sdrs::prompt::EditTimeline::Old
        );
        let k = parse_json(r#"{"scheduler": "SGM Uniform"}"#).unwrap();
        assert_eq!(k.request.request().scheduler, SigmaSchedule::SgmUniform);
    }

    #[test]
    fn mistakes_are_422_with_the_field() {
        let cases = [
            ("{not json", "not valid JSON"),
            ("[1]", "JSON object"),
            (r#"{"steps": "many"}"#, "invalid type"),
            (r#"{"width": -64}"#, "invalid value"),
            (r#"{"width": 500}"#, "multiples of 8"),
            (r#"{"sampler_name": "Nope"}"#, "unknown sampler"),
            (r#"{"scheduler": "weird"}"#, "scheduler"),
            (
                r#"{"width": 4096, "height": 4096, "batch_size": 2}"#,
                "at most",
            ),
            (
                r#"{"batch_size": 8589934592, "n_iter": 8589934592}"#,
                "MAX_IMAGES",
            ),
            (r#"{"init_images": "abc"}"#, "must be a list"),
            (r#"{"init_images": ["%%%"]}"#, "not base64"),
            (r#"{"init_images": ["aGVsbG8="]}"#, "not an image"),
            (r#"{"mask": "x"}"#, "inpainting"),
            (
                r#"{"override_settings": {"use_old_scheduling": "yes"}}"#,
                "use_old_scheduling",
            ),
        ];
        for (body, expected) in cases {
            let e = parse_json(body)
                .err()
                .unwrap_or_else(|| panic!("{body} was accepted"));
            assert_eq!(e.status, 422, "{body}");
            assert!(e.detail.contains(expected), "{body}: {}", e.detail);
        }
        let e = parse(b"{}", true, &Limits::default()).err().unwrap();
        assert!(e.detail.contains("init_images"), "{}", e.detail);
    }

    #[test]
    fn an_init_image_sets_the_size_unless_given() {
        let img = RgbImage::from_pixel(70, 41, image::Rgb([10, 20, 30]));
        let png = sdrs::image_io::encode_png(&img, None).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(png);
        let body = format!(r#"{{"init_images": ["data:image/png;base64,{b64}"]}}"#);
        let p = parse(body.as_bytes(), true, &Limits::default()).unwrap();
        assert_eq!(
            (p.request.request().width, p.request.request().height),
            (64, 40)
        );
        assert_eq!(p.init.unwrap().dimensions(), (70, 41));
        assert!(p.parameters["init_images"].is_null());
        let body = format!(r#"{{"init_images": ["{b64}"], "width": 128}}"#);
        let p = parse(body.as_bytes(), true, &Limits::default()).unwrap();
        assert_eq!(
            (p.request.request().width, p.request.request().height),
            (128, 40)
        );
    }
}
