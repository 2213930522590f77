//! A1111's "infotext": the text that says what made an image, written into PNGs and read back.

use crate::prompt::{prompt_edits_with, EditClock, EditTimeline, PromptSyntax};
use crate::sampling::rng::{NormalVariant, RandnSource};
use crate::sampling::{Sampler, SigmaSchedule};

use super::{Generation, GenerationRequest};

/// What the infotext says beyond the request: the model, the image's own seed, and whether
/// the image came from img2img.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageFacts {
    /// The image's own seed.
    pub seed: u64,
    /// The model's name (`Model`).
    pub model_name: String,
    /// The checkpoint's short hash (`Model hash`).
    pub model_hash: Option<String>,
    /// True for img2img, whose infotext carries A1111's `Denoising strength`.
    pub img2img: bool,
    /// True when the UNet and the VAE multiplied in bf16 (`--fast`): `Precision: bf16`.
    pub fast: bool,
    /// `(name, short hash)` of the LoRAs merged (`Lora hashes`).
    pub lora_hashes: Vec<(String, String)>,
    /// `(name, short hash)` of the embeddings the prompts used: `TI hashes`.
    pub ti_hashes: Vec<(String, String)>,
}

/// A1111 quotes a value holding `,`, `:` or a newline as a JSON string.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
    } else {
        value.to_string()
    }
}

/// A float the way Python prints it: `7` for 7.0, `7.5` for 7.5.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Whether `gen` reads its edits on the old timeline and that changes them: A1111 then writes
/// `Old prompt editing timelines: True` (it compares the two timelines' schedules of both
/// prompts, for each pass).
fn old_timeline_matters(gen: &Generation) -> bool {
    let req = &gen.request;
    if req.edit_timeline != EditTimeline::Old {
        return false;
    }
    let mut clocks = vec![EditClock::new(req.steps, EditTimeline::Old)];
    if let Some(hires) = gen.hires {
        clocks.push(EditClock::second_pass(
            req.steps,
            hires.steps,
            EditTimeline::Old,
        ));
    }
    clocks.into_iter().any(|old| {
        let current = EditClock {
            timeline: EditTimeline::Current,
            ..old
        };
        [&req.prompt, &req.negative_prompt]
            .into_iter()
            .any(|text| prompt_edits_with(text, old).ok() != prompt_edits_with(text, current).ok())
    })
}

