//! Writing a deploy graph: the model as read, with some nodes removed, new nodes and new
//! initializers added, and whatever is no longer used dropped (initializers, `Constant` and
//! `Identity`-alias nodes, `value_info` of tensors no longer produced, initializers listed as
//! graph inputs). Everything else is written exactly as read.
//!
//! The model is streamed: the small parts (the model without its graph, the graph without its
//! initializers) are serialized and split at the field where the initializers go; each
//! initializer is then written on its own, kept ones straight from the input buffer (or side
//! file), new ones from a callback that writes their bytes, so that no second copy of the
//! weights is ever held. Output goes into files the caller gives (the tool's atomic writer:
//! temp files beside the targets, renamed into place when the whole run succeeded).

use std::collections::{BTreeSet, HashSet};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use protobuf::Message;
use safetensors::Dtype;

use super::external::copy_range;
use super::model::{EXTERNAL, OnnxModel, TensorBytes, TensorOrigin, onnx_data_type};
use super::proto::{AttributeProto, GraphProto, NodeProto, StringStringEntryProto, TensorProto};
use super::wire::{ALIGN, Counted, field_size, split_before, write_field_header};
use super::{OnnxError, node_label};

/// New tensors at least this large go to the side file when writing external data (ONNX's
/// own default threshold).
const EXTERNAL_THRESHOLD: u64 = 1024;

/// Kept inline tensors at least this large are copied from the input by the kernel
/// (`copy_file_range`) instead of through this process's memory.
const SPLICE_THRESHOLD: u64 = 1 << 20;

/// Protobuf cannot hold a message larger than this.
const PROTOBUF_LIMIT: u64 = i32::MAX as u64;

/// The files a deploy graph is written into: the model's, and the side file's for external
/// data.
#[derive(Debug, Clone, Copy)]
pub struct OutFiles<'a> {
    /// The model.
    pub model: &'a std::fs::File,
    /// The side file, when writing external data.
    pub side: Option<&'a std::fs::File>,
}

/// What to change in the graph.
#[derive(Debug, Default, Clone)]
pub struct GraphEdit {
    /// Indices (in `GraphProto.node`) of the nodes to remove.
    pub remove: BTreeSet<usize>,
    /// Nodes to add.
    pub insert: Vec<NewNode>,
    /// Initializers to add, in this order; their bytes come from the writer's callback.
    pub tensors: Vec<NewTensor>,
}

/// A node to add.
#[derive(Debug, Clone, PartialEq)]
pub struct NewNode {
    /// It goes right before the original node of this index (`nodes.len()`: at the end); new
    /// nodes with the same `at` keep their order. The first removed node of a block is the
    /// place that keeps the graph topologically sorted.
    pub at: usize,
    /// Its name.
    pub name: String,
    /// Its operator, e.g. `Conv`.
    pub op_type: String,
    /// Its domain (empty for the default).
    pub domain: String,
    /// Input tensor names.
    pub inputs: Vec<String>,
    /// Output tensor names.
    pub outputs: Vec<String>,
    /// Attributes, in this order.
    pub attrs: Vec<(String, NewAttr)>,
}

/// The value of a new node's attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum NewAttr {
    /// An integer (`group`).
    Int(i64),
    /// A float (`alpha`).
    Float(f32),
    /// Integers (`kernel_shape`, `pads`, `strides`, `dilations`).
    Ints(Vec<i64>),
    /// Floats.
    Floats(Vec<f32>),
    /// A string.
    Bytes(Vec<u8>),
}

