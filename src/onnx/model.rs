//! Opening an ONNX model: the file held in one buffer, the protobuf parsed over it (every
//! `raw_data` a slice of that buffer), the versions checked, and the tensor table built.
//!
//! The tensor table lists, by position, every constant tensor the rest of the tool may read:
//! the initializers in file order, then the outputs of `Constant` nodes and of `Identity` nodes
//! whose input is already in the table (aliases), in node order. Each entry says where its
//! bytes are ([`TensorBytes`]); every size was checked against the shape and dtype.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use protobuf::Message;
use safetensors::Dtype;

use super::external::{ExternalRef, SideFiles};
use super::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};
use super::{IR_VERSIONS, OPSETS, OnnxError, looks_like_onnx, node_label};

/// `TensorProto.DataLocation.EXTERNAL`.
pub(crate) const EXTERNAL: i32 = 1;

/// Where a tensor's bytes (little-endian, row-major) are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorBytes {
    /// A byte range of the `.onnx` file itself (a `raw_data` field).
    Inline {
        /// Start, from the beginning of the file.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A byte range of an external-data side file (checked to exist and be long enough).
    External {
        /// The side file, canonical.
        file: PathBuf,
        /// Start in it.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Bytes decoded from a typed field (`float_data`, `int64_data`, ...) or a `Constant`'s
    /// `value_float(s)`/`value_int(s)`.
    Owned(Vec<u8>),
}

impl TensorBytes {
    /// The length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            TensorBytes::Inline { len, .. } | TensorBytes::External { len, .. } => *len,
            TensorBytes::Owned(v) => v.len() as u64,
        }
    }

    /// Whether there are no bytes (a tensor with a zero dimension).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a table entry comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorOrigin {
    /// `GraphProto.initializer[index]`.
    Initializer {
        /// Its index.
        index: usize,
    },
    /// The output of the `Constant` node `GraphProto.node[node]`.
    Constant {
        /// The node's index.
        node: usize,
    },
    /// The output of the `Identity` node `GraphProto.node[node]`, whose input `of` is in the
    /// table: the same bytes under another name.
    Alias {
        /// The node's index.
        node: usize,
        /// The aliased tensor.
        of: String,
    },
}

/// One constant tensor of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// The tensor's name in the graph.
    pub name: String,
    /// Its ONNX `TensorProto.DataType` code.
    pub data_type: i32,
    /// The same, as a safetensors dtype.
    pub dtype: Dtype,
    /// Its shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Where its bytes are.
    pub bytes: TensorBytes,
    /// Where it comes from.
    pub origin: TensorOrigin,
}

/// A constant tensor the table does not hold (strings, complex128, sub-byte types, sparse
/// constants): known by name so that nothing mistakes it for a runtime value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedTensor {
    /// The tensor's name.
    pub name: String,
    /// Its ONNX data type code (0 when it has none, e.g. a sparse constant).
    pub data_type: i32,
    /// Its dims.
    pub dims: Vec<i64>,
    /// Where it comes from.
    pub origin: TensorOrigin,
}

/// An ONNX model held in memory: the file's bytes and the parsed protobuf over them.
#[derive(Debug)]
pub struct OnnxModel {
    path: PathBuf,
    data: Bytes,
    /// The map under `data` (`None` for an empty file), to give pages back.
    map: Option<std::sync::Arc<memmap2::Mmap>>,
    proto: ModelProto,
    tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    skipped: Vec<SkippedTensor>,
    side_files: Vec<PathBuf>,
}

/// The file's bytes, mapped: a weight is read from the page cache where it lies, with no copy
/// of the file in anonymous memory (reading a 500 MB graph into a fresh buffer cost a page
/// fault per 4 KiB). The map is read-only; like every reader of a file, the tool assumes the
/// file does not change while it runs.
fn map(path: &Path) -> Result<(Bytes, Option<Arc<memmap2::Mmap>>), OnnxError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| OnnxError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let file = std::fs::File::open(path).map_err(io("cannot read the model"))?;
    let meta = file.metadata().map_err(io("cannot read the model"))?;
    if meta.len() == 0 || meta.is_dir() {
        // Nothing to map: an empty buffer says what the file is not.
        return Ok((Bytes::new(), None));
    }
    // SAFETY: the map is only read; a file truncated under a running tool is outside what any
    // reader can defend against (as for safetensors' own mmap).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io("cannot map the model"))?;
    let mmap = Arc::new(mmap);
    Ok((Bytes::from_owner(Mapped(mmap.clone())), Some(mmap)))
}

