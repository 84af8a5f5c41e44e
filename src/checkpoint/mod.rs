//! Reading a checkpoint: its tensor table, and each tensor's bytes on demand.
//!
//! Two kinds of file, told apart by their first bytes, never by the extension: safetensors
//! (an 8-byte header length, then a JSON header starting with `{`), and PyTorch's `torch.save`
//! files ([`torch`]: the zip format, magic `PK\x03\x04`, and the legacy format, pickle
//! protocol byte `0x80` then torch's magic number), whose pickle is interpreted as data by
//! [`pickle`] — nothing in it is imported or run.
//!
//! The table is checked here (offsets in bounds, sizes matching shape and dtype, no duplicate
//! names) so that every later step can trust it. Tensor data is read per tensor with
//! positioned reads, never the whole file at once: a 500 MB checkpoint costs only the tensors
//! in flight in memory. A torch tensor that is a strided view of its storage is gathered
//! element by element into the contiguous form torch would materialise.

pub mod pickle;
pub mod torch;
pub mod zip;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};

use crate::dtype::{decode, dtype_bytes, float_width};
use crate::onnx::OnnxModel;

/// Largest header we accept: the bound of the safetensors reference implementation
/// (`safetensors::tensor::MAX_HEADER_SIZE`, 100,000,000 bytes).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// What can be wrong with a checkpoint file itself.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened or read (the cause is the error's source, shown after).
    #[error("{path}: cannot read")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file breaks the safetensors format; `what` says how.
    #[error("{path}: not a valid safetensors file: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the tensor where there is one.
        what: String,
    },
    /// The file is an ONNX graph that cannot be read (the error names the file and the
    /// tensor or node).
    #[error(transparent)]
    Onnx(#[from] Box<crate::onnx::OnnxError>),
    /// The file is a PyTorch checkpoint that cannot be read; `what` says how.
    #[error("{path}: cannot read this PyTorch checkpoint ({format}): {what}")]
    Torch {
        /// The file.
        path: PathBuf,
        /// `torch-zip` or `torch-legacy`.
        format: String,
        /// What is wrong, naming the entry or tensor where there is one.
        what: String,
    },
}

/// How a PyTorch checkpoint is read (no effect on safetensors files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// The entry holding the weights, dotted for nesting (`--key`); `None` picks the top-level
    /// dict of tensors or the one entry among [`torch::CANDIDATES`] that holds tensors.
    pub key: Option<String>,
    /// Keep a `module.` prefix that every name carries (`--keep-prefix`).
    pub keep_prefix: bool,
}

/// Where the tensors of a PyTorch checkpoint came from, for the report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourceInfo {
    /// `torch-zip` or `torch-legacy`.
    pub format: String,
    /// The entry read (`state_dict`, `model`, the `--key` given), or null for the top level.
    pub key: Option<String>,
    /// Whether a `module.` prefix on every name was dropped.
    pub module_prefix_dropped: bool,
    /// Other top-level entries, not read (optimizer, meta, epoch, ...).
    pub skipped: Vec<String>,
    /// Globals the pickle names that a checkpoint does not need (never imported nor called;
    /// see [`torch::suspicious`]). `(called)` marks those `pickle.load` would have called.
    pub suspicious_globals: Vec<String>,
    /// When the file holds both raw and EMA weights and no `--key` chose: the entry not read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_weights: Option<OtherWeights>,
}

/// The other entry of a raw/EMA pair, not read: [`SourceInfo::key`] is the one the framework's
/// own loader reads.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OtherWeights {
    /// The entry not read (`ema`, `state_dict_ema`, `model`, ...).
    pub key: String,
    /// Whether the entry read is the EMA one.
    pub used_is_ema: bool,
    /// Whose loader convention chose, in words.
    pub convention: &'static str,
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name as in the file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Byte offset of the data (of its first element) from the start of the file.
    pub start: u64,
    /// Length of the data in bytes, as read (contiguous: `numel × element size`).
    pub len: u64,
    /// `None` when the data is contiguous at `start..start + len`; for a strided view of a
    /// torch storage, the stride of each dimension in elements: element `[i, j, ...]` lies at
    /// `start + (i·s0 + j·s1 + ...) × element size`. Reads gather it into contiguous order.
    pub strides: Option<Vec<usize>>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open checkpoint: its header, and the file to read tensor data from.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    file: File,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    metadata: Option<BTreeMap<String, String>>,
    source: Option<SourceInfo>,
    /// An ONNX graph, read whole: its constant tensors are the tensors here, read through it.
    onnx: Option<Box<OnnxModel>>,
    /// Small tensors read in parts, each read whole once (by its `start`): see [`SMALL`].
    small: std::sync::Mutex<HashMap<u64, std::sync::Arc<[u8]>>>,
}

