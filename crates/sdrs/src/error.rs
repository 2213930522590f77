//! The library's error type: variants a caller can act on.

use std::path::PathBuf;

/// Everything that can go wrong turning a request into images. Stopping or skipping a run
/// is not among them: that is an [`Outcome`](crate::pipeline::Outcome).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written. The I/O error is part of the message rather than
    /// a chained source, so that error chains print it once.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        cause: std::io::Error,
    },
    /// A file that was to be a checkpoint is not one (or is damaged).
    #[error("{path} is not a checkpoint: {reason}")]
    NotACheckpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint of a model family sdrs does not run.
    #[error("unsupported checkpoint: detected {detected}")]
    UnsupportedCheckpoint {
        /// What the checkpoint was detected to be.
        detected: String,
    },
    /// Tensors a network needs are not in the checkpoint.
    #[error("the checkpoint lacks {} tensors, first: {}", .0.len(), .0.iter().take(5).cloned().collect::<Vec<_>>().join(", "))]
    MissingTensors(Vec<String>),
    /// A model's configuration (detected or read) cannot be built.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    /// An image size the request asks for cannot be made.
    #[error("invalid size {width}x{height}: {reason}")]
    InvalidSize {
        /// The width asked for.
        width: usize,
        /// The height asked for.
        height: usize,
        /// Why it cannot be made.
        reason: String,
    },
    /// A sampler name that is not in the table.
    #[error("unknown sampler {name:?}; valid samplers: {}", .valid.join(", "))]
    UnknownSampler {
        /// The name given.
        name: String,
        /// The samplers' A1111 names.
        valid: Vec<String>,
    },
    /// A count or size from outside is over one of [`crate::limits`].
    #[error("{what} is {value}, over the limit of {limit} ({name})")]
    Limit {
        /// What was counted.
        what: String,
        /// Its value.
        value: String,
        /// The limit's name in [`crate::limits`].
        name: &'static str,
        /// The limit.
        limit: String,
    },
    /// A request field that is wrong in itself or with the others.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A picture that cannot be read, written or made.
    #[error("image: {0}")]
    Image(String),
    /// A model name that is no file, folder or catalogue entry.
    #[error("no model {name:?}: not a file or folder, not in the model folder, and not one of the catalogue's ({}); {hint}", crate::hub::CATALOGUE.iter().map(|e| e.name).collect::<Vec<_>>().join(", "))]
    UnknownModel {
        /// The name given.
        name: String,
        /// What to do instead.
        hint: String,
    },
    /// A catalogue model that could not be downloaded.
    #[error("could not download {model}: tried {tried}. To work offline, {hint}")]
    Download {
        /// The model.
        model: String,
        /// The places tried, with what each said.
        tried: String,
        /// What to do instead.
        hint: String,
    },
    /// A1111's `NansException`: the numbers went bad, usually from the weights or precision.
    #[error(
        "the {stage} holds {count} NaN or infinite values out of {total}: a broken checkpoint \
         (NaN or infinite weights), a network overflowing in this precision (try without \
         --fast), or an extreme CFG scale; --no-nan-check saves such images anyway"
    )]
    NonFinite {
        /// Where the values were found.
        stage: &'static str,
        /// How many are NaN or infinite.
        count: usize,
        /// How many values there are.
        total: usize,
    },
    /// The tensor library failed (a shape or a device error).
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
    /// Whether the error is the asker's to fix (a request or an argument that cannot be
    /// run), rather than the model's, the files' or the machine's: a server answers the first
    /// kind with 4xx, the second with 5xx.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::InvalidRequest(_)
                | Error::InvalidSize { .. }
                | Error::UnknownSampler { .. }
                | Error::Limit { .. }
        )
    }

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