/// The shared map, as the owner of the file's [`Bytes`].
struct Mapped(Arc<memmap2::Mmap>);

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The safetensors dtype of an ONNX `TensorProto.DataType` code, for the fixed-size types.
pub fn dtype_of(data_type: i32) -> Option<Dtype> {
    Some(match data_type {
        1 => Dtype::F32,
        2 => Dtype::U8,
        3 => Dtype::I8,
        4 => Dtype::U16,
        5 => Dtype::I16,
        6 => Dtype::I32,
        7 => Dtype::I64,
        9 => Dtype::BOOL,
        10 => Dtype::F16,
        11 => Dtype::F64,
        12 => Dtype::U32,
        13 => Dtype::U64,
        14 => Dtype::C64,
        16 => Dtype::BF16,
        17 => Dtype::F8_E4M3,
        18 => Dtype::F8_E4M3FNUZ,
        19 => Dtype::F8_E5M2,
        20 => Dtype::F8_E5M2FNUZ,
        24 => Dtype::F8_E8M0,
        _ => return None,
    })
}

/// The ONNX `TensorProto.DataType` code of a safetensors dtype (`None` for the sub-byte ones).
pub fn onnx_data_type(dtype: Dtype) -> Option<i32> {
    (1..=24).find(|&code| dtype_of(code) == Some(dtype))
}

impl OnnxModel {
    /// Reads and checks the model at `path`: IR 6–10, default opset 11–21, every tensor's
    /// size against its shape, every external-data location and side file, node order.
    pub fn open(path: &Path) -> Result<OnnxModel, OnnxError> {
        let (data, map) = map(path)?;
        if !looks_like_onnx(&data[..data.len().min(64)]) {
            return Err(OnnxError::NotOnnx {
                path: path.to_path_buf(),
                what: what_it_looks_like(&data),
            });
        }
        let proto =
            ModelProto::parse_from_tokio_bytes(&data).map_err(|e| OnnxError::Malformed {
                path: path.to_path_buf(),
                what: e.to_string(),
            })?;
        check_versions(path, &proto)?;
        if proto.graph.is_none() {
            return Err(OnnxError::Unsupported {
                path: path.to_path_buf(),
                what: "the model has no graph".into(),
            });
        }
        let mut table = Table::new(path, &data)?;
        let graph = proto.graph.get_or_default();
        table.initializers(graph)?;
        table.nodes(graph)?;
        check_outputs(path, graph, &table.known)?;
        let side_files = table.side.paths();
        let (tensors, by_name, skipped) = (table.tensors, table.by_name, table.skipped);
        Ok(OnnxModel {
            path: path.to_path_buf(),
            data,
            map,
            proto,
            tensors,
            by_name,
            skipped,
            side_files,
        })
    }

    /// The model's path, as given to [`OnnxModel::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed model (undeclared fields in each message's unknown fields).
    pub fn proto(&self) -> &ModelProto {
        &self.proto
    }

    /// The main graph.
    pub fn graph(&self) -> &GraphProto {
        self.proto.graph.get_or_default()
    }

    /// The IR version.
    pub fn ir_version(&self) -> i64 {
        self.proto.ir_version()
    }

    /// The version of the default operator set (`ai.onnx`).
    pub fn opset(&self) -> i64 {
        default_opset(&self.proto).unwrap_or_default()
    }

    /// The tensor table: initializers in file order, then `Constant` outputs and `Identity`
    /// aliases in node order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// The table entry named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The constant tensors not in the table (see [`SkippedTensor`]).
    pub fn skipped(&self) -> &[SkippedTensor] {
        &self.skipped
    }

    /// Whether any initializer keeps its bytes in a side file.
    pub fn has_external_data(&self) -> bool {
        !self.side_files.is_empty()
    }

    /// The side files the model's initializers use (canonical paths).
    pub fn side_files(&self) -> &[PathBuf] {
        &self.side_files
    }

