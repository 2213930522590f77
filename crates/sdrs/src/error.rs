//! The library's error type: variants a caller can act on.

use std::path::PathBuf;

/// Everything that can go wrong turning a request into images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The I/O error is part of the message rather than a chained source, so that error
    /// chains print it once.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is not a checkpoint: {reason}")]
    NotACheckpoint { path: PathBuf, reason: String },
    #[error("unsupported checkpoint: detected {detected}")]
    UnsupportedCheckpoint { detected: String },
    #[error("the checkpoint lacks {} tensors, first: {}", .0.len(), .0.iter().take(5).cloned().collect::<Vec<_>>().join(", "))]
    MissingTensors(Vec<String>),
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid size {width}x{height}: {reason}")]
    InvalidSize {
        width: usize,
        height: usize,
        reason: String,
    },
    #[error("unknown sampler {name:?}; valid samplers: {}", .valid.join(", "))]
    UnknownSampler { name: String, valid: Vec<String> },
    /// A count or size from outside is over one of [`crate::limits`].
    #[error("{what} is {value}, over the limit of {limit} ({name})")]
    Limit {
        what: String,
        value: String,
        name: &'static str,
        limit: String,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("image: {0}")]
    Image(String),
    #[error("no model {name:?}: not a file or folder, not in the model folder, and not one of the catalogue's ({}); {hint}", crate::hub::CATALOGUE.iter().map(|e| e.name).collect::<Vec<_>>().join(", "))]
    UnknownModel { name: String, hint: String },
    #[error("could not download {model}: tried {tried}. To work offline, {hint}")]
    Download {
        model: String,
        tried: String,
        hint: String,
    },
    /// A1111's `NansException`: the numbers went bad, usually from the weights or precision.
    #[error(
        "the {stage} holds {count} NaN or infinite values out of {total}: a broken checkpoint \
         (NaN or infinite weights), a network overflowing in this precision (try without \
         --fast), or an extreme CFG scale; --no-nan-check saves such images anyway"
    )]
    NonFinite {
        stage: &'static str,
        count: usize,
        total: usize,
    },
    #[error("cancelled")]
    Cancelled,
    /// The image being sampled was given up; the run goes on with the next.
    #[error("skipped")]
    Skipped,
    #[error(transparent)]
    Tensor(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Tensor(without_backtrace(e))
    }
}

/// candle wraps some errors in a backtrace when `RUST_BACKTRACE` is set, and prints it as part
/// of the message; a user gets the message alone. The wrappers are peeled in a loop (no
/// recursion), keeping the context and path layers in their order.
fn without_backtrace(mut e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as E;
    enum Layer {
        Context(Box<dyn std::fmt::Display + Send + Sync>),
        Path(PathBuf),
    }
    let mut layers = Vec::new();
    let innermost = loop {
        e = match e {
            E::WithBacktrace { inner, .. } => *inner,
            E::Context { inner, context } => {
                layers.push(Layer::Context(context));
                *inner
            }
            E::WithPath { inner, path } => {
                layers.push(Layer::Path(path));
                *inner
            }
            other => break other,
        }
    };
    layers
        .into_iter()
        .rev()
        .fold(innermost, |inner, layer| match layer {
            Layer::Context(context) => E::Context {
                inner: Box::new(inner),
                context,
            },
            Layer::Path(path) => E::WithPath {
                inner: Box::new(inner),
                path,
            },
        })
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backtraces_stay_out_of_messages() {
        let traced = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("shape mismatch".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let wrapped = candle_core::Error::WithPath {
            inner: Box::new(traced.context("loading the unet")),
            path: "model.safetensors".into(),
        };
        assert_eq!(
            Error::from(wrapped).to_string(),
            "path: \"model.safetensors\" loading the unet\nshape mismatch"
        );
    }
}
