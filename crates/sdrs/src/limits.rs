//! Every bound on a count or size that comes from outside — arguments, request fields, file
//! headers, pickle opcodes, configs, tensor names — in one place. Each is checked before
//! anything is allocated or looped over, and the error names the limit and the value.

/// Largest width or height of a generated image, in pixels.
pub const MAX_SIDE: usize = 8192;
/// Largest width × height of a generated image (a 4096² image).
pub const MAX_PIXELS: usize = 4096 * 4096;
/// Most sampling steps of one pass (the training schedule has 1000 timesteps), the hires fix's
/// second pass included.
pub const MAX_STEPS: usize = 1000;
/// Longest sigma schedule a k-diffusion pass is cut from (the hires fix runs the last steps of
/// a schedule of steps ÷ denoising strength).
pub const MAX_SCHEDULE_STEPS: usize = 100 * MAX_STEPS;
/// Most steps of a schedule that walks the training timesteps (DDIM, PLMS): every step needs
/// its own timestep after the first, 1..=999.
pub const MAX_TIMESTEP_STEPS: usize = crate::sampling::schedule::TRAIN_STEPS - 1;
/// Most images one request makes (batch size × iterations).
pub const MAX_IMAGES: usize = 10_000;
/// Longest prompt or negative prompt, in bytes of UTF-8.
pub const MAX_PROMPT_BYTES: usize = 64 << 10;
/// Deepest nesting of `(`/`[` in a prompt; the prompt parsers never go deeper.
pub const MAX_PROMPT_NESTING: usize = 128;
/// Most AND parts or optimizedSD sub-prompts in one prompt: each AND part is one more UNet
/// pass per step, each sub-prompt one more text encoding.
pub const MAX_PROMPT_PARTS: usize = 32;
/// Most 75-token chunks one prompt is encoded as (2,400 tokens); each adds 77 tokens to every
/// cross-attention of every step.
pub const MAX_PROMPT_CHUNKS: usize = 32;

// Pictures, upscaling and benchmarks.

/// Most runs of each phase `sdrs bench` times.
pub const MAX_BENCH_REPEATS: usize = 100;
/// Largest width or height of a picture read (init images, upscaler input), in pixels.
pub const MAX_INPUT_SIDE: u32 = 16384;
/// Largest width × height of a picture read (64 megapixels), checked before decoding.
pub const MAX_INPUT_PIXELS: u64 = 8192 * 8192;
/// Largest width or height an upscaler writes, in pixels.
pub const MAX_UPSCALED_SIDE: usize = 16384;
/// Largest width × height an upscaler writes (64 megapixels: 192 MiB of RGB).
pub const MAX_UPSCALED_PIXELS: usize = 8192 * 8192;
/// Largest side of the input one upscaler network pass sees (a tile with its padding, or the
/// whole picture without tiles): its activations grow with the square of it.
pub const MAX_UPSCALE_TILE: usize = 2048;

// Checkpoint files: zip archives, pickles, safetensors headers. Real files stay far below
// these (SD 1.5 with EMA weights: ~2,300 tensors, a 300 KB pickle of ~60,000 opcodes).

/// Most tensors one checkpoint file may name (safetensors header entries or state-dict tensors).
pub const MAX_TENSORS: usize = 100_000;
/// Most members of a torch zip archive (one per tensor storage, plus a few records).
pub const MAX_ZIP_MEMBERS: usize = 100_000;
/// Largest safetensors JSON header, in bytes (the safetensors crate's own bound).
pub const MAX_SAFETENSORS_HEADER: usize = 100_000_000;
/// Largest `data.pkl` of a torch zip, in bytes.
pub const MAX_PICKLE_BYTES: usize = 64 << 20;
/// Most opcodes one pickle may execute.
pub const MAX_PICKLE_OPS: usize = 8_000_000;
/// Most values one pickle may create (each is a slot of the reader's arena).
pub const MAX_PICKLE_OBJECTS: usize = 2_000_000;
/// Deepest the pickle machine's stack may grow, values and marks together: what bounds lists
/// nested on the stack. (Nesting built through the memo costs no stack and no recursion.)
pub const MAX_PICKLE_STACK: usize = 100_000;
/// Most items in one pickled list, tuple, set or dict.
pub const MAX_PICKLE_CONTAINER: usize = 1_000_000;

// Model architectures, whether read from a diffusers config.json or counted from tensor names.

