//! Tensor ↔ image conversion and PNG metadata.
