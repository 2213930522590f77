//! Floating-point operation counts of the three networks, for benchmarks that report GFLOP/s.
//!
//! One multiply-add counts as two FLOPs. Normalisations, activations and softmax are left out:
//! they are a fraction of a percent of the total and not what a kernel is measured on.

use crate::models::clip::ClipConfig;
use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;

/// FLOPs of one network pass, split by the kind of kernel that does the work.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Flops {
    /// 2-D convolutions (including 1×1 projections in convolution form).
    pub conv: f64,
    /// Dense layers on token sequences (attention projections, feed-forward, embeddings).
    pub linear: f64,
    /// The two batched products inside attention: Q·Kᵀ and softmax·V.
    pub attention: f64,
}

impl Flops {
    /// Sum of all three kinds.
    pub fn total(&self) -> f64 {
        self.conv + self.linear + self.attention
    }

    /// This count repeated `n` times (a batch, or the two halves of a CFG step).
    pub fn times(&self, n: f64) -> Self {
        Self {
            conv: self.conv * n,
            linear: self.linear * n,
            attention: self.attention * n,
        }
    }

    /// The counts of two passes together (SDXL's two text encoders).
    pub fn plus(&self, other: &Self) -> Self {
        Self {
            conv: self.conv + other.conv,
            linear: self.linear + other.linear,
            attention: self.attention + other.attention,
        }
    }

    fn conv(&mut self, kernel: usize, c_in: usize, c_out: usize, h: usize, w: usize) {
        self.conv += 2.0 * (kernel * kernel * c_in * c_out * h * w) as f64;
    }

    fn linear(&mut self, tokens: usize, d_in: usize, d_out: usize) {
        self.linear += 2.0 * (tokens * d_in * d_out) as f64;
    }

    /// Q·Kᵀ and softmax·V for `queries` against `keys` tokens of total width `dim`.
    fn attention(&mut self, queries: usize, keys: usize, dim: usize) {
        self.attention += 2.0 * 2.0 * (queries * keys * dim) as f64;
    }
}

/// One resnet block: two 3×3 convolutions, the time projection and a 1×1 shortcut if needed.
fn resnet(f: &mut Flops, c_in: usize, c_out: usize, h: usize, w: usize, temb: Option<usize>) {
    f.conv(3, c_in, c_out, h, w);
    f.conv(3, c_out, c_out, h, w);
    if let Some(t) = temb {
        f.linear(1, t, c_out);
    }
    if c_in != c_out {
        f.conv(1, c_in, c_out, h, w);
    }
}

/// One UNet transformer (SD1 layout: 1×1 projections in and out, self- and cross-attention, GEGLU).
fn transformer(
    f: &mut Flops,
    c: usize,
    h: usize,
    w: usize,
    context: (usize, usize),
    linear_proj: bool,
) {
    let n = h * w;
    let (ctx_tokens, ctx_dim) = context;
    if linear_proj {
        f.linear(n, c, c);
        f.linear(n, c, c);
    } else {
        f.conv(1, c, c, h, w);
        f.conv(1, c, c, h, w);
    }
    // Self-attention: q, k, v, out.
    f.linear(n, c, 4 * c);
    f.attention(n, n, c);
    // Cross-attention: q and out on the image tokens, k and v on the text tokens.
    f.linear(n, c, 2 * c);
    f.linear(ctx_tokens, ctx_dim, 2 * c);
    f.attention(n, ctx_tokens, c);
    // GEGLU feed-forward: c → 2·4c, then 4c → c.
    f.linear(n, c, 8 * c);
    f.linear(n, 4 * c, c);
}

