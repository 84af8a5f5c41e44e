//! `repvgg-fuse`: turns a structural re-parameterization train checkpoint (RepVGG and its
//! family: multi-branch blocks of k×k conv+BN, 1×1 conv+BN, identity BN, …) into its deploy
//! form (one k×k conv with bias per block), from the weights alone, and proves the two compute
//! the same thing.
//!
//! Layers, each depending only on those below it (ARCHITECTURE.md has the map):
//! - use cases: [`app`] — [`convert()`], [`verify_files()`], [`inspect()`];
//! - stages: [`find`] finds the blocks (by tensor names, or in an ONNX graph by topology),
//!   [`fuse`] is the branch algebra and the one fusion routine, [`write`](mod@write) writes the deploy
//!   file as a stream, [`verify`] judges a deploy file op by op (never through [`fuse`]);
//! - leaves: [`block`] is the block model and its values, [`checkpoint`] and [`onnx`] are
//!   tensor sources, [`dtype`] the codec, [`conv`] the f64 convolution, [`deviation`] the figure
//!   of merit, [`int8`] the INT8 readiness figures, [`report`] the report and its renderings,
//!   [`progress`] the hooks a caller gives a run.
#![deny(missing_docs)]

pub mod app;
pub mod block;
pub mod checkpoint;
pub mod conv;
pub mod deviation;
pub mod dtype;
pub mod find;
pub mod fuse;
pub mod int8;
pub mod onnx;
pub mod progress;
pub mod report;
pub mod verify;
pub mod write;

use std::path::PathBuf;

use safetensors::Dtype;

pub use app::{Outcome, Settings, convert, inspect, verify_files};
pub use block::BlockError;
pub use checkpoint::CheckpointError;
pub use find::LayoutError;

/// Everything that stops a run. All of them but [`Error::Internal`] are the user's input or
/// environment, not a bug.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The checkpoint file is unreadable or malformed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// An ONNX graph is unreadable or malformed, or cannot be written.
    #[error(transparent)]
    Onnx(#[from] onnx::OnnxError),
    /// An ONNX graph too broken to look for blocks in (a cycle, a constant output, …).
    #[error("{}: {error}", path.display())]
    Topology {
        /// The graph.
        path: PathBuf,
        /// What is wrong, naming the node or tensor.
        error: find::graph::TopologyError,
    },
    /// A whole ONNX graph could not be loaded, run or compared.
    #[cfg(feature = "graph-run")]
    #[error(transparent)]
    GraphRun(#[from] verify::graph::RunError),
    /// The blocks could not be found or are malformed.
    #[error("{}: {error}", path.display())]
    Layout {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        error: LayoutError,
    },
    /// A block's values cannot be fused.
    #[error("{}: {error}", path.display())]
    Block {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong, naming the block and the tensor.
        error: BlockError,
    },
    /// A fused or cast value does not fit the output dtype.
    #[error("{}: {}`{tensor}` element {index} is {value:e}, which overflows {dtype:?}{}", path.display(), if block.is_empty() { String::new() } else { format!("block `{block}`: fused tensor ") }, if matches!(dtype, Dtype::F16) { " (max 65504); keep the output in F32 with --dtype f32" } else { "" })]
    Overflow {
        /// The input checkpoint.
        path: PathBuf,
        /// The block, empty for a pass-through tensor.
        block: String,
        /// The output tensor.
        tensor: String,
        /// Element index.
        index: usize,
        /// The value that does not fit.
        value: f64,
        /// The output dtype.
        dtype: Dtype,
    },
    /// The output (or report) cannot be written where asked.
    #[error("{}: {what}", path.display())]
    Output {
        /// The output path.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Writing the output (or report) failed.
    #[error("{}: {what}", path.display())]
    Write {
        /// The output path.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// An option value that cannot work with this checkpoint.
    #[error("{0}")]
    Usage(String),
    /// The run was cancelled (SIGINT or SIGTERM); nothing was written.
    #[error("interrupted; nothing was written")]
    Interrupted,
    /// An invariant of this program broke: a bug, reported instead of writing a wrong file.
    #[error("internal error (a bug in repvgg-fuse; nothing was written): {0}")]
    Internal(String),
}

impl Error {
    /// A block error in the checkpoint `ckpt`.
    pub fn block(ckpt: &checkpoint::Checkpoint, error: BlockError) -> Error {
        Error::Block {
            path: ckpt.path().to_path_buf(),
            error,
        }
    }

    /// An [`Error::Write`] of `path`, while doing `what`.
    pub fn write(
        path: &std::path::Path,
        what: impl Into<String>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let (path, what) = (path.to_path_buf(), what.into());
        move |source| Error::Write { path, what, source }
    }

    /// An [`Error::Internal`].
    pub fn internal(what: impl Into<String>) -> Error {
        Error::Internal(what.into())
    }
}
