//! `repvgg-fuse`: turns a RepVGG-family train checkpoint (multi-branch blocks: k×k conv+BN,
//! 1×1 conv+BN, identity BN) into its deploy form (one k×k conv with bias per block), from the
//! weights alone, and proves the two compute the same thing.
//!
//! The steps, each in its module: [`checkpoint`] reads the safetensors file; [`layout`] finds
//! the blocks by their tensor names (a table per framework) and [`block`] checks their shapes;
//! [`fuse`] does the arithmetic in f64; [`deploy`] lays out and writes the deploy file;
//! [`conv`] and [`verify`] run a block both ways on random input; [`report`] is the JSON report;
//! [`mod@convert`] strings them together.
#![deny(missing_docs)]

pub mod block;
pub mod checkpoint;
pub mod conv;
pub mod convert;
pub mod deploy;
pub mod fuse;
pub mod inspect;
pub mod int8;
pub mod layout;
pub mod probe;
pub mod report;
pub mod verify;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use safetensors::Dtype;

pub use checkpoint::CheckpointError;
pub use convert::{Outcome, Settings, convert};
pub use inspect::inspect;
pub use layout::LayoutError;
pub use verify::verify_files;

/// Everything that stops a run. All of them are the user's input or environment, not a bug.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The checkpoint file is unreadable or malformed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The blocks could not be found or are malformed.
    #[error("{}: {error}", path.display())]
    Layout {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        error: LayoutError,
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
    /// An option value that cannot work with this checkpoint.
    #[error("{0}")]
    Usage(String),
    /// SIGINT or SIGTERM arrived; nothing was written.
    #[error("interrupted; nothing was written")]
    Interrupted,
}

/// The flag SIGINT / SIGTERM handlers set; long loops check it and stop cleanly.
pub fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

fn check_interrupted() -> Result<(), Error> {
    if interrupt_flag().load(Ordering::Relaxed) {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}