/// An initializer to add.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTensor {
    /// Its name.
    pub name: String,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl NewTensor {
    /// Its size in bytes (`u64::MAX` if that overflows).
    pub fn len(&self) -> u64 {
        let size = (self.dtype.bitsize() / 8) as u64;
        self.shape
            .iter()
            .try_fold(size, |n, &d| n.checked_mul(d as u64))
            .unwrap_or(u64::MAX)
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where the written model keeps its initializers' bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPlacement {
    /// External data if the input had any, else inline.
    #[default]
    AsInput,
    /// Everything inline (the model must stay under protobuf's 2 GiB).
    Inline,
    /// A side file `<out>.data`: the input's external tensors and new tensors of 1 KiB or
    /// more; tensors that were inline stay inline.
    External,
}

/// What the writer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteSummary {
    /// Nodes in the input graph.
    pub nodes_before: usize,
    /// Nodes in the written graph.
    pub nodes_after: usize,
    /// `Constant` and `Identity` nodes dropped because nothing used their output any more.
    pub constant_nodes_dropped: Vec<usize>,
    /// Initializers dropped because nothing used them any more.
    pub initializers_dropped: Vec<String>,
    /// `value_info` entries dropped because no node produces their tensor any more.
    pub value_info_dropped: Vec<String>,
    /// The side file written, if any.
    pub side_file: Option<PathBuf>,
    /// Bytes of the model file.
    pub model_bytes: u64,
    /// Bytes of the side file.
    pub side_bytes: u64,
}

/// Where an initializer's body comes from.
#[derive(Debug, Clone)]
enum Source {
    /// A range of an input side file.
    Side { file: PathBuf, offset: u64 },
    /// The callback, for new tensor `i`.
    Fill(usize),
    /// A range of the input `.onnx` file itself (a kept tensor's `raw_data`).
    Input { offset: u64 },
}

/// One initializer as it will be written: `header` (the whole message when there is no
/// inline body), then an optional `raw_data` body; and maybe bytes for the side file.
#[derive(Debug)]
struct OutTensor {
    name: String,
    header: TensorProto,
    inline: Option<(u64, Source)>,
    side: Option<(u64, u64, Source)>,
}

impl OutTensor {
    fn size(&self) -> u64 {
        let body = self.inline.as_ref().map_or(0, |(len, _)| field_size(*len));
        self.header.compute_size() + body
    }
}

/// The graph after the edit, before serialization.
struct Plan {
    kept_initializers: Vec<usize>,
    summary: WriteSummary,
    graph: GraphProto,
}

impl OnnxModel {
    /// The side file a deploy graph written to `out` with `placement` needs (`<out>.data`), if
    /// it writes external data.
    pub fn side_target(&self, out: &Path, placement: DataPlacement) -> Option<PathBuf> {
        let external = match placement {
            DataPlacement::AsInput => self.has_external_data(),
            DataPlacement::Inline => false,
            DataPlacement::External => true,
        };
        external.then(|| side_path(out))
    }

    /// Writes the model with `edit` applied into `files` — the caller's files for `out` and,
    /// when [`OnnxModel::side_target`] says so, its side file (the caller puts them in place,
    /// atomically, once everything is written). The input and its side files are refused as
    /// targets and never written.
    ///
    /// `fill(i, w)` must write exactly the bytes of `edit.tensors[i]` (little-endian,
    /// row-major) to `w`; it is called once per new tensor, in order. Wrap other errors with
    /// `std::io::Error::other`. `summary.side_bytes` is 0 when no tensor went to the side file
    /// (then the caller need not keep it).
    pub fn write_deploy(
        &self,
        edit: &GraphEdit,
        out: &Path,
        files: OutFiles,
        fill: &mut dyn FnMut(usize, &mut dyn Write) -> io::Result<()>,
    ) -> Result<WriteSummary, OnnxError> {
        let side_path = files.side.map(|_| side_path(out));
        self.check_targets(out, side_path.as_deref())?;
        let mut plan = self.plan(edit)?;
        let location = side_path
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        let tensors = self.out_tensors(edit, &plan, location.as_deref())?;
        let (model_bytes, side_bytes) =
            self.write_files(&plan.graph, &tensors, out, files, fill)?;
        plan.summary.model_bytes = model_bytes;
        plan.summary.side_bytes = side_bytes;
        plan.summary.side_file = side_path.filter(|_| side_bytes > 0);
        Ok(plan.summary)
    }

