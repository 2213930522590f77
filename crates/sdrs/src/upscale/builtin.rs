//! The upscalers sdrs has built in, by A1111's names: the one list the hires fix, `sdrs hd`
//! and the server's `/sdapi/v1/upscalers` and `/latent-upscale-modes` read.

use std::str::FromStr;

use crate::{Error, Result};

/// A built-in upscaler: a latent mode of the hires fix, or an image filter. Networks are not
/// here; they are opened from their file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinUpscaler {
    /// "Latent": the latent, by torch's bilinear `interpolate` without antialiasing.
    Latent,
    /// "Latent (nearest)": the latent, by nearest-neighbour `interpolate`.
    LatentNearest,
    /// "None": A1111 then only fits the image to the target with Lanczos, so it is Lanczos.
    None,
    /// "Lanczos": the decoded image, by Pillow's Lanczos filter.
    Lanczos,
}

impl BuiltinUpscaler {
    /// Every built-in upscaler, latent modes first, in the order A1111 lists them.
    pub fn all() -> [BuiltinUpscaler; 4] {
        [Self::Latent, Self::LatentNearest, Self::None, Self::Lanczos]
    }

    /// A1111's name, as requests, infotexts and listings spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Latent => "Latent",
            Self::LatentNearest => "Latent (nearest)",
            Self::None => "None",
            Self::Lanczos => "Lanczos",
        }
    }

    /// The other spellings accepted for it (any case).
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Self::LatentNearest => &["Latent (nearest-exact)"],
            Self::Latent | Self::None | Self::Lanczos => &[],
        }
    }

    /// Whether it enlarges the latent (A1111's latent upscale modes) rather than the image.
    pub fn is_latent(self) -> bool {
        matches!(self, Self::Latent | Self::LatentNearest)
    }

    /// The names of `all()`, for error messages and help texts.
    pub fn names() -> Vec<&'static str> {
        Self::all().iter().map(|u| u.name()).collect()
    }
}

impl FromStr for BuiltinUpscaler {
    type Err = Error;

    /// A name or alias, any case, spaces around ignored.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        Self::all()
            .into_iter()
            .find(|u| {
                u.name().eq_ignore_ascii_case(s)
                    || u.aliases().iter().any(|a| a.eq_ignore_ascii_case(s))
            })
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "unknown built-in upscaler {s:?}; built-in: {} (networks are opened from \
                     their file)",
                    Self::names().join(", ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_reads_back_and_others_are_refused() {
        for upscaler in BuiltinUpscaler::all() {
            for spelling in [upscaler.name()].iter().chain(upscaler.aliases()) {
                let shouted = format!(" {} ", spelling.to_ascii_uppercase());
                assert_eq!(
                    shouted.parse::<BuiltinUpscaler>().unwrap(),
                    upscaler,
                    "{shouted}"
                );
            }
        }
        let err = "bicubic"
            .parse::<BuiltinUpscaler>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Latent, Latent (nearest), None, Lanczos"),
            "{err}"
        );
    }
}