    /// The bytes of `entry` (borrowed from the file buffer, or read from a side file).
    pub fn tensor_bytes<'a>(&'a self, entry: &'a TensorEntry) -> Result<Cow<'a, [u8]>, OnnxError> {
        match &entry.bytes {
            TensorBytes::Owned(v) => Ok(Cow::Borrowed(v)),
            TensorBytes::Inline { offset, len } => {
                self.inline(entry, *offset, *len).map(Cow::Borrowed)
            }
            TensorBytes::External { len, .. } => {
                let mut out = vec![0; usize::try_from(*len).unwrap_or(usize::MAX)];
                self.read_range(entry, 0, &mut out)?;
                Ok(Cow::Owned(out))
            }
        }
    }

    /// Gives back the pages of the file that hold `entry`'s bytes (an inline tensor's whole
    /// pages): the bytes stay where they are — in the page cache, read again from there if
    /// asked for — but no longer count in this process's memory. Called on the weights a
    /// block no longer needs once it is fused, so that converting a large graph does not
    /// hold the whole file mapped. Other tensors are left alone.
    pub fn release(&self, entry: &TensorEntry) {
        let (Some(map), TensorBytes::Inline { offset, len }) = (&self.map, &entry.bytes) else {
            return;
        };
        const PAGE: u64 = 4096;
        let (start, end) = (offset.div_ceil(PAGE) * PAGE, (offset + len) / PAGE * PAGE);
        if end <= start {
            return;
        }
        let (Ok(start), Ok(n)) = (usize::try_from(start), usize::try_from(end - start)) else {
            return;
        };
        // SAFETY: the map is read-only and shared: MADV_DONTNEED only unmaps the pages, and a
        // later read faults the file's unchanged bytes back in (nothing is lost or zeroed, as
        // it would be for private, written pages). A failure only leaves the pages mapped.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, n) };
    }

    /// Reads `out.len()` bytes of `entry` from byte `start` of the tensor.
    pub fn read_range(
        &self,
        entry: &TensorEntry,
        start: u64,
        out: &mut [u8],
    ) -> Result<(), OnnxError> {
        let want = out.len() as u64;
        let outside = || OnnxError::BadTensor {
            path: self.path.clone(),
            tensor: entry.name.clone(),
            what: format!(
                "bytes {start}..+{want} are outside its {} bytes",
                entry.bytes.len()
            ),
        };
        match start.checked_add(want) {
            Some(end) if end <= entry.bytes.len() => {}
            _ => return Err(outside()),
        }
        match &entry.bytes {
            TensorBytes::Owned(v) => {
                out.copy_from_slice(&v[start as usize..(start + want) as usize])
            }
            TensorBytes::Inline { offset, len } => {
                let all = self.inline(entry, *offset, *len)?;
                out.copy_from_slice(&all[start as usize..(start + want) as usize]);
            }
            TensorBytes::External { file, offset, .. } => {
                super::external::read_at(file, offset + start, out).map_err(|source| {
                    OnnxError::Io {
                        path: file.clone(),
                        what: format!(
                            "cannot read tensor `{}` of {}",
                            entry.name,
                            self.path.display()
                        ),
                        source,
                    }
                })?;
            }
        }
        Ok(())
    }

    /// The file's bytes `offset..offset+len`, if inside it.
    pub(crate) fn data_range(&self, offset: u64, len: u64) -> Option<&[u8]> {
        usize::try_from(offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(o, l)| self.data.get(o..o.checked_add(l)?))
    }

    /// The file buffer's bytes `offset..offset+len`.
    fn inline(&self, entry: &TensorEntry, offset: u64, len: u64) -> Result<&[u8], OnnxError> {
        self.data_range(offset, len)
            .ok_or_else(|| OnnxError::BadTensor {
                path: self.path.clone(),
                tensor: entry.name.clone(),
                what: "its bytes are outside the file (a bug in repvgg-fuse)".into(),
            })
    }
}