    /// Refuses outputs that are the input or one of its side files, or a folder.
    fn check_targets(&self, out: &Path, side: Option<&Path>) -> Result<(), OnnxError> {
        let mut inputs = vec![self.path().to_path_buf()];
        inputs.extend(self.side_files().iter().cloned());
        for target in std::iter::once(out).chain(side) {
            if target.is_dir() {
                return Err(OnnxError::Output {
                    path: target.to_path_buf(),
                    what: "it is a directory".into(),
                });
            }
            if let Some(input) = inputs.iter().find(|i| same_file(i, target)) {
                return Err(OnnxError::Output {
                    path: target.to_path_buf(),
                    what: format!(
                        "it is the input {}; it would be overwritten",
                        input.display()
                    ),
                });
            }
        }
        Ok(())
    }

    /// What writing `edit` would do (node counts, what is dropped), without writing: `lint`
    /// and `inspect` tell the deploy graph's node count from it.
    pub fn plan_summary(&self, edit: &GraphEdit) -> Result<WriteSummary, OnnxError> {
        Ok(self.plan(edit)?.summary)
    }

    /// Applies the edit to a copy of the graph (without initializers) and drops what is no
    /// longer used.
    fn plan(&self, edit: &GraphEdit) -> Result<Plan, OnnxError> {
        let graph = self.graph();
        self.check_edit(edit)?;
        let mut order: Vec<Slot> = Vec::with_capacity(graph.node.len() + edit.insert.len());
        for at in 0..=graph.node.len() {
            order.extend(
                (0..edit.insert.len())
                    .filter(|&i| edit.insert[i].at == at)
                    .map(Slot::New),
            );
            if at < graph.node.len() && !edit.remove.contains(&at) {
                order.push(Slot::Old(at));
            }
        }
        // Only what the edit made unused is dropped; what was unused already stays as read.
        let all: Vec<Slot> = (0..graph.node.len()).map(Slot::Old).collect();
        let used_before = self.used_names(edit, &all)?;
        let dropped = self.drop_unused_constants(edit, &used_before, &mut order)?;
        let used = self.used_names(edit, &order)?;
        let mut nodes = Vec::with_capacity(order.len());
        for slot in &order {
            nodes.push(match *slot {
                Slot::Old(i) => graph.node[i].clone(),
                Slot::New(i) => Self::new_node(&edit.insert[i]),
            });
        }
        let (kept_initializers, initializers_dropped): (Vec<usize>, Vec<usize>) =
            (0..graph.initializer.len()).partition(|&i| {
                let name = graph.initializer[i].name();
                used.contains(name) || !used_before.contains(name)
            });
        let dropped_names: HashSet<&str> = initializers_dropped
            .iter()
            .map(|&i| graph.initializer[i].name())
            .collect();
        let mut produced: HashSet<&str> = nodes
            .iter()
            .flat_map(|n| n.output.iter())
            .map(String::as_str)
            .collect();
        produced.extend(
            kept_initializers
                .iter()
                .map(|&i| graph.initializer[i].name()),
        );
        produced.extend(edit.tensors.iter().map(|t| t.name.as_str()));
        let mut out = graph.clone();
        out.initializer.clear();
        out.input.retain(|v| !dropped_names.contains(v.name()));
        produced.extend(out.input.iter().map(|v| v.name()));
        let value_info_dropped = out
            .value_info
            .iter()
            .filter(|v| !produced.contains(v.name()))
            .map(|v| v.name().to_string())
            .collect();
        out.value_info.retain(|v| produced.contains(v.name()));
        out.node = nodes;
        let summary = WriteSummary {
            nodes_before: graph.node.len(),
            nodes_after: out.node.len(),
            constant_nodes_dropped: dropped,
            initializers_dropped: dropped_names.iter().map(|s| s.to_string()).collect(),
            value_info_dropped,
            ..Default::default()
        };
        Ok(Plan {
            kept_initializers,
            summary,
            graph: out,
        })
    }