/// FLOPs of one UNet forward for one latent of `h`×`w` with a text context of `ctx_tokens`.
pub fn unet_forward(cfg: &UNetConfig, h: usize, w: usize, ctx_tokens: usize) -> Flops {
    let mut f = Flops::default();
    let ch = &cfg.block_out_channels;
    let levels = ch.len();
    let temb = ch[0] * 4;
    let context = (ctx_tokens, cfg.cross_attention_dim);
    let lp = cfg.use_linear_projection;
    f.linear(1, ch[0], temb);
    f.linear(1, temb, temb);
    f.conv(3, cfg.in_channels, ch[0], h, w);
    let (mut h, mut w) = (h, w);
    let mut c_prev = ch[0];
    for (i, kind) in cfg.down_block_types.iter().enumerate() {
        let attn = kind.starts_with("CrossAttn");
        for _ in 0..cfg.layers_per_block {
            resnet(&mut f, c_prev, ch[i], h, w, Some(temb));
            c_prev = ch[i];
            if attn {
                for _ in 0..cfg.transformer_layers_per_block.get(i) {
                    transformer(&mut f, ch[i], h, w, context, lp);
                }
            }
        }
        if i + 1 < levels {
            (h, w) = (h.div_ceil(2), w.div_ceil(2));
            f.conv(3, ch[i], ch[i], h, w);
        }
    }
    let top = ch[levels - 1];
    resnet(&mut f, top, top, h, w, Some(temb));
    for _ in 0..cfg.transformer_layers_per_block.get(levels - 1) {
        transformer(&mut f, top, h, w, context, lp);
    }
    resnet(&mut f, top, top, h, w, Some(temb));
    // Up blocks mirror diffusers' channel bookkeeping: each resnet takes the previous output
    // concatenated with a skip connection from the down path.
    let mut prev_out = top;
    for (i, kind) in cfg.up_block_types.iter().enumerate() {
        let level = levels - 1 - i;
        let out = ch[level];
        let input = ch[level.saturating_sub(1)];
        let attn = kind.starts_with("CrossAttn");
        let layers = cfg.layers_per_block + 1;
        for j in 0..layers {
            let skip = if j == layers - 1 { input } else { out };
            let res_in = if j == 0 { prev_out } else { out };
            resnet(&mut f, res_in + skip, out, h, w, Some(temb));
            if attn {
                for _ in 0..cfg.transformer_layers_per_block.get(level) {
                    transformer(&mut f, out, h, w, context, lp);
                }
            }
        }
        prev_out = out;
        if i + 1 < levels {
            (h, w) = (h * 2, w * 2);
            f.conv(3, out, out, h, w);
        }
    }
    f.conv(3, ch[0], cfg.out_channels, h, w);
    f
}

/// FLOPs of one classifier-free-guidance step: the UNet on the conditional and unconditional halves.
pub fn unet_cfg_step(cfg: &UNetConfig, h: usize, w: usize, ctx_tokens: usize) -> Flops {
    unet_forward(cfg, h, w, ctx_tokens).times(2.0)
}

/// FLOPs of decoding one latent of `h`×`w` to an image of 8h×8w (for the SD VAE).
pub fn vae_decode(cfg: &VaeConfig, h: usize, w: usize) -> Flops {
    let mut f = Flops::default();
    let ch = &cfg.block_out_channels;
    let levels = ch.len();
    let top = ch[levels - 1];
    f.conv(1, cfg.latent_channels, cfg.latent_channels, h, w);
    f.conv(3, cfg.latent_channels, top, h, w);
    resnet(&mut f, top, top, h, w, None);
    // The mid-block attention is single-headed over every pixel, with dense q, k, v, out.
    f.linear(h * w, top, 4 * top);
    f.attention(h * w, h * w, top);
    resnet(&mut f, top, top, h, w, None);
    let (mut h, mut w) = (h, w);
    let mut c_prev = top;
    for i in 0..levels {
        let out = ch[levels - 1 - i];
        for _ in 0..cfg.layers_per_block + 1 {
            resnet(&mut f, c_prev, out, h, w, None);
            c_prev = out;
        }
        if i + 1 < levels {
            (h, w) = (h * 2, w * 2);
            f.conv(3, out, out, h, w);
        }
    }
    f.conv(3, ch[0], cfg.out_channels, h, w);
    f
}

