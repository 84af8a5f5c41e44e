//! The deploy file: which tensors it holds, in what order, and writing it as safetensors.
//!
//! Every tensor not consumed by a fused block is copied byte for byte (or cast, with
//! `--dtype`); each block's branches are replaced by its fused weight and bias. Data is laid out
//! by dtype width, widest first, so every tensor stays aligned to its element size, and within
//! one width in the input's order, so reading the input stays sequential.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;

use indicatif::ProgressBar;
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{Map, Value, json};

use crate::Error;
use crate::block::{Block, BlockError};
use crate::checkpoint::{Checkpoint, dtype_bytes, encode, float_width};
use crate::conv::Input;
use crate::convert::{block_err, row_chunks};
use crate::fuse::BlockValues;
use crate::int8::ChannelStats;
use crate::layout::Detection;
use crate::probe::{BranchRows, FusedRows, RowError, fuse_rows};
use crate::verify::Deviation;

/// Where an output tensor's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The input tensor with this index in [`Checkpoint::tensors`], copied (or cast).
    Copy(usize),
    /// The fused weight of block `i` of the detection.
    FusedWeight(usize),
    /// The fused bias of block `i`.
    FusedBias(usize),
}

/// One tensor of the deploy file.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Where its bytes come from.
    pub source: Source,
}

impl Entry {
    /// Size of its data in bytes.
    pub fn len(&self) -> u64 {
        (self.shape.iter().product::<usize>() * dtype_bytes(self.dtype)) as u64
    }

    /// Whether it holds no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The deploy file's tensors, in data order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Tensors in the order their data is written.
    pub entries: Vec<Entry>,
    /// The input's `__metadata__`, kept as it was.
    pub metadata: Option<BTreeMap<String, String>>,
}

impl Plan {
    /// The deploy file for `detection` of `ckpt`; `cast` converts every floating-point tensor.
    pub fn new(ckpt: &Checkpoint, detection: &Detection, cast: Option<Dtype>) -> Plan {
        let consumed = detection.consumed();
        let out_dtype = |d: Dtype| match cast {
            Some(c) if float_width(d).is_some() => c,
            _ => d,
        };
        // (position in input, sub-order, entry)
        let mut keyed: Vec<(u64, u8, Entry)> = Vec::new();
        for (i, t) in ckpt.tensors().iter().enumerate() {
            if consumed.contains(t.name.as_str()) {
                continue;
            }
            keyed.push((
                t.start,
                0,
                Entry {
                    name: t.name.clone(),
                    dtype: out_dtype(t.dtype),
                    shape: t.shape.clone(),
                    source: Source::Copy(i),
                },
            ));
        }
        for (b, block) in detection.blocks.iter().enumerate() {
            let pos = block
                .branches
                .first()
                .and_then(|br| ckpt.get(&br.conv_weight_name()))
                .map_or(0, |t| t.start);
            let dtype = out_dtype(block.dtype);
            let k = block.kernel;
            keyed.push((
                pos,
                0,
                Entry {
                    name: block.deploy_weight.clone(),
                    dtype,
                    shape: vec![block.out_channels, block.in_per_group, k, k],
                    source: Source::FusedWeight(b),
                },
            ));
            keyed.push((
                pos,
                1,
                Entry {
                    name: block.deploy_bias.clone(),
                    dtype,
                    shape: vec![block.out_channels],
                    source: Source::FusedBias(b),
                },
            ));
        }
        keyed.sort_by_key(|(pos, sub, e)| (std::cmp::Reverse(dtype_bytes(e.dtype)), *pos, *sub));
        Plan {
            entries: keyed.into_iter().map(|(_, _, e)| e).collect(),
            metadata: ckpt.metadata().cloned(),
        }
    }

    /// The safetensors header: 8-byte length, then JSON padded with spaces to a multiple of 8.
    pub fn header(&self) -> Vec<u8> {
        let mut map = Map::new();
        if let Some(meta) = &self.metadata {
            map.insert("__metadata__".into(), json!(meta));
        }
        let mut offset = 0u64;
        for e in &self.entries {
            let end = offset + e.len();
            map.insert(
                e.name.clone(),
                json!({ "dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, end] }),
            );
            offset = end;
        }
        let mut text = Value::Object(map).to_string().into_bytes();
        while text.len() % 8 != 0 {
            text.push(b' ');
        }
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        out
    }

    /// Total size of the file.
    pub fn file_len(&self) -> u64 {
        self.header().len() as u64 + self.entries.iter().map(Entry::len).sum::<u64>()
    }
}

/// Copies input tensor `index`'s bytes to `out` without decoding them (the kernel does the copy
/// where it can).
pub fn copy_tensor(ckpt: &Checkpoint, index: usize, out: &mut impl Write) -> io::Result<()> {
    let t = &ckpt.tensors()[index];
    let mut file = ckpt.file();
    file.seek(SeekFrom::Start(t.start))?;
    let copied = io::copy(&mut file.take(t.len), out)?;
    if copied != t.len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "tensor `{}`: the input ended after {copied} of its {} bytes (was it changed while being read?)",
                t.name, t.len
            ),
        ));
    }
    Ok(())
}