/// A contiguous tensor of at most this many bytes that is read in parts (a BN vector, read a
/// chunk of channels at a time while its block's kernel is fused) is read whole the first time
/// and kept: B3's convert read 24,000 of these a few channels at a time, one `pread` each.
const SMALL: u64 = 64 << 10;

impl Checkpoint {
    /// Opens `path` read-only with the default [`ReadOptions`].
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        Self::open_with(path, &ReadOptions::default())
    }

    /// Opens `path` read-only: a safetensors file or a PyTorch checkpoint, told apart by its
    /// first bytes. A PyTorch checkpoint whose pickle names globals a checkpoint does not need
    /// is read all the same (nothing in it runs) and a warning naming them goes to stderr.
    pub fn open_with(path: &Path, options: &ReadOptions) -> Result<Self, CheckpointError> {
        let io_err = |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        let mut head = [0u8; 64];
        let n = if meta.is_dir() {
            0
        } else {
            file.read_at(&mut head, 0).map_err(io_err)?
        };
        let safetensors = n >= 9
            && head[8] == b'{'
            && u64::from_le_bytes([
                head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7],
            ]) <= meta.len();
        match torch::sniff(&head[..n]) {
            Some(format) if !safetensors => {
                Self::open_torch(path, file, meta.len(), format, options)
            }
            None if !safetensors && crate::onnx::looks_like_onnx(&head[..n]) => {
                Self::open_onnx(path, file)
            }
            _ => Self::open_safetensors(path, file),
        }
    }

    /// An ONNX graph: its initializers, `Constant` outputs and `Identity` aliases of them, as
    /// tensors (numeric ones; strings and sub-byte types are not tensors here).
    fn open_onnx(path: &Path, file: File) -> Result<Self, CheckpointError> {
        let model = OnnxModel::open(path).map_err(Box::new)?;
        let tensors = model
            .tensors()
            .iter()
            .map(|e| TensorInfo {
                name: e.name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
                start: 0,
                len: e.bytes.len(),
                strides: None,
            })
            .collect();
        let mut ckpt = Self::assemble(path, file, tensors, None, None);
        ckpt.onnx = Some(Box::new(model));
        Ok(ckpt)
    }

    /// The ONNX graph this was read from, if it was one.
    pub fn onnx(&self) -> Option<&OnnxModel> {
        self.onnx.as_deref()
    }

    fn open_torch(
        path: &Path,
        file: File,
        file_len: u64,
        format: &str,
        options: &ReadOptions,
    ) -> Result<Self, CheckpointError> {
        let opened = torch::open(&file, file_len, format, options).map_err(|what| {
            CheckpointError::Torch {
                path: path.to_path_buf(),
                format: format.to_string(),
                what,
            }
        })?;
        // Suspicious globals are in `source`; the use cases turn them into a report warning.
        Ok(Self::assemble(
            path,
            file,
            opened.tensors,
            None,
            Some(opened.source),
        ))
    }

    fn open_safetensors(path: &Path, mut file: File) -> Result<Self, CheckpointError> {
        let io_err = |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        };
        let format = |what: String| CheckpointError::Format {
            path: path.to_path_buf(),
            what,
        };
        let meta = file.metadata().map_err(io_err)?;
        if meta.is_dir() {
            return Err(format("it is a directory".into()));
        }
        let file_len = meta.len();
        if file_len < 8 {
            return Err(format(format!(
                "the file is {file_len} bytes long, shorter than the 8-byte header length"
            )));
        }
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes).map_err(io_err)?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_LEN {
            return Err(format(format!(
                "header length {header_len} is over the {MAX_HEADER_LEN}-byte limit"
            )));
        }
        if header_len > file_len - 8 {
            return Err(format(format!(
                "header length {header_len} runs past the end of the {file_len}-byte file"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io_err)?;
        let header = std::str::from_utf8(&header)
            .map_err(|e| format(format!("header is not UTF-8: {e}")))?;
        let entries: HeaderEntries = serde_json::from_str(header).map_err(|e| {
            if e.is_data() {
                format(format!(
                    "the header is JSON but not an object of tensor entries: {e}"
                ))
            } else {
                format(format!("header is not valid JSON: {e}"))
            }
        })?;

        let data_start = 8 + header_len;
        let mut metadata = None;
        let mut raw = Vec::with_capacity(entries.0.len());
        let mut seen = HashMap::new();
        for (name, value) in entries.0 {
            if seen.insert(name.clone(), ()).is_some() {
                return Err(format(format!(
                    "tensor `{name}` appears twice in the header"
                )));
            }
            if name == "__metadata__" {
                let map: BTreeMap<String, String> = serde_json::from_value(value).map_err(|e| {
                    format(format!("`__metadata__` must map strings to strings: {e}"))
                })?;
                metadata = Some(map);
                continue;
            }
            let info: RawInfo = serde_json::from_value(value)
                .map_err(|e| format(format!("tensor `{name}`: bad header entry: {e}")))?;
            raw.push((name, info));
        }
        let tensors = tile(raw, data_start, file_len - data_start).map_err(format)?;
        Ok(Self::assemble(path, file, tensors, metadata, None))
    }

    fn assemble(
        path: &Path,
        file: File,
        tensors: Vec<TensorInfo>,
        metadata: Option<BTreeMap<String, String>>,
        source: Option<SourceInfo>,
    ) -> Self {
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Self {
            path: path.to_path_buf(),
            file,
            tensors,
            index,
            metadata,
            source,
            onnx: None,
            small: Default::default(),
        }
    }

    /// Where a PyTorch checkpoint's tensors came from; `None` for safetensors.
    pub fn source(&self) -> Option<&SourceInfo> {
        self.source.as_ref()
    }

    /// The file this checkpoint was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, for copying tensor bytes without decoding them.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// All tensors: for safetensors in the order of their data in the file; for a PyTorch
    /// checkpoint in state-dict order (which for the zip format is also the data order; the
    /// legacy format writes storages sorted by key).
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The header's free-form `__metadata__`, if it has one.
    pub fn metadata(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.as_ref()
    }

    /// Reads `len` bytes of tensor data starting `offset` bytes into `tensor`.
    pub fn read_bytes(
        &self,
        tensor: &TensorInfo,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, CheckpointError> {
        let mut buf = Vec::new();
        self.read_bytes_into(tensor, offset, len, &mut buf)?;
        Ok(buf)
    }

    /// Like [`Checkpoint::read_bytes`], into `buf` (resized to `len`), so that a buffer that
    /// is reused costs no new pages.
    pub fn read_bytes_into(
        &self,
        tensor: &TensorInfo,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), CheckpointError> {
        // Callers compute ranges from the checked header; one past the tensor would read its
        // neighbour's bytes as if they were its own, so it is refused, not assumed.
        if offset.checked_add(len).is_none_or(|end| end > tensor.len) {
            return Err(CheckpointError::Io {
                path: self.path.clone(),
                source: io::Error::other(format!(
                    "internal error (a bug in repvgg-fuse): bytes {offset}..+{len} of `{}` are outside its {} bytes",
                    tensor.name, tensor.len
                )),
            });
        }
        buf.resize(len as usize, 0);
        if let Some(model) = &self.onnx {
            let entry = model.tensor(&tensor.name).ok_or_else(|| {
                CheckpointError::Onnx(Box::new(crate::onnx::OnnxError::BadTensor {
                    path: self.path.clone(),
                    tensor: tensor.name.clone(),
                    what: "not in the graph's tensor table (a bug in repvgg-fuse)".into(),
                }))
            })?;
            return model
                .read_range(entry, offset, buf)
                .map_err(|e| CheckpointError::Onnx(Box::new(e)));
        }
        let read = match &tensor.strides {
            None if tensor.len <= SMALL && len < tensor.len => {
                self.small_tensor(tensor).map(|whole| {
                    buf.copy_from_slice(&whole[offset as usize..(offset + len) as usize]);
                })
            }
            None => self.file.read_exact_at(buf, tensor.start + offset),
            Some(strides) => gather(&self.file, tensor, strides, offset, buf),
        };
        read.map_err(|source| CheckpointError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// The bytes of small contiguous `tensor`, read whole on first use and kept.
    fn small_tensor(&self, tensor: &TensorInfo) -> io::Result<std::sync::Arc<[u8]>> {
        // A poisoned lock only means another thread panicked holding it; the map is whole.
        let map = || self.small.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(whole) = map().get(&tensor.start).cloned() {
            return Ok(whole);
        }
        // Read without the lock held; two threads reading the same tensor at once keep one.
        let mut whole = vec![0u8; tensor.len as usize];
        self.file.read_exact_at(&mut whole, tensor.start)?;
        Ok(map().entry(tensor.start).or_insert(whole.into()).clone())
    }

    /// Writes `tensor`'s bytes, contiguous, to `out` without decoding them. A contiguous
    /// tensor is copied straight from the file (by the kernel where it can); a strided view is
    /// gathered a piece at a time.
    pub fn copy_tensor_to(&self, tensor: &TensorInfo, out: &mut impl Write) -> io::Result<()> {
        if self.onnx.is_some() {
            let bytes = self
                .read_bytes(tensor, 0, tensor.len)
                .map_err(|e| io::Error::other(e.to_string()))?;
            return out.write_all(&bytes);
        }
        if tensor.strides.is_none() {
            let mut file = &self.file;
            file.seek(SeekFrom::Start(tensor.start))?;
            let copied = io::copy(&mut file.take(tensor.len), out)?;
            if copied != tensor.len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "tensor `{}`: the input ended after {copied} of its {} bytes (was it changed while being read?)",
                        tensor.name, tensor.len
                    ),
                ));
            }
            return Ok(());
        }
        const PIECE: u64 = 1 << 20;
        let es = dtype_bytes(tensor.dtype).max(1) as u64;
        let piece = (PIECE / es).max(1) * es;
        let mut buf = Vec::new();
        let mut at = 0;
        while at < tensor.len {
            let len = piece.min(tensor.len - at);
            self.read_bytes_into(tensor, at, len, &mut buf)
                .map_err(|e| io::Error::other(e.to_string()))?;
            out.write_all(&buf)?;
            at += len;
        }
        Ok(())
    }

    /// Reads elements `range` of a floating-point tensor, widened to f64.
    ///
    /// Returns `None` for a tensor whose dtype is not F16, BF16, F32 or F64.
    pub fn read_f64(
        &self,
        tensor: &TensorInfo,
        range: std::ops::Range<usize>,
    ) -> Result<Option<Vec<f64>>, CheckpointError> {
        let Some(width) = float_width(tensor.dtype) else {
            return Ok(None);
        };
        // The raw bytes only pass through: one buffer per thread serves every read, so a
        // large tensor costs no fresh (zeroed, faulted-in) pages beyond its decoded values.
        thread_local! {
            static BYTES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BYTES.with(|bytes| {
            let mut bytes = bytes.borrow_mut();
            self.read_bytes_into(
                tensor,
                (range.start * width) as u64,
                (range.len() * width) as u64,
                &mut bytes,
            )?;
            Ok(Some(decode(tensor.dtype, &bytes)))
        })
    }
}

/// Reads bytes `offset..offset + buf.len()` of the contiguous form of a strided `tensor`.
///
/// The elements' file positions are walked in order; when the span they cover is not much
/// larger than what is asked for, it is read at once and gathered in memory, otherwise each
/// run of adjacent elements is read on its own.
fn gather(
    file: &File,
    tensor: &TensorInfo,
    strides: &[usize],
    offset: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let es = dtype_bytes(tensor.dtype).max(1);
    let first = offset as usize / es;
    let count = buf.len() / es;
    if count == 0 {
        return Ok(());
    }
    // Element positions (in elements from `start`) of elements first..first + count.
    let positions = element_positions(&tensor.shape, strides, first, count);
    let (lo, hi) = positions
        .iter()
        .fold((usize::MAX, 0), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    let span = (hi - lo + 1) * es;
    if span <= (4 * buf.len()).max(1 << 20) {
        let mut window = vec![0u8; span];
        file.read_exact_at(&mut window, tensor.start + (lo * es) as u64)?;
        for (dst, &p) in buf.chunks_exact_mut(es).zip(&positions) {
            let at = (p - lo) * es;
            dst.copy_from_slice(&window[at..at + es]);
        }
        return Ok(());
    }
    let mut i = 0;
    while i < count {
        let mut j = i + 1;
        while j < count && positions[j] == positions[j - 1] + 1 {
            j += 1;
        }
        file.read_exact_at(
            &mut buf[i * es..j * es],
            tensor.start + (positions[i] * es) as u64,
        )?;
        i = j;
    }
    Ok(())
}

/// Offsets in elements of the elements `first..first + count` (in row-major order) of a
/// tensor of `shape` and `strides`.
fn element_positions(shape: &[usize], strides: &[usize], first: usize, count: usize) -> Vec<usize> {
    let mut index = vec![0usize; shape.len()];
    let mut rest = first;
    for d in (0..shape.len()).rev() {
        let n = shape[d].max(1);
        index[d] = rest % n;
        rest /= n;
    }
    let mut pos: usize = index.iter().zip(strides).map(|(i, s)| i * s).sum();
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push(pos);
        // Odometer step, innermost dimension first.
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            pos += strides[d];
            if index[d] < shape[d] {
                break;
            }
            pos -= strides[d] * index[d];
            index[d] = 0;
        }
    }
    out
}