/// FLOPs of encoding one sequence of `tokens` tokens with the CLIP text transformer.
pub fn text_encode(cfg: &ClipConfig, tokens: usize) -> Flops {
    let mut f = Flops::default();
    let d = cfg.hidden_size;
    for _ in 0..cfg.num_hidden_layers {
        f.linear(tokens, d, 4 * d);
        f.attention(tokens, tokens, d);
        f.linear(tokens, d, cfg.intermediate_size);
        f.linear(tokens, cfg.intermediate_size, d);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_giga(what: &str, got: f64, want_g: f64, rel_tol: f64) {
        let got_g = got / 1e9;
        let err = (got_g - want_g).abs() / want_g;
        assert!(
            err <= rel_tol,
            "{what}: {got_g:.1} GFLOP, want {want_g} (rel err {err:.4})"
        );
    }

    #[test]
    fn unet_forward_at_64_matches_design_facts() {
        let f = unet_forward(&UNetConfig::sd1(), 64, 64, 77);
        assert_giga("conv", f.conv, 444.0, 0.01);
        assert_giga("linear", f.linear, 233.0, 0.01);
        assert_giga("attention", f.attention, 126.0, 0.01);
        assert_giga(
            "cfg step",
            unet_cfg_step(&UNetConfig::sd1(), 64, 64, 77).total(),
            1610.0,
            0.01,
        );
    }

    /// Derived by hand, layer by layer, and equal to PyTorch's `FlopCounterMode` on the diffusers
    /// and transformers models. Attention, for example: five transformers per UNet level of n
    /// tokens and c channels, each 4·n²·c (Q·Kᵀ and P·V) + 4·n·77·c (cross), plus the middle one.
    #[test]
    fn full_size_counts_equal_the_hand_derived_ones() {
        let unet = unet_forward(&UNetConfig::sd1(), 64, 64, 77);
        assert_eq!(unet.conv, 443_946_106_880.0);
        assert_eq!(unet.linear, 233_275_064_320.0);
        let attention: f64 = [(4096.0, 320.0), (1024.0, 640.0), (256.0, 1280.0)]
            .iter()
            .map(|(n, c)| 5.0 * (4.0 * n * n * c + 4.0 * n * 77.0 * c))
            .sum::<f64>()
            + 4.0 * 64.0 * 64.0 * 1280.0
            + 4.0 * 64.0 * 77.0 * 1280.0;
        assert_eq!(unet.attention, attention);
        assert_eq!(attention, 126_052_270_080.0);
        let half = unet_forward(&UNetConfig::sd1(), 32, 32, 77);
        assert_eq!(
            (half.conv, half.linear, half.attention),
            (110_986_526_720.0, 60_574_597_120.0, 8_545_320_960.0)
        );

        let vae = vae_decode(&VaeConfig::sd(), 64, 64);
        assert_eq!(vae.conv, 2_471_569_260_544.0);
        // The mid block's single-head attention over 64² tokens of 512 channels.
        assert_eq!(vae.linear, 2.0 * 4096.0 * 512.0 * 2048.0);
        assert_eq!(vae.attention, 4.0 * 4096.0 * 4096.0 * 512.0);

        let clip = text_encode(&ClipConfig::sd1(), 77);
        let per_layer = 2.0 * 77.0 * (4.0 * 768.0 * 768.0 + 2.0 * 768.0 * 3072.0);
        assert_eq!(clip.linear, 12.0 * per_layer);
        assert_eq!(clip.attention, 12.0 * 4.0 * 77.0 * 77.0 * 768.0);
        assert_eq!(clip.total(), 13_079_937_024.0 + 218_566_656.0);
    }

    #[test]
    fn vae_decode_at_512_matches_design_facts() {
        assert_giga(
            "vae decode",
            vae_decode(&VaeConfig::sd(), 64, 64).total(),
            2510.0,
            0.01,
        );
    }
}
