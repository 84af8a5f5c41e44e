//! ONNX models, read losslessly and written back: the second tensor source beside checkpoints,
//! and the graph writer beside the safetensors writer.
//!
//! **Why rust-protobuf (the `protobuf` crate, 3.x) and not prost.** A deploy graph must come
//! back with everything we did not change: other nodes and their attributes, names,
//! `doc_string`s, `metadata_props` (ultralytics keeps class names and stride there),
//! `opset_import`, `producer_*`, functions, and fields newer than our schema. rust-protobuf
//! keeps every field a message does not declare as *unknown fields* and writes them back;
//! prost drops them (and the prost types tract-onnx generates are IR 8, so IR 9/10 fields
//! would vanish). So we declare only what we read or change, in our own
//! `src/onnx/onnx_subset.proto` (the spec's field numbers), and the rest rides along. The
//! types are generated at build time by rust-protobuf's pure-Rust parser
//! (`protobuf-codegen`, `.pure()`): no `protoc` binary is needed. With its `tokio_bytes`
//! option every `bytes` field is a `bytes::Bytes`, and parsing from the one buffer that holds
//! the file leaves every `raw_data` a zero-copy slice of it: reading costs the file once, and
//! writing streams each message to a `BufWriter` with no second copy of the weights.
//!
//! Map: [`model`] opens a file ([`OnnxModel::open`]) and builds the tensor table
//! ([`TensorEntry`]: initializers, `Constant` outputs and `Identity` aliases, with where their
//! bytes are); [`external`] resolves and polices external-data side files; [`view`] gives the
//! block finder its plain [`graph::Graph`]; [`mod@write`] writes a deploy graph
//! ([`OnnxModel::write_deploy`]) into files the caller puts in place.

pub mod external;
pub mod graph;
pub mod model;
pub mod proto;
pub mod shapes;
pub mod view;
mod wire;
pub mod write;

use std::path::PathBuf;

pub use model::{
    OnnxModel, SkippedTensor, TensorBytes, TensorEntry, TensorOrigin, dtype_of, onnx_data_type,
};
pub use view::graph_view;
pub use write::{
    DataPlacement, GraphEdit, NewAttr, NewNode, NewTensor, OutFiles, WriteSummary, side_path,
};

/// The ONNX IR versions this tool reads.
pub const IR_VERSIONS: std::ops::RangeInclusive<i64> = 6..=10;

/// The versions of the default operator set (`ai.onnx`) this tool reads.
pub const OPSETS: std::ops::RangeInclusive<i64> = 11..=21;

