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
    #[error("cancelled")]
    Cancelled,
    /// The image being sampled was given up; the run goes on with the next.
    #[error("skipped")]
    Skipped,
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
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
