//! Writing the deploy file: the [`plan`] of its tensors, and the [`safetensors`] stream.

pub mod plan;
pub mod safetensors;