    /// Indices in range; new names not already taken by what stays.
    fn check_edit(&self, edit: &GraphEdit) -> Result<(), OnnxError> {
        let graph = self.graph();
        let bad = |what: String| {
            Err(OnnxError::Edit {
                path: self.path().to_path_buf(),
                what,
            })
        };
        let n = graph.node.len();
        if let Some(i) = edit.remove.iter().find(|&&i| i >= n) {
            return bad(format!(
                "node index {i} to remove, but the graph has {n} nodes"
            ));
        }
        if let Some(node) = edit.insert.iter().find(|x| x.at > n) {
            return bad(format!(
                "new node `{}` at {}, past the {n} nodes",
                node.name, node.at
            ));
        }
        // Initializers count even if the edit frees them: they are dropped only afterwards.
        let mut taken: HashSet<&str> = graph.input.iter().map(|v| v.name()).collect();
        taken.extend(graph.initializer.iter().map(|t| t.name()));
        for (i, node) in graph.node.iter().enumerate() {
            if !edit.remove.contains(&i) {
                taken.extend(node.output.iter().map(String::as_str));
            }
        }
        let new_names = edit
            .tensors
            .iter()
            .map(|t| &t.name)
            .chain(edit.insert.iter().flat_map(|x| x.outputs.iter()));
        let mut fresh = HashSet::new();
        for name in new_names {
            if taken.contains(name.as_str()) || !fresh.insert(name.as_str()) {
                return bad(format!("the new tensor `{name}` would be produced twice"));
            }
        }
        Ok(())
    }

    /// Removes from `order` the `Constant` and alias `Identity` nodes whose outputs were used
    /// (`used_before`) and are not any more (repeatedly: dropping an alias may free what it
    /// aliased).
    fn drop_unused_constants(
        &self,
        edit: &GraphEdit,
        used_before: &HashSet<String>,
        order: &mut Vec<Slot>,
    ) -> Result<Vec<usize>, OnnxError> {
        let graph = self.graph();
        let mut constant_nodes = HashSet::new();
        for entry in self
            .tensors()
            .iter()
            .map(|e| &e.origin)
            .chain(self.skipped().iter().map(|s| &s.origin))
        {
            if let TensorOrigin::Constant { node } | TensorOrigin::Alias { node, .. } = entry {
                constant_nodes.insert(*node);
            }
        }
        let mut dropped = Vec::new();
        loop {
            let used = self.used_names(edit, order)?;
            let before = order.len();
            order.retain(|slot| match *slot {
                Slot::Old(i) if constant_nodes.contains(&i) => {
                    let outputs = &graph.node[i].output;
                    let keep = outputs.iter().any(|o| used.contains(o.as_str()))
                        || !outputs.iter().any(|o| used_before.contains(o.as_str()));
                    if !keep {
                        dropped.push(i);
                    }
                    keep
                }
                _ => true,
            });
            if order.len() == before {
                break;
            }
        }
        dropped.sort_unstable();
        Ok(dropped)
    }

    /// Every tensor name the nodes in `order` (and their subgraphs) read, and the graph
    /// outputs.
    fn used_names(&self, edit: &GraphEdit, order: &[Slot]) -> Result<HashSet<String>, OnnxError> {
        let graph = self.graph();
        let mut used: HashSet<String> = graph.output.iter().map(|v| v.name().to_string()).collect();
        for slot in order {
            match *slot {
                Slot::Old(i) => {
                    let node = &graph.node[i];
                    used.extend(node.input.iter().cloned());
                    for attr in &node.attribute {
                        subgraph_inputs(attr, &mut used).map_err(|e| OnnxError::BadNode {
                            path: self.path().to_path_buf(),
                            node: node_label(i, node),
                            what: format!(
                                "attribute `{}` holds an unreadable subgraph: {e}",
                                attr.name()
                            ),
                        })?;
                    }
                }
                Slot::New(i) => used.extend(edit.insert[i].inputs.iter().cloned()),
            }
        }
        Ok(used)
    }

    fn new_node(node: &NewNode) -> NodeProto {
        let mut attribute = Vec::with_capacity(node.attrs.len());
        for (name, value) in &node.attrs {
            let mut a = AttributeProto {
                name: Some(name.clone()),
                ..Default::default()
            };
            a.type_ = Some(match value {
                NewAttr::Float(f) => {
                    a.f = Some(*f);
                    1
                }
                NewAttr::Int(i) => {
                    a.i = Some(*i);
                    2
                }
                NewAttr::Bytes(b) => {
                    a.s = Some(Bytes::from(b.clone()));
                    3
                }
                NewAttr::Floats(f) => {
                    a.floats.clone_from(f);
                    6
                }
                NewAttr::Ints(i) => {
                    a.ints.clone_from(i);
                    7
                }
            });
            attribute.push(a);
        }
        NodeProto {
            input: node.inputs.clone(),
            output: node.outputs.clone(),
            name: Some(node.name.clone()),
            op_type: Some(node.op_type.clone()),
            domain: (!node.domain.is_empty()).then(|| node.domain.clone()),
            attribute,
            ..Default::default()
        }
    }