/// Everything that makes an ONNX file unreadable or unwritable. Each names the file and, where
/// one is at fault, the tensor or node.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The file (or a side file) cannot be read.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// The content is not an ONNX model.
    #[error("{}: not an ONNX model ({what})", path.display())]
    NotOnnx {
        /// The file.
        path: PathBuf,
        /// What it looks like instead.
        what: &'static str,
    },
    /// The protobuf does not parse (truncated or corrupt).
    #[error("{}: not a readable ONNX protobuf (truncated or corrupt): {what}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        what: String,
    },
    /// A model-level field is missing or out of the supported range.
    #[error("{}: {what}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is missing or unsupported, with the supported range.
        what: String,
    },
    /// A tensor's stored size disagrees with its shape and dtype.
    #[error("{}: tensor `{tensor}`: {field} holds {len} bytes, but shape {dims:?} of data type {data_type} needs {expected}", path.display())]
    DataLength {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Where the data is (`raw_data`, `float_data`, the external `length`, ...).
        field: &'static str,
        /// The size found, in bytes (elements for typed fields, scaled to bytes).
        len: u64,
        /// The size the shape needs, in bytes.
        expected: u64,
        /// The tensor's dims.
        dims: Vec<i64>,
        /// Its ONNX data type code.
        data_type: i32,
    },
    /// A tensor is malformed in another way.
    #[error("{}: tensor `{tensor}`: {what}", path.display())]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        what: String,
    },
    /// An external-data `location` is refused (it could read a file outside the model's
    /// folder).
    #[error("{}: tensor `{tensor}`: external data location `{location}` refused: {why}", path.display())]
    Location {
        /// The model file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The location as written in the model.
        location: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// An external-data side file is missing or not a file.
    #[error("{}: tensor `{tensor}`: external data file {} cannot be opened: {source}", path.display(), file.display())]
    SideFileMissing {
        /// The model file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The side file.
        file: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// An external-data side file is shorter than a tensor's offset + length.
    #[error("{}: tensor `{tensor}`: external data file {} is {len} bytes, shorter than offset {offset} + length {length}", path.display(), file.display())]
    SideFileShort {
        /// The model file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The side file.
        file: PathBuf,
        /// Its size.
        len: u64,
        /// The tensor's offset.
        offset: u64,
        /// The tensor's length.
        length: u64,
    },
    /// A node is malformed or breaks the graph's structure.
    #[error("{}: node {node}: {what}", path.display())]
    BadNode {
        /// The file.
        path: PathBuf,
        /// The node (its name, or `#index op_type` when unnamed).
        node: String,
        /// What is wrong.
        what: String,
    },
    /// A graph output is an initializer: merging could remove or change it.
    #[error("{}: graph output `{tensor}` is an initializer; a graph whose output is a weight is not supported", path.display())]
    OutputIsInitializer {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// An edit given to the writer does not fit the graph (a bug in the caller).
    #[error("{}: cannot apply the graph edit: {what}", path.display())]
    Edit {
        /// The input model.
        path: PathBuf,
        /// What does not fit.
        what: String,
    },
    /// The producer of a new tensor failed.
    #[error("{}: producing tensor `{tensor}`: {source}", path.display())]
    Fill {
        /// The output file.
        path: PathBuf,
        /// The new tensor.
        tensor: String,
        /// The producer's error (wrap other errors with `std::io::Error::other`).
        source: std::io::Error,
    },
    /// An output cannot be written where asked.
    #[error("{}: {what}", path.display())]
    Output {
        /// The output path.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// What the first bytes of a file are, as far as this module can tell: `Some(true)` for ONNX.
///
/// An ONNX `ModelProto` written by ONNX's tools (and every exporter we know) starts with field
/// 1, `ir_version`, a varint: byte `0x08`. The next few fields must then be well-formed
/// protobuf fields. Safetensors starts with a little-endian u64 header length and `{` at byte
/// 8, a torch zip with `PK`, a pickle with `0x80`; none of them passes.
///
/// ```
/// use repvgg_fuse::onnx::looks_like_onnx;
/// // ir_version 8, producer_name "pytorch"
/// assert!(looks_like_onnx(b"\x08\x08\x12\x07pytorch"));
/// assert!(!looks_like_onnx(b"PK\x03\x04"));
/// assert!(!looks_like_onnx(b"\x80\x02}q\x00"));
/// // safetensors: header length 8 + "{}"
/// assert!(!looks_like_onnx(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"));
/// ```
pub fn looks_like_onnx(prefix: &[u8]) -> bool {
    let mut at = 0;
    let mut fields = 0;
    while at < prefix.len() && fields < 4 {
        let Some((tag, n)) = varint(&prefix[at..]) else {
            return fields > 0 && prefix.len() - at < 10;
        };
        at += n;
        let (number, wire) = (tag >> 3, tag & 7);
        if fields == 0 && tag != 0x08 || number == 0 || number > 64 {
            return false;
        }
        let rest = &prefix[at.min(prefix.len())..];
        let skip = match wire {
            0 => match varint(rest) {
                // ir_version is a small number.
                Some((v, _)) if fields == 0 && !(1..=100).contains(&v) => return false,
                Some((_, n)) => n as u64,
                None => return rest.len() < 10,
            },
            1 => 8,
            2 => match varint(rest) {
                Some((len, n)) => len.saturating_add(n as u64),
                None => return rest.len() < 10,
            },
            5 => 4,
            _ => return false,
        };
        at = at.saturating_add(usize::try_from(skip).unwrap_or(usize::MAX));
        fields += 1;
    }
    fields > 0
}

/// A protobuf varint at the start of `bytes`: (value, length), or `None` if cut or too long.
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// How a node is named in messages: its name, or `#index op_type` when it has none.
pub(crate) fn node_label(index: usize, node: &proto::NodeProto) -> String {
    match node.name() {
        "" => format!("#{index} {}", node.op_type()),
        name => format!("`{name}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onnx_prefixes_are_told_from_other_formats() {
        // ir_version 7, then graph (field 7, length-delimited) cut by the prefix.
        assert!(looks_like_onnx(b"\x08\x07\x3a\xff\xff\x03\x0a"));
        // Cut inside the first varint's payload.
        assert!(looks_like_onnx(b"\x08"));
        assert!(!looks_like_onnx(b""));
        // ir_version 0 is no model.
        assert!(!looks_like_onnx(b"\x08\x00\x12\x01a"));
        // A safetensors header of 0x3a08 bytes: 08 3a 00 ... is refused at the 0 tag.
        assert!(!looks_like_onnx(b"\x08\x3a\x00\x00\x00\x00\x00\x00{\"a\""));
        // Wire type 7 does not exist.
        assert!(!looks_like_onnx(b"\x08\x07\x0f"));
    }
}