/// Weights fused at a time by one thread when converting: small enough that the bytes just
/// read are still in the core's cache when they are decoded (64 Ki elements, 256 KB of F32).
const FUSE_CHUNK: usize = 1 << 16;

/// Byte buffers passed from the fusing threads to the writer and back, so that a few buffers
/// carry the whole file: fresh ones would cost a page fault per 4 KiB, and the faults of two
/// threads contend for the same lock.
#[derive(Default)]
struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .map(|mut v| v.pop())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        if let Ok(mut v) = self.0.lock() {
            v.push(buf);
        }
    }
}

thread_local! {
    /// Each fusing thread's buffers for the branch weights it reads.
    static RAW: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Fuses output channels `rows` of `block` straight from the file's bytes, encoded in `dtype`
/// into `out`, with the probe deviation of the rows as written.
#[allow(clippy::too_many_arguments)]
fn fuse_chunk(
    ckpt: &Checkpoint,
    block: &Block,
    rows: Range<usize>,
    eps: f64,
    dtype: Dtype,
    probe: Option<&Input>,
    out: Vec<u8>,
) -> Result<FusedRows, Error> {
    RAW.with(|raw_bufs| {
        let mut raw_bufs = raw_bufs.borrow_mut();
        let n = block.branches.len().max(raw_bufs.len());
        raw_bufs.resize_with(n, Vec::new);
        let affine =
            BlockValues::load_affine(ckpt, block, rows.clone()).map_err(|e| block_err(ckpt, e))?;
        let mut raw = Vec::with_capacity(block.branches.len());
        for (branch, buf) in block.branches.iter().zip(raw_bufs.iter_mut()) {
            raw.push(match &branch.conv {
                Some(conv) => {
                    let t = ckpt.get(&conv.weight).ok_or_else(|| {
                        block_err(
                            ckpt,
                            BlockError::new(&block.name, format!("`{}` is missing", conv.weight)),
                        )
                    })?;
                    let per_row = t.len / block.out_channels as u64;
                    ckpt.read_bytes_into(
                        t,
                        rows.start as u64 * per_row,
                        rows.len() as u64 * per_row,
                        buf,
                    )?;
                    Some((t.dtype, &buf[..]))
                }
                None => None,
            });
        }
        let branches: Vec<BranchRows> = affine
            .branches
            .iter()
            .zip(&raw)
            .zip(affine.affines(eps, block).map_err(|e| block_err(ckpt, e))?)
            .map(|((v, raw), (t, shift))| BranchRows {
                role: v.role,
                kernel: v.kernel,
                weight: *raw,
                t,
                shift,
            })
            .collect();
        let start = rows.start;
        fuse_rows(
            out,
            rows,
            block.in_per_group,
            block.kernel,
            block.out_per_group(),
            &branches,
            dtype,
            probe,
        )
        .map_err(|e| match e {
            RowError::NonFinite {
                branch,
                index,
                value,
            } => {
                let b = &block.branches[branch];
                let name = b.conv.as_ref().map_or(String::new(), |c| c.weight.clone());
                let per_row = ckpt
                    .get(&name)
                    .map_or(0, |t| t.numel() / block.out_channels);
                block_err(
                    ckpt,
                    BlockError::new(
                        &block.name,
                        format!(
                            "tensor `{name}` holds {value} at element {}; fusion needs finite values",
                            start * per_row + index
                        ),
                    ),
                )
            }
            RowError::Overflow { bias, index, value } => {
                let per_row = block.in_per_group * block.kernel * block.kernel;
                let (tensor, at) = if bias {
                    (&block.deploy_bias, start + index)
                } else {
                    (&block.deploy_weight, start * per_row + index)
                };
                Error::Overflow {
                    path: ckpt.path().to_path_buf(),
                    block: block.name.clone(),
                    tensor: tensor.clone(),
                    index: at,
                    value,
                    dtype,
                }
            }
        })
    })
}

/// Why writing stopped: the output failed, or the input did.
pub(crate) enum WriteError {
    /// Writing the output failed.
    Io(std::io::Error),
    /// The input or the fusion failed.
    Run(Error),
}

impl From<Error> for WriteError {
    fn from(e: Error) -> Self {
        WriteError::Run(e)
    }
}

/// What the writer thread is asked to put next in the file.
enum Piece {
    Bytes(Vec<u8>),
    Copy(usize),
}

/// Writes the deploy file's header and data to `file`; returns each block's probe deviation
/// (all zero when `probe_seed` is `None`: no probe) and its INT8 pass one
/// ([`crate::int8::ChannelStats`] of the fused weight as written).
///
/// The main thread fuses (its chunks in parallel) while a writer thread writes what is done,
/// so computing and writing overlap; the pieces arrive in file order through a short queue.
pub(crate) fn write_deploy(
    ckpt: &Checkpoint,
    detection: &Detection,
    plan: &Plan,
    eps: f64,
    probe_seed: Option<u64>,
    file: &std::fs::File,
    progress: &ProgressBar,
) -> Result<(Vec<Deviation>, Vec<Option<ChannelStats>>), WriteError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(16);
    let buffers = Buffers::default();
    std::thread::scope(|scope| {
        let buffers = &buffers;
        let writer = scope.spawn(move || -> std::io::Result<()> {
            let mut out = file;
            for piece in rx {
                match piece {
                    Piece::Bytes(bytes) => {
                        out.write_all(&bytes)?;
                        progress.inc(bytes.len() as u64);
                        buffers.give(bytes);
                    }
                    Piece::Copy(i) => {
                        copy_tensor(ckpt, i, &mut out)?;
                        progress.inc(ckpt.tensors()[i].len);
                    }
                }
            }
            Ok(())
        });
        let produced = produce(ckpt, detection, plan, eps, probe_seed, &tx, buffers);
        drop(tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the writer thread failed")));
        // An output error explains a closed queue better than the producer's view of it.
        written.map_err(WriteError::Io)?;
        produced
    })
}

fn produce(
    ckpt: &Checkpoint,
    detection: &Detection,
    plan: &Plan,
    eps: f64,
    probe_seed: Option<u64>,
    tx: &std::sync::mpsc::SyncSender<Piece>,
    buffers: &Buffers,
) -> Result<(Vec<Deviation>, Vec<Option<ChannelStats>>), WriteError> {
    let send = |piece| {
        tx.send(piece)
            .map_err(|_| WriteError::Io(std::io::Error::other("the writer stopped")))
    };
    send(Piece::Bytes(plan.header()))?;
    let mut deviations = vec![Deviation::default(); detection.blocks.len()];
    let mut pending_bias: Vec<Option<Vec<u8>>> = vec![None; detection.blocks.len()];
    let mut int8: Vec<Option<ChannelStats>> = vec![None; detection.blocks.len()];
    for entry in &plan.entries {
        crate::check_interrupted()?;
        match entry.source {
            Source::Copy(i) if ckpt.tensors()[i].dtype == entry.dtype => send(Piece::Copy(i))?,
            Source::Copy(i) => {
                let t = &ckpt.tensors()[i];
                let values = ckpt
                    .read_f64(t, 0..t.numel())
                    .map_err(Error::from)?
                    .unwrap_or_default();
                let mut bytes = Vec::new();
                encode(entry.dtype, &values, &mut bytes).map_err(|at| Error::Overflow {
                    path: ckpt.path().to_path_buf(),
                    block: String::new(),
                    tensor: t.name.clone(),
                    index: at,
                    value: values[at],
                    dtype: entry.dtype,
                })?;
                send(Piece::Bytes(bytes))?;
            }
            Source::FusedWeight(b) => {
                let block = &detection.blocks[b];
                let probe = probe_seed.map(|seed| {
                    let c = block.in_channels().unwrap_or(block.in_per_group);
                    Input::random(1, c, block.kernel, block.kernel, seed, b as u64)
                });
                // A window of chunks at a time, one per thread: fused in parallel, then queued
                // for the writer, which writes them while the next window is fused.
                let mut bias = Vec::new();
                for window in
                    row_chunks(block, FUSE_CHUNK).chunks(4 * rayon::current_num_threads().max(1))
                {
                    let chunks: Vec<(FusedRows, ChannelStats)> = window
                        .par_iter()
                        .map(|rows| {
                            let out = buffers.take();
                            let c = fuse_chunk(
                                ckpt,
                                block,
                                rows.clone(),
                                eps,
                                entry.dtype,
                                probe.as_ref(),
                                out,
                            )?;
                            // INT8 pass one on the rows as written, while they are in cache.
                            let mut s =
                                ChannelStats::new(entry.shape[1..].iter().product(), rows.start);
                            s.push_bytes(entry.dtype, &c.weight);
                            Ok::<_, Error>((c, s))
                        })
                        .collect::<Result<_, _>>()?;
                    for (c, s) in chunks {
                        int8[b] = Some(match int8[b].take() {
                            Some(acc) => acc.merge(s),
                            None => s,
                        });
                        deviations[b] = deviations[b].merge(c.deviation);
                        bias.extend(c.bias);
                        send(Piece::Bytes(c.weight))?;
                    }
                }
                pending_bias[b] = Some(bias);
            }
            Source::FusedBias(b) => send(Piece::Bytes(pending_bias[b].take().unwrap_or_default()))?,
        }
    }
    Ok((deviations, int8))
}