/// Checks that the tensors' data tiles the data section exactly and turns the header entries
/// into [`TensorInfo`]s, in data order.
fn tile(
    mut raw: Vec<(String, RawInfo)>,
    data_start: u64,
    data_len: u64,
) -> Result<Vec<TensorInfo>, String> {
    // Data must tile the byte buffer exactly: sorted by offset, each tensor starts where
    // the previous one ended, and the last ends at the end of the file.
    raw.sort_by_key(|(_, info)| info.data_offsets);
    let mut cursor = 0u64;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, info) in raw {
        let (begin, end) = info.data_offsets;
        if begin != cursor {
            let what = if begin > cursor {
                format!(
                    "tensor `{name}` starts at byte {begin} of the data, leaving a hole after byte {cursor}"
                )
            } else {
                format!(
                    "tensor `{name}` starts at byte {begin} of the data, overlapping the tensor before it (which ends at {cursor})"
                )
            };
            return Err(what);
        }
        if end < begin {
            return Err(format!(
                "tensor `{name}` has data_offsets [{begin}, {end}] that run backwards"
            ));
        }
        if end > data_len {
            return Err(format!(
                "tensor `{name}` ends at byte {end} of the data, past its end at {data_len} (the file is truncated or the header is wrong)"
            ));
        }
        if info.dtype.bitsize() % 8 != 0 {
            return Err(format!(
                "tensor `{name}` is {:?}, a sub-byte dtype; expected a dtype of whole bytes",
                info.dtype
            ));
        }
        let expected = info
            .shape
            .iter()
            .try_fold(dtype_bytes(info.dtype) as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            });
        if expected != Some(end - begin) {
            return Err(format!(
                "tensor `{name}` is {} bytes but its shape {:?} of {:?} needs {}",
                end - begin,
                info.shape,
                info.dtype,
                expected.map_or("more than fits".to_string(), |n| n.to_string())
            ));
        }
        cursor = end;
        tensors.push(TensorInfo {
            name,
            dtype: info.dtype,
            shape: info.shape,
            start: data_start + begin,
            len: end - begin,
            strides: None,
        });
    }
    if cursor != data_len {
        return Err(format!(
            "the tensors cover {cursor} bytes of data but the file holds {data_len}"
        ));
    }
    Ok(tensors)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInfo {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// The header's top-level entries in file order, duplicates kept so they can be refused.
struct HeaderEntries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for HeaderEntries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(HeaderEntries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::element_positions;

    #[test]
    fn positions_walk_a_permuted_view_in_row_major_order() {
        // A [2, 3] view of a [3, 2] storage (a transpose): strides (1, 2).
        assert_eq!(
            element_positions(&[2, 3], &[1, 2], 0, 6),
            [0, 2, 4, 1, 3, 5]
        );
        // Starting mid-way, and a zero stride (an expanded dimension).
        assert_eq!(element_positions(&[2, 3], &[1, 2], 4, 2), [3, 5]);
        assert_eq!(element_positions(&[2, 2], &[0, 1], 0, 4), [0, 1, 0, 1]);
        // A strided 1-D view with an offset is handled by `start`; positions are relative.
        assert_eq!(element_positions(&[3], &[2], 0, 3), [0, 2, 4]);
    }
}