    /// The initializers as they will be written, with side-file offsets planned when
    /// `location` (the side file's name) is given.
    fn out_tensors(
        &self,
        edit: &GraphEdit,
        plan: &Plan,
        location: Option<&str>,
    ) -> Result<Vec<OutTensor>, OnnxError> {
        let mut side = SidePlan(0);
        let mut out = Vec::new();
        for &i in &plan.kept_initializers {
            out.push(self.kept_tensor(i, location, &mut side));
        }
        for (i, t) in edit.tensors.iter().enumerate() {
            let data_type = onnx_data_type(t.dtype).ok_or_else(|| OnnxError::Edit {
                path: self.path().to_path_buf(),
                what: format!(
                    "new tensor `{}`: dtype {:?} has no ONNX code",
                    t.name, t.dtype
                ),
            })?;
            let mut header = TensorProto {
                dims: t.shape.iter().map(|&d| d as i64).collect(),
                data_type: Some(data_type),
                name: Some(t.name.clone()),
                ..Default::default()
            };
            let len = t.len();
            let (inline, side) = match location {
                Some(loc) if len >= EXTERNAL_THRESHOLD => {
                    let at = side.place(len);
                    set_external(&mut header, loc, at, len);
                    (None, Some((at, len, Source::Fill(i))))
                }
                _ => (Some((len, Source::Fill(i))), None),
            };
            out.push(OutTensor {
                name: t.name.clone(),
                header,
                inline,
                side,
            });
        }
        Ok(out)
    }

    /// Initializer `i` as it will be written: as read, except that external data moves to
    /// the new side file (`location`), or inline when there is none.
    fn kept_tensor(&self, i: usize, location: Option<&str>, side: &mut SidePlan) -> OutTensor {
        let t = &self.graph().initializer[i];
        let entry = self
            .tensor(t.name())
            .filter(|e| e.origin == TensorOrigin::Initializer { index: i });
        let mut header = t.clone();
        let (inline, side) = match entry.map(|e| &e.bytes) {
            Some(TensorBytes::External { file, offset, len }) => {
                let source = Source::Side {
                    file: file.clone(),
                    offset: *offset,
                };
                match location {
                    Some(loc) => {
                        let at = side.place(*len);
                        set_external(&mut header, loc, at, *len);
                        (None, Some((at, *len, source)))
                    }
                    None => {
                        header.external_data.clear();
                        header.data_location = None;
                        (Some((*len, source)), None)
                    }
                }
            }
            // A large inline body is copied from the input file by the kernel, not re-encoded
            // from the map: its header is written without it, the `raw_data` field after it.
            Some(TensorBytes::Inline { offset, len }) if *len >= SPLICE_THRESHOLD => {
                header.raw_data = None;
                (Some((*len, Source::Input { offset: *offset })), None)
            }
            _ => (None, None),
        };
        OutTensor {
            name: t.name().to_string(),
            header,
            inline,
            side,
        }
    }