/// A guess at what a non-ONNX file is, for the error.
fn what_it_looks_like(data: &[u8]) -> &'static str {
    if data.starts_with(b"PK") {
        "a zip archive, e.g. a torch checkpoint"
    } else if data.first() == Some(&0x80) {
        "a pickle, e.g. a legacy torch checkpoint"
    } else if data.len() >= 9 && data[8] == b'{' {
        "a safetensors file"
    } else if data.is_empty() {
        "the file is empty"
    } else {
        "it does not start with an ir_version field"
    }
}

/// The default opset version, if imported.
fn default_opset(proto: &ModelProto) -> Option<i64> {
    proto
        .opset_import
        .iter()
        .find(|o| matches!(o.domain(), "" | "ai.onnx"))
        .map(|o| o.version())
}

/// IR and default-opset versions in range.
fn check_versions(path: &Path, proto: &ModelProto) -> Result<(), OnnxError> {
    let unsupported = |what: String| {
        Err(OnnxError::Unsupported {
            path: path.to_path_buf(),
            what,
        })
    };
    let ir = proto.ir_version();
    if !IR_VERSIONS.contains(&ir) {
        return unsupported(format!(
            "IR version {ir} is not supported (supported: {} to {})",
            IR_VERSIONS.start(),
            IR_VERSIONS.end()
        ));
    }
    match default_opset(proto) {
        None => {
            unsupported("the model imports no version of the default operator set (ai.onnx)".into())
        }
        Some(v) if !OPSETS.contains(&v) => unsupported(format!(
            "opset {v} of the default domain is not supported (supported: {} to {})",
            OPSETS.start(),
            OPSETS.end()
        )),
        Some(_) => Ok(()),
    }
}

/// Every graph output is produced by a node or is a graph input, and none is an initializer.
fn check_outputs(
    path: &Path,
    graph: &GraphProto,
    known: &HashSet<String>,
) -> Result<(), OnnxError> {
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    for output in &graph.output {
        let name = output.name();
        if initializers.contains(name) {
            return Err(OnnxError::OutputIsInitializer {
                path: path.to_path_buf(),
                tensor: name.to_string(),
            });
        }
        if !known.contains(name) {
            return Err(OnnxError::BadTensor {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                what: "it is a graph output that no node produces".into(),
            });
        }
    }
    Ok(())
}

/// The tensor table under construction.
struct Table<'a> {
    path: &'a Path,
    data: &'a Bytes,
    side: SideFiles,
    tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    skipped: Vec<SkippedTensor>,
    skipped_names: HashMap<String, usize>,
    /// Every value name available so far: graph inputs, initializers, node outputs.
    known: HashSet<String>,
}

