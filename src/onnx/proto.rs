//! The ONNX messages of `onnx_subset.proto`, generated at build time by `build.rs`
//! (rust-protobuf, pure Rust). Undeclared fields live in each message's `special_fields`
//! as unknown fields and are written back as read.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/onnx_proto/mod.rs"));

pub use onnx_subset::*;