    /// Writes the model (and side file) to the temp files; returns their sizes.
    fn write_files(
        &self,
        graph: &GraphProto,
        tensors: &[OutTensor],
        out: &Path,
        files: OutFiles,
        fill: &mut dyn FnMut(usize, &mut dyn Write) -> io::Result<()>,
    ) -> Result<(u64, u64), OnnxError> {
        let mut model = self.proto().clone();
        model.graph.clear();
        let model_bytes = model.write_to_bytes().map_err(|e| internal(out, e))?;
        let graph_bytes = graph.write_to_bytes().map_err(|e| internal(out, e))?;
        let (m_head, m_tail) = model_bytes.split_at(split_before(&model_bytes, 7));
        let (g_head, g_tail) = graph_bytes.split_at(split_before(&graph_bytes, 5));
        let tensor_sizes: Vec<u64> = tensors.iter().map(OutTensor::size).collect();
        let graph_size = g_head.len() as u64
            + tensor_sizes.iter().map(|&s| field_size(s)).sum::<u64>()
            + g_tail.len() as u64;
        let total = m_head.len() as u64 + field_size(graph_size) + m_tail.len() as u64;
        if total > PROTOBUF_LIMIT {
            return Err(OnnxError::Output {
                path: out.to_path_buf(),
                what: format!(
                    "the model would be {total} bytes, over protobuf's 2 GiB limit; write it with external data"
                ),
            });
        }
        let mut w = BufWriter::with_capacity(1 << 20, files.model);
        let mut side = files
            .side
            .map(|f| Counted::new(BufWriter::with_capacity(1 << 20, f)));
        let werr = io_err(out, "cannot write the model");
        (|| -> io::Result<()> {
            w.write_all(m_head)?;
            write_field_header(&mut w, 7, graph_size)?;
            w.write_all(g_head)
        })()
        .map_err(&werr)?;
        for (t, &size) in tensors.iter().zip(&tensor_sizes) {
            if let (Some((at, len, source)), Some(side)) = (&t.side, side.as_mut()) {
                let path = side_path(out);
                side.pad_to(*at)
                    .map_err(io_err(&path, "cannot write the side file"))?;
                self.write_body(source, *len, side, &t.name, &path, fill)?;
            }
            (|| -> io::Result<()> {
                write_field_header(&mut w, 5, size)?;
                t.header.write_to_writer(&mut w).map_err(io::Error::other)
            })()
            .map_err(&werr)?;
            if let Some((len, source)) = &t.inline {
                write_field_header(&mut w, 9, *len).map_err(&werr)?;
                if let Source::Input { offset } = source {
                    w.flush().map_err(&werr)?;
                    self.splice(*offset, *len, files.model, &t.name)?;
                    continue;
                }
                let mut counted = Counted::new(&mut w);
                self.write_body(source, *len, &mut counted, &t.name, out, fill)?;
            }
        }
        (|| -> io::Result<()> {
            w.write_all(g_tail)?;
            w.write_all(m_tail)?;
            w.flush()
        })()
        .map_err(&werr)?;
        let side_bytes = match side {
            Some(mut s) => {
                s.inner
                    .flush()
                    .map_err(io_err(&side_path(out), "cannot write the side file"))?;
                s.count
            }
            None => 0,
        };
        Ok((total, side_bytes))
    }

    /// Copies bytes `offset..offset + len` of the input file to the end of `out` (the kernel's
    /// copy, where it has one: no pass through this process's memory).
    fn splice(
        &self,
        offset: u64,
        len: u64,
        mut out: &std::fs::File,
        tensor: &str,
    ) -> Result<(), OnnxError> {
        let fail = |source| OnnxError::Io {
            path: self.path().to_path_buf(),
            what: format!("cannot copy tensor `{tensor}`"),
            source,
        };
        let mut input = std::fs::File::open(self.path()).map_err(fail)?;
        input.seek(io::SeekFrom::Start(offset)).map_err(fail)?;
        // `Take<File>` into `&File`: std's `io::copy` uses copy_file_range / sendfile here.
        let copied = io::copy(&mut input.take(len), &mut out).map_err(fail)?;
        if copied != len {
            return Err(fail(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file ended after {copied} of {len} bytes"),
            )));
        }
        Ok(())
    }

    /// Writes one tensor body of `len` bytes from `source` to `w` (positioned at its start).
    fn write_body<W: Write>(
        &self,
        source: &Source,
        len: u64,
        w: &mut Counted<W>,
        tensor: &str,
        target: &Path,
        fill: &mut dyn FnMut(usize, &mut dyn Write) -> io::Result<()>,
    ) -> Result<(), OnnxError> {
        let start = w.count;
        match source {
            Source::Side { file, offset } => {
                copy_range(file, *offset, len, w).map_err(|source| OnnxError::Io {
                    path: file.clone(),
                    what: format!("cannot copy tensor `{tensor}` of {}", self.path().display()),
                    source,
                })?
            }
            Source::Input { offset } => {
                let body = self
                    .data_range(*offset, len)
                    .ok_or_else(|| OnnxError::Output {
                        path: target.to_path_buf(),
                        what: format!(
                            "tensor `{tensor}` is outside the input (a bug in repvgg-fuse)"
                        ),
                    })?;
                w.write_all(body)
                    .map_err(io_err(target, "cannot write the model"))?
            }
            Source::Fill(i) => fill(*i, w).map_err(|source| OnnxError::Fill {
                path: target.to_path_buf(),
                tensor: tensor.to_string(),
                source,
            })?,
        }
        let written = w.count - start;
        if written != len {
            return Err(OnnxError::Fill {
                path: target.to_path_buf(),
                tensor: tensor.to_string(),
                source: io::Error::other(format!(
                    "{written} bytes were written for a tensor of {len}"
                )),
            });
        }
        Ok(())
    }
}