impl<'a> Table<'a> {
    fn new(path: &'a Path, data: &'a Bytes) -> Result<Table<'a>, OnnxError> {
        Ok(Table {
            path,
            data,
            side: SideFiles::new(path)?,
            tensors: Vec::new(),
            by_name: HashMap::new(),
            skipped: Vec::new(),
            skipped_names: HashMap::new(),
            known: HashSet::new(),
        })
    }

    fn bad(&self, tensor: &str, what: impl Into<String>) -> OnnxError {
        OnnxError::BadTensor {
            path: self.path.to_path_buf(),
            tensor: tensor.to_string(),
            what: what.into(),
        }
    }

    /// Adds the graph inputs to the known names and every initializer to the table.
    fn initializers(&mut self, graph: &GraphProto) -> Result<(), OnnxError> {
        self.known
            .extend(graph.input.iter().map(|v| v.name().to_string()));
        let mut seen = HashSet::new();
        for (index, t) in graph.initializer.iter().enumerate() {
            let name = t.name();
            if name.is_empty() {
                return Err(self.bad(&format!("#{index}"), "an initializer without a name"));
            }
            if !seen.insert(name) {
                return Err(self.bad(name, "two initializers have this name"));
            }
            self.known.insert(name.to_string());
            self.add(name, t, TensorOrigin::Initializer { index })?;
        }
        Ok(())
    }

    /// Checks node order and single assignment; adds `Constant` outputs and `Identity`
    /// aliases to the table.
    fn nodes(&mut self, graph: &GraphProto) -> Result<(), OnnxError> {
        let path = self.path;
        for (index, node) in graph.node.iter().enumerate() {
            let bad = |what: String| OnnxError::BadNode {
                path: path.to_path_buf(),
                node: node_label(index, node),
                what,
            };
            if let Some(missing) = node
                .input
                .iter()
                .find(|i| !i.is_empty() && !self.known.contains(*i))
            {
                return Err(bad(format!(
                    "input `{missing}` is produced by no earlier node and is no graph input or initializer (a cycle, or nodes out of order)"
                )));
            }
            let default_domain = matches!(node.domain(), "" | "ai.onnx");
            match node.op_type() {
                "Constant" if default_domain => self.constant(index, node)?,
                "Identity" if default_domain => self.alias(index, node),
                _ => {}
            }
            for output in node.output.iter().filter(|o| !o.is_empty()) {
                if !self.known.insert(output.clone()) {
                    return Err(bad(format!(
                        "output `{output}` is already a graph input, an initializer or another node's output"
                    )));
                }
            }
        }
        Ok(())
    }

    /// A `Constant` node's output into the table.
    fn constant(&mut self, index: usize, node: &NodeProto) -> Result<(), OnnxError> {
        let bad = |what: &str| OnnxError::BadNode {
            path: self.path.to_path_buf(),
            node: node_label(index, node),
            what: what.to_string(),
        };
        let output = match node.output.first() {
            Some(o) if !o.is_empty() => o.as_str(),
            _ => return Err(bad("a Constant without an output")),
        };
        let attr = match node.attribute.as_slice() {
            [attr] => attr,
            _ => return Err(bad("a Constant must have exactly one attribute")),
        };
        let origin = TensorOrigin::Constant { node: index };
        let owned = |data_type: i32, dims: Vec<i64>, bytes: Vec<u8>| {
            let t = TensorProto {
                dims,
                data_type: Some(data_type),
                ..Default::default()
            };
            (t, Some(bytes))
        };
        let (t, bytes) = match attr.name() {
            "value" => (attr.t.get_or_default().clone(), None),
            "value_float" => owned(1, vec![], attr.f().to_le_bytes().to_vec()),
            "value_floats" => owned(
                1,
                vec![attr.floats.len() as i64],
                le_bytes(&attr.floats, f32::to_le_bytes),
            ),
            "value_int" => owned(7, vec![], attr.i().to_le_bytes().to_vec()),
            "value_ints" => owned(
                7,
                vec![attr.ints.len() as i64],
                le_bytes(&attr.ints, i64::to_le_bytes),
            ),
            "value_string" | "value_strings" | "sparse_value" => {
                self.skip(output, skipped_type(attr), vec![], origin);
                return Ok(());
            }
            other => {
                return Err(bad(&format!(
                    "a Constant with an unknown attribute `{other}`"
                )));
            }
        };
        match bytes {
            None => self.add(output, &t, origin),
            Some(bytes) => self.add_owned(output, &t, bytes, origin),
        }
    }

    /// An `Identity` of a table entry (or of a skipped constant) is an alias of it.
    fn alias(&mut self, index: usize, node: &NodeProto) {
        let (Some(input), Some(output)) = (node.input.first(), node.output.first()) else {
            return;
        };
        let origin = TensorOrigin::Alias {
            node: index,
            of: input.clone(),
        };
        if let Some(&i) = self.by_name.get(input) {
            let mut entry = self.tensors[i].clone();
            entry.name = output.clone();
            entry.origin = origin;
            self.by_name.insert(output.clone(), self.tensors.len());
            self.tensors.push(entry);
        } else if let Some(&i) = self.skipped_names.get(input) {
            let s = self.skipped[i].clone();
            self.skip(output, s.data_type, s.dims, origin);
        }
    }

    fn skip(&mut self, name: &str, data_type: i32, dims: Vec<i64>, origin: TensorOrigin) {
        self.skipped_names
            .insert(name.to_string(), self.skipped.len());
        self.skipped.push(SkippedTensor {
            name: name.to_string(),
            data_type,
            dims,
            origin,
        });
    }

    /// Adds the tensor `t` under `name`, after every check of its data.
    fn add(&mut self, name: &str, t: &TensorProto, origin: TensorOrigin) -> Result<(), OnnxError> {
        let Some((dtype, shape, expected)) = self.layout(name, t)? else {
            self.skip(name, t.data_type(), t.dims.clone(), origin);
            return Ok(());
        };
        let bytes = self.locate(name, t, dtype, expected)?;
        self.push(name, t.data_type(), dtype, shape, bytes, origin);
        Ok(())
    }

    /// Adds a tensor whose bytes were built from a `Constant`'s scalar attributes.
    fn add_owned(
        &mut self,
        name: &str,
        t: &TensorProto,
        bytes: Vec<u8>,
        origin: TensorOrigin,
    ) -> Result<(), OnnxError> {
        match self.layout(name, t)? {
            Some((dtype, shape, _)) => self.push(
                name,
                t.data_type(),
                dtype,
                shape,
                TensorBytes::Owned(bytes),
                origin,
            ),
            None => {
                return Err(self.bad(name, "a Constant of an unknown type (a bug in repvgg-fuse)"));
            }
        }
        Ok(())
    }

    fn push(
        &mut self,
        name: &str,
        data_type: i32,
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: TensorBytes,
        origin: TensorOrigin,
    ) {
        self.by_name.insert(name.to_string(), self.tensors.len());
        self.tensors.push(TensorEntry {
            name: name.to_string(),
            data_type,
            dtype,
            shape,
            bytes,
            origin,
        });
    }

    /// (dtype, shape, byte size) of `t`, or `None` for a type the table does not hold.
    fn layout(
        &self,
        name: &str,
        t: &TensorProto,
    ) -> Result<Option<(Dtype, Vec<usize>, u64)>, OnnxError> {
        let Some(dtype) = dtype_of(t.data_type()) else {
            return Ok(None);
        };
        let mut shape = Vec::with_capacity(t.dims.len());
        let mut numel: u64 = 1;
        for &d in &t.dims {
            let d = u64::try_from(d)
                .map_err(|_| self.bad(name, format!("negative dimension in {:?}", t.dims)))?;
            numel = numel
                .checked_mul(d)
                .ok_or_else(|| self.bad(name, format!("shape {:?} overflows", t.dims)))?;
            shape.push(
                usize::try_from(d).map_err(|_| self.bad(name, "too large for this machine"))?,
            );
        }
        let expected = numel
            .checked_mul((dtype.bitsize() / 8) as u64)
            .ok_or_else(|| self.bad(name, format!("shape {:?} overflows", t.dims)))?;
        Ok(Some((dtype, shape, expected)))
    }

    /// Where `t`'s `expected` bytes are, after checking there is exactly one data field and
    /// that its size fits.
    fn locate(
        &mut self,
        name: &str,
        t: &TensorProto,
        dtype: Dtype,
        expected: u64,
    ) -> Result<TensorBytes, OnnxError> {
        let typed = typed_fields(t);
        let mismatch = |field, len| OnnxError::DataLength {
            path: self.path.to_path_buf(),
            tensor: name.to_string(),
            field,
            len,
            expected,
            dims: t.dims.clone(),
            data_type: t.data_type(),
        };
        if t.data_location() == EXTERNAL {
            if t.raw_data.is_some() || !typed.is_empty() {
                return Err(self.bad(name, "it has both external data and data inline"));
            }
            let ext = ExternalRef::parse(&t.external_data).map_err(|w| self.bad(name, w))?;
            if let Some(length) = ext.length.filter(|&l| l != expected) {
                return Err(mismatch("the external `length`", length));
            }
            let (file, offset, len) = self.side.resolve(name, &ext, expected)?;
            return Ok(TensorBytes::External { file, offset, len });
        }
        if let Some(raw) = &t.raw_data {
            if let Some(field) = typed.first() {
                return Err(self.bad(name, format!("it has both raw_data and {field}")));
            }
            if raw.len() as u64 != expected {
                return Err(mismatch("raw_data", raw.len() as u64));
            }
            return Ok(self.slice_position(raw));
        }
        match typed.as_slice() {
            [] if expected == 0 => Ok(TensorBytes::Owned(Vec::new())),
            [] => Err(self.bad(
                name,
                "it has no data (no raw_data, typed data or external data)",
            )),
            [_] => {
                let (field, bytes) = typed_bytes(t, dtype).map_err(|w| self.bad(name, w))?;
                if bytes.len() as u64 != expected {
                    return Err(mismatch(field, bytes.len() as u64));
                }
                Ok(TensorBytes::Owned(bytes))
            }
            many => Err(self.bad(
                name,
                format!("it has several data fields: {}", many.join(", ")),
            )),
        }
    }

    /// `raw` as a range of the file buffer (it is a zero-copy slice of it), or a copy if not.
    fn slice_position(&self, raw: &Bytes) -> TensorBytes {
        let base = self.data.as_ptr() as usize;
        let at = raw.as_ptr() as usize;
        match at.checked_sub(base) {
            Some(offset) if !raw.is_empty() && offset + raw.len() <= self.data.len() => {
                TensorBytes::Inline {
                    offset: offset as u64,
                    len: raw.len() as u64,
                }
            }
            _ => TensorBytes::Owned(raw.to_vec()),
        }
    }
}