/// Most resolution levels of a UNet (SD: 4, SDXL: 3).
pub const MAX_UNET_LEVELS: usize = 8;
/// Most resnets per UNet or VAE level (SD: 2).
pub const MAX_LAYERS_PER_BLOCK: usize = 16;
/// Most numbered `input_blocks` of a CompVis UNet: conv_in, then per level its layers and
/// a downsampler.
pub const MAX_UNET_INPUT_BLOCKS: usize = 1 + MAX_UNET_LEVELS * (MAX_LAYERS_PER_BLOCK + 1);
/// Most transformer blocks in one UNet attention (SD: 1, SDXL: 10).
pub const MAX_TRANSFORMER_DEPTH: usize = 64;
/// Most layers of a CLIP text encoder (SD 1: 12, SD 2: 24, SDXL's bigG: 32).
pub const MAX_CLIP_LAYERS: usize = 64;
/// Most resolution levels of a VAE (SD: 4).
pub const MAX_VAE_LEVELS: usize = 8;
/// Widest channel count or hidden width of any layer (SD: 1280; CLIP bigG's MLP: 5120).
pub const MAX_CHANNELS: usize = 16_384;
/// Largest text-encoder vocabulary (CLIP: 49,408).
pub const MAX_VOCAB: usize = 1 << 20;
/// Most text-encoder positions (CLIP: 77).
pub const MAX_POSITIONS: usize = 4096;
/// Most numbered layers of an upscaler network (RRDB blocks, or a compact net's layers).
pub const MAX_UPSCALER_LAYERS: usize = 256;
/// Largest factor per side an upscaler network enlarges by (ESRGAN: 4).
pub const MAX_NETWORK_SCALE: usize = 16;

// Textual-inversion embeddings.

/// Largest embedding file read, in bytes (a 75-vector embedding of width 1280 in float32 is
/// 384 KB; A1111's `.pt` files add a few KB of pickle).
pub const MAX_EMBEDDING_BYTES: u64 = 8 << 20;
/// Most vectors one embedding may have: all of them must fit in one 75-token chunk.
pub const MAX_EMBEDDING_VECTORS: usize = crate::prompt::CHUNK_TOKENS;
/// Most files one embeddings folder scan looks at, subfolders included.
pub const MAX_EMBEDDING_FILES: usize = 10_000;
/// How deep into subfolders of the embeddings folder a scan goes (0: the folder only).
pub const MAX_EMBEDDING_DEPTH: usize = 2;

// The server.

/// Most prompt text one request may ask for in all: (prompt + negative prompt bytes) × images.
/// The answer repeats both prompts for every image (A1111's `all_prompts`, `infotexts`), so
/// this bounds an answer's size and the memory its infotexts take (a 64 KiB prompt for 64
/// images, or a 1 KiB one for 4096).
pub const MAX_PROMPT_BYTES_TIMES_IMAGES: usize = 4 << 20;
/// Largest body of `POST /sdapi/v1/options`: a handful of short settings.
pub const MAX_OPTIONS_BODY_BYTES: usize = 64 << 10;

/// Whether an image of `width` × `height` pixels is within [`MAX_SIDE`] and [`MAX_PIXELS`].
pub fn image_fits(width: usize, height: usize) -> bool {
    width <= MAX_SIDE && height <= MAX_SIDE && width.saturating_mul(height) <= MAX_PIXELS
}

/// The error for `value` of `what` over the limit called `name`.
pub fn exceeded(
    what: impl Into<String>,
    value: impl std::fmt::Display,
    name: &'static str,
    limit: impl std::fmt::Display,
) -> crate::Error {
    crate::Error::Limit {
        what: what.into(),
        value: value.to_string(),
        name,
        limit: limit.to_string(),
    }
}

// LoRA and embeddings.

/// Most LoRA tags (`<lora:…>`) one request may use, prompt and negative prompt together: each
/// changes every layer it covers when it is merged.
pub const MAX_LORAS: usize = 32;
/// Most LoRA or embedding files a folder scan lists (subfolders included).
pub const MAX_ADDON_FILES: usize = 10_000;
/// Deepest subfolder a LoRA or embedding folder scan enters.
pub const MAX_ADDON_DEPTH: usize = 4;
/// Largest LoRA file read, in bytes (full-weight `diff` files of SD 1.5 are ~2 GB in f16).
pub const MAX_LORA_BYTES: u64 = 8 << 30;
/// Largest rank of a LoRA layer (the inner side of `up · down`, of a LoHa or LoKr product, each
/// side of a Tucker core): trained LoRAs use 4–256, full-rank extractions of SD's widest layers
/// 1,280. With it the products' intermediates stay near the size of the layer they change.
pub const MAX_LORA_RANK: usize = 4096;