/// The side file's layout so far: its end.
struct SidePlan(u64);

impl SidePlan {
    /// The aligned offset for `len` more bytes.
    fn place(&mut self, len: u64) -> u64 {
        let offset = self.0.div_ceil(ALIGN) * ALIGN;
        self.0 = offset + len;
        offset
    }
}

/// A node of the written graph: an original one, or a new one.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Old(usize),
    New(usize),
}

/// `deploy.onnx` → `deploy.onnx.data`, beside it.
pub fn side_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map_or_else(|| "deploy.onnx".into(), |n| n.to_os_string());
    name.push(".data");
    out.with_file_name(name)
}

/// Whether `a` and `b` name the same file: the same inode when both exist (any path, symlink
/// or hard link), else the same canonical folder and file name.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return x.dev() == y.dev() && x.ino() == y.ino();
    }
    let place = |p: &Path| {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some((std::fs::canonicalize(dir).ok()?, p.file_name()?.to_owned()))
    };
    a == b || matches!((place(a), place(b)), (Some(x), Some(y)) if x == y)
}

/// An [`OnnxError::Io`] of `path` while doing `what`, for `map_err`.
fn io_err<'a>(path: &'a Path, what: &'a str) -> impl Fn(io::Error) -> OnnxError + 'a {
    move |source| OnnxError::Io {
        path: path.to_path_buf(),
        what: what.to_string(),
        source,
    }
}

fn internal(out: &Path, e: protobuf::Error) -> OnnxError {
    OnnxError::Output {
        path: out.to_path_buf(),
        what: format!("cannot serialize the model (a bug in repvgg-fuse): {e}"),
    }
}

/// Points `t` at `len` bytes at `offset` of the side file `location`, keeping other entries.
fn set_external(t: &mut TensorProto, location: &str, offset: u64, len: u64) {
    let entry = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.to_string()),
        value: Some(v),
        ..Default::default()
    };
    let others = t
        .external_data
        .drain(..)
        .filter(|e| !matches!(e.key(), "location" | "offset" | "length"));
    let mut entries = vec![
        entry("location", location.to_string()),
        entry("offset", offset.to_string()),
        entry("length", len.to_string()),
    ];
    entries.extend(others);
    t.external_data = entries;
    t.data_location = Some(EXTERNAL);
    t.raw_data = None;
}

/// The names every node of the subgraphs in `attr` reads (recursively).
fn subgraph_inputs(attr: &AttributeProto, used: &mut HashSet<String>) -> protobuf::Result<()> {
    for bytes in attr.g.iter().chain(&attr.graphs) {
        let graph = GraphProto::parse_from_tokio_bytes(bytes)?;
        used.extend(graph.output.iter().map(|v| v.name().to_string()));
        for node in &graph.node {
            used.extend(node.input.iter().cloned());
            for a in &node.attribute {
                subgraph_inputs(a, used)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_file_is_named_after_the_output() {
        assert_eq!(
            side_path(Path::new("out/deploy.onnx")),
            Path::new("out/deploy.onnx.data")
        );
    }
}