/// The data type a skipped `Constant` attribute stands for.
fn skipped_type(attr: &AttributeProto) -> i32 {
    match attr.name() {
        "value_string" | "value_strings" => 8,
        _ => 0,
    }
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

/// The names of `t`'s non-empty typed data fields.
fn typed_fields(t: &TensorProto) -> Vec<&'static str> {
    let mut fields = Vec::new();
    for (set, name) in [
        (!t.float_data.is_empty(), "float_data"),
        (!t.int32_data.is_empty(), "int32_data"),
        (!t.int64_data.is_empty(), "int64_data"),
        (!t.double_data.is_empty(), "double_data"),
        (!t.uint64_data.is_empty(), "uint64_data"),
    ] {
        if set {
            fields.push(name);
        }
    }
    fields
}

/// The little-endian bytes of `t`'s one typed field, with the field's name; `Err` if the field
/// is not the one ONNX keeps `dtype` in.
fn typed_bytes(t: &TensorProto, dtype: Dtype) -> Result<(&'static str, Vec<u8>), String> {
    let size = dtype.bitsize() / 8;
    let (field, bytes) = match dtype {
        Dtype::F32 | Dtype::C64 => ("float_data", le_bytes(&t.float_data, f32::to_le_bytes)),
        Dtype::F64 => ("double_data", le_bytes(&t.double_data, f64::to_le_bytes)),
        Dtype::I64 => ("int64_data", le_bytes(&t.int64_data, i64::to_le_bytes)),
        Dtype::U32 | Dtype::U64 => (
            "uint64_data",
            t.uint64_data
                .iter()
                .flat_map(|v| v.to_le_bytes()[..size].to_vec())
                .collect(),
        ),
        // The 8/16/32-bit types, each value (or bit pattern) in the low bytes of an int32.
        _ => (
            "int32_data",
            t.int32_data
                .iter()
                .flat_map(|v| v.to_le_bytes()[..size.min(4)].to_vec())
                .collect(),
        ),
    };
    match typed_fields(t).first() {
        Some(&found) if found != field => Err(format!(
            "its values are in {found}, but data type {} keeps them in {field}",
            t.data_type()
        )),
        _ => Ok((field, bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixed_size_dtype_maps_back_to_its_code() {
        for code in 1..=24 {
            if let Some(dtype) = dtype_of(code) {
                assert_eq!(onnx_data_type(dtype), Some(code));
            }
        }
        assert_eq!(dtype_of(8), None, "strings are not in the table");
    }

    #[test]
    fn typed_fields_become_little_endian_bytes_of_the_dtype() {
        let t = TensorProto {
            data_type: Some(10),
            int32_data: vec![0x3c00, 0xc000],
            ..Default::default()
        };
        assert_eq!(
            typed_bytes(&t, Dtype::F16),
            Ok(("int32_data", vec![0x00, 0x3c, 0x00, 0xc0]))
        );
        let t = TensorProto {
            data_type: Some(3),
            int32_data: vec![-1, 2],
            ..Default::default()
        };
        assert_eq!(
            typed_bytes(&t, Dtype::I8),
            Ok(("int32_data", vec![0xff, 0x02]))
        );
        let t = TensorProto {
            data_type: Some(1),
            int64_data: vec![1],
            ..Default::default()
        };
        assert!(typed_bytes(&t, Dtype::F32).is_err_and(|e| e.contains("int64_data")));
    }
}