/// A1111's `TI hashes` value: `name: hash, ...`, each name without `:` and `,`.
fn ti_hashes(hashes: &[(String, String)]) -> String {
    hashes
        .iter()
        .map(|(name, hash)| format!("{}: {hash}", name.replace([':', ','], "")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renders the infotext of one image of `gen`.
pub fn render(gen: &Generation, facts: &ImageFacts) -> String {
    let req = &gen.request;
    let schedule = gen.schedule;
    let mut params: Vec<(&str, String)> = vec![
        ("Steps", req.steps.to_string()),
        ("Sampler", gen.sampler.name().to_string()),
    ];
    if schedule != SigmaSchedule::Normal {
        params.push(("Schedule type", schedule.to_string()));
    }
    params.push(("CFG scale", number(req.cfg_scale)));
    params.push(("Seed", super::signed_seed(facts.seed).to_string()));
    params.push(("Size", format!("{}x{}", req.width, req.height)));
    if let Some(hash) = &facts.model_hash {
        params.push(("Model hash", hash.clone()));
    }
    if !facts.model_name.is_empty() {
        params.push(("Model", facts.model_name.clone()));
    }
    if facts.img2img || req.enable_hr {
        params.push(("Denoising strength", number(req.denoising_strength)));
    }
    if req.enable_hr {
        if req.hr_resize_x > 0 || req.hr_resize_y > 0 {
            params.push((
                "Hires resize",
                format!("{}x{}", req.hr_resize_x, req.hr_resize_y),
            ));
        } else {
            params.push(("Hires upscale", number(req.hr_scale)));
        }
        if req.hr_second_pass_steps > 0 {
            params.push(("Hires steps", req.hr_second_pass_steps.to_string()));
        }
        params.push(("Hires upscaler", req.hr_upscaler.clone()));
    }
    // A1111 names DDIM's η and the ancestral samplers' apart, and writes either only when
    // it is not the sampler's default.
    let options = gen.options;
    if gen.sampler.uses_eta() && options.eta != gen.sampler.default_eta() {
        let key = match gen.sampler {
            Sampler::Ddim => "Eta DDIM",
            _ => "Eta",
        };
        params.push((key, number(options.eta)));
    }
    if gen.sampler == Sampler::EulerAncestral && options.s_noise != 1.0 {
        params.push(("Sigma noise", number(options.s_noise)));
    }
    if req.clip_skip > 1 {
        params.push(("Clip skip", req.clip_skip.to_string()));
    }
    if req.prompt_syntax != PromptSyntax::default() {
        params.push(("Prompt syntax", req.prompt_syntax.to_string()));
    }
    if old_timeline_matters(gen) {
        params.push(("Old prompt editing timelines", "True".into()));
    }
    if !facts.lora_hashes.is_empty() {
        let list: Vec<String> = facts
            .lora_hashes
            .iter()
            .map(|(name, hash)| format!("{name}: {hash}"))
            .collect();
        params.push(("Lora hashes", list.join(", ")));
    }
    if facts.fast {
        params.push(("Precision", "bf16".into()));
    }
    params.push(("RNG", req.randn_source.to_string()));
    if req.randn_source == RandnSource::Cpu && req.rng_math != NormalVariant::default() {
        params.push(("RNG math", req.rng_math.to_string()));
    }
    if !facts.ti_hashes.is_empty() {
        params.push(("TI hashes", ti_hashes(&facts.ti_hashes)));
    }
    params.push(("Version", format!("sdrs {}", env!("CARGO_PKG_VERSION"))));
    let line = params
        .iter()
        .map(|(k, v)| format!("{k}: {}", quote(v)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = req.prompt.clone();
    if !req.negative_prompt.is_empty() {
        text.push_str("\nNegative prompt: ");
        text.push_str(&req.negative_prompt);
    }
    text.push('\n');
    text.push_str(&line);
    text
}

/// An infotext split into its parts: prompt, negative prompt and the `key: value` list in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Infotext {
    /// The prompt (every line before the negative prompt and the parameters).
    pub prompt: String,
    /// The negative prompt, empty when the infotext has none.
    pub negative_prompt: String,
    /// The `key: value` parameters, in order.
    pub params: Vec<(String, String)>,
}

impl Infotext {
    /// The value of a parameter, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether A1111 before 1.6 wrote this infotext about a prompt with brackets: A1111 then
    /// reads it back on the old editing timeline (its `backcompat`), and so does sdrs.
    fn before_a1111_1_6(&self) -> bool {
        let Some(version) = self.get("Version").and_then(|v| v.trim().strip_prefix('v')) else {
            return false;
        };
        let mut numbers = version.split('.').map(|n| n.parse::<u32>().ok());
        let (Some(Some(major)), Some(Some(minor))) = (numbers.next(), numbers.next()) else {
            return false;
        };
        (major, minor) < (1, 6) && self.prompt.contains('[')
    }

    /// The request this infotext describes; fields it does not mention keep their defaults.
    pub fn to_request(&self) -> GenerationRequest {
        let mut req = GenerationRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            ..Default::default()
        };
        let parsed = |key: &str| self.get(key).and_then(|v| v.trim().parse::<f64>().ok());
        if let Some(v) = parsed("Steps") {
            req.steps = v as usize;
        }
        if let Some(v) = self.get("Sampler") {
            req.sampler_name = v.to_string();
        }
        if let Some(v) = self.get("Schedule type").and_then(|v| v.parse().ok()) {
            req.scheduler = v;
        }
        if let Some(v) = parsed("CFG scale") {
            req.cfg_scale = v;
        }
        if let Some(v) = parsed("Seed") {
            req.seed = v as i64;
        }
        if let Some((w, h)) = self.get("Size").and_then(|s| s.split_once('x')) {
            if let (Ok(w), Ok(h)) = (w.trim().parse(), h.trim().parse()) {
                (req.width, req.height) = (w, h);
            }
        }
        if let Some(v) = parsed("Denoising strength") {
            req.denoising_strength = v;
        }
        if let Some(v) = parsed("Hires upscale") {
            (req.enable_hr, req.hr_scale) = (true, v);
        }
        if let Some((x, y)) = self.get("Hires resize").and_then(|s| s.split_once('x')) {
            if let (Ok(x), Ok(y)) = (x.trim().parse(), y.trim().parse()) {
                (req.enable_hr, req.hr_resize_x, req.hr_resize_y) = (true, x, y);
            }
        }
        if let Some(v) = parsed("Hires steps") {
            req.hr_second_pass_steps = v as usize;
        }
        if let Some(v) = self.get("Hires upscaler") {
            req.hr_upscaler = v.to_string();
        }
        if let Some(v) = parsed("Eta DDIM").or_else(|| parsed("Eta")) {
            req.eta = Some(v);
        }
        if let Some(v) = parsed("Sigma noise") {
            req.s_noise = v;
        }
        if let Some(v) = parsed("Clip skip") {
            req.clip_skip = v as usize;
        }
        if let Some(v) = self.get("Prompt syntax").and_then(|v| v.parse().ok()) {
            req.prompt_syntax = v;
        }
        if self.get("Old prompt editing timelines") == Some("True") || self.before_a1111_1_6() {
            req.edit_timeline = EditTimeline::Old;
        }
        // A1111 writes no `RNG` for its default source, "GPU": torch's CUDA generator, which
        // NV reproduces.
        req.randn_source = self
            .get("RNG")
            .and_then(|v| v.parse().ok())
            .unwrap_or(RandnSource::Nv);
        if let Some(v) = self.get("RNG math").and_then(|v| v.parse().ok()) {
            req.rng_math = v;
        }
        if let Some(list) = self.get("Lora hashes") {
            req.lora_hashes = list
                .split(',')
                .filter_map(|item| {
                    let (name, hash) = item.rsplit_once(':')?;
                    Some((name.trim().to_string(), hash.trim().to_string()))
                })
                .filter(|(name, hash)| !name.is_empty() && !hash.is_empty())
                .take(crate::limits::MAX_LORAS)
                .collect();
        }
        req
    }
}

/// Parses `key: value, key: "quoted, value"` pairs as A1111's `re_param` does.
fn parse_params(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let Some(colon) = rest.find(':') else { break };
        let key = rest[..colon].trim().to_string();
        let valid_key = key
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
            && key
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == ' ' || c == '-' || c == '/');
        if !valid_key {
            break;
        }
        rest = rest[colon + 1..].trim_start();
        let value = if rest.starts_with('"') {
            let mut end = None;
            let mut escaped = false;
            for (i, ch) in rest.char_indices().skip(1) {
                match ch {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            match end {
                Some(end) => {
                    let raw = &rest[..=end];
                    rest = &rest[end + 1..];
                    serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.to_string())
                }
                None => std::mem::take(&mut rest).to_string(),
            }
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            let v = rest[..end].trim().to_string();
            rest = &rest[end..];
            v
        };
        out.push((key, value));
        rest = rest.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    out
}

/// Parses an infotext written by sdrs or by A1111.
pub fn parse(text: &str) -> Infotext {
    let mut lines: Vec<&str> = text.trim().lines().collect();
    let mut info = Infotext::default();
    if let Some(last) = lines.last() {
        let params = parse_params(last);
        // A1111's rule: a last line with fewer than three parameters is part of the prompt.
        if params.len() >= 3 {
            info.params = params;
            lines.pop();
        }
    }
    let mut in_negative = false;
    let (mut prompt, mut negative) = (Vec::new(), Vec::new());
    for line in lines {
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            negative.push(rest.trim_start());
        } else if in_negative {
            negative.push(line);
        } else {
            prompt.push(line);
        }
    }
    info.prompt = prompt.join("\n");
    info.negative_prompt = negative.join("\n");
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_matches_a1111_layout_and_quotes_values() {
        let req = GenerationRequest {
            prompt: "a cat".into(),
            negative_prompt: "blurry".into(),
            steps: 20,
            cfg_scale: 7.0,
            width: 512,
            height: 512,
            sampler_name: "Euler a".into(),
            scheduler: SigmaSchedule::Karras,
            ..Default::default()
        };
        let facts = ImageFacts {
            seed: 1,
            model_name: "v1-5, pruned".into(),
            model_hash: Some("0123456789".into()),
            ..Default::default()
        };
        let text = render(&req.validate().unwrap(), &facts);
        let expected = format!(
            "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 0123456789, Model: \"v1-5, pruned\", RNG: CPU, Version: sdrs {}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(text, expected);
        let back = parse(&text);
        assert_eq!(back.prompt, "a cat");
        assert_eq!(back.negative_prompt, "blurry");
        assert_eq!(back.get("Model"), Some("v1-5, pruned"));
        assert_eq!(back.get("CFG scale"), Some("7"));
    }

    #[test]
    fn request_round_trips_through_the_infotext() {
        let req = GenerationRequest {
            prompt: "a cat, (sitting:1.2)\non a mat".into(),
            negative_prompt: "blurry".into(),
            width: 640,
            height: 384,
            steps: 30,
            cfg_scale: 5.5,
            sampler_name: "DDIM".into(),
            seed: 1234,
            eta: Some(0.25),
            clip_skip: 2,
            prompt_syntax: PromptSyntax::Optimized,
            rng_math: NormalVariant::Scalar,
            ..Default::default()
        };
        let facts = ImageFacts {
            seed: 1234,
            ..Default::default()
        };
        let text = render(&req.validate().unwrap(), &facts);
        assert_eq!(parse(&text).to_request(), req);
    }

    #[test]
    fn eta_is_written_under_a1111s_key_only_when_not_the_samplers_default() {
        let text = |sampler: &str, eta: Option<f64>, s_noise: f64| {
            let req = GenerationRequest {
                sampler_name: sampler.into(),
                eta,
                s_noise,
                ..Default::default()
            };
            render(&req.validate().unwrap(), &ImageFacts::default())
        };
        assert!(!text("Euler a", None, 1.0).contains("Eta"));
        assert!(!text("Euler a", Some(1.0), 1.0).contains("Eta"));
        assert!(!text("DDIM", Some(0.0), 1.0).contains("Eta"));
        assert!(!text("Euler", Some(0.5), 0.5).contains("Eta"));
        let ancestral = text("Euler a", Some(0.5), 0.9);
        assert!(ancestral.contains("Eta: 0.5,"), "{ancestral}");
        assert!(ancestral.contains("Sigma noise: 0.9,"), "{ancestral}");
        let back = parse(&ancestral).to_request();
        assert_eq!((back.eta, back.s_noise), (Some(0.5), 0.9));
        assert!(text("DDIM", Some(0.3), 1.0).contains("Eta DDIM: 0.3,"));
    }

    #[test]
    fn the_old_editing_timeline_is_written_when_it_changes_the_edits_and_read_back() {
        let text = |prompt: &str, timeline: EditTimeline| {
            let req = GenerationRequest {
                prompt: prompt.into(),
                steps: 10,
                edit_timeline: timeline,
                ..Default::default()
            };
            render(&req.validate().unwrap(), &ImageFacts::default())
        };
        let key = "Old prompt editing timelines: True";
        // [a:b:1.0] is step 1 on the old timeline, every step on the current one.
        let old = text("[a:b:1.0]", EditTimeline::Old);
        assert!(old.contains(key), "{old}");
        assert_eq!(parse(&old).to_request().edit_timeline, EditTimeline::Old);
        // Where both timelines agree, A1111 writes nothing.
        assert!(!text("[a:b:0.5]", EditTimeline::Old).contains(key));
        assert!(!text("[a:b:1.0]", EditTimeline::Current).contains(key));
        // A1111 before 1.6 used the old timeline; its backcompat reads such prompts that way.
        let a1111 = |version: &str, prompt: &str| {
            let info = format!("{prompt}\nSteps: 20, Sampler: Euler, Seed: 1, Version: {version}");
            parse(&info).to_request().edit_timeline
        };
        assert_eq!(a1111("v1.5.1", "a [b:c:1.0]"), EditTimeline::Old);
        assert_eq!(a1111("v1.5.1", "a plain prompt"), EditTimeline::Current);
        assert_eq!(a1111("v1.10.1", "a [b:c:1.0]"), EditTimeline::Current);
        assert_eq!(a1111("sdrs 0.1.0", "a [b:c:1.0]"), EditTimeline::Current);
    }

    #[test]
    fn denoising_strength_is_written_for_img2img_only_and_read_back() {
        let req = GenerationRequest {
            prompt: "a fox".into(),
            denoising_strength: 0.6,
            sampler_name: "Euler".into(),
            ..Default::default()
        }
        .validate()
        .unwrap();
        let mut facts = ImageFacts::default();
        assert!(!render(&req, &facts).contains("Denoising"));
        facts.img2img = true;
        let text = render(&req, &facts);
        let info = parse(&text);
        assert_eq!(info.get("Denoising strength"), Some("0.6"));
        assert_eq!(info.to_request().denoising_strength, 0.6);
        let a1111 = "x\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.35";
        assert_eq!(parse(a1111).to_request().denoising_strength, 0.35);
    }

    #[test]
    fn parses_a1111_output_with_multiline_prompt() {
        let a1111 = "masterpiece, (cat:1.2)\nsecond line\nNegative prompt: lowres, bad anatomy\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3919489211, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: \"x: abc, y: def\", Version: v1.10.1";
        let info = parse(a1111);
        assert_eq!(info.prompt, "masterpiece, (cat:1.2)\nsecond line");
        assert_eq!(info.negative_prompt, "lowres, bad anatomy");
        assert_eq!(info.get("Seed"), Some("3919489211"));
        assert_eq!(info.get("Lora hashes"), Some("x: abc, y: def"));
        assert_eq!(info.get("Version"), Some("v1.10.1"));
    }

    #[test]
    fn short_last_line_stays_in_the_prompt() {
        let info = parse("a dog\nstyle: oil");
        assert_eq!(info.prompt, "a dog\nstyle: oil");
        assert!(info.params.is_empty());
    }
}
