//! The deploy file: which tensors it holds, in what order, and writing it as safetensors.
//!
//! Every tensor not consumed by a fused block is copied byte for byte (or cast, with
//! `--dtype`); each block's branches are replaced by its fused weight and bias. Data is laid out
//! by dtype width, widest first, so every tensor stays aligned to its element size, and within
//! one width in the input's order, so reading the input stays sequential.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{Map, Value, json};

use crate::Error;
use crate::block::{Block, BlockError, Branch, Op, kernel_hw};
use crate::checkpoint::{Checkpoint, dtype_bytes, encode, float_width};
use crate::conv::Input;
use crate::deviation::Deviation;
use crate::int8::ChannelStats;
use crate::layout::Detection;
use crate::ops::{
    ChannelValues, FuseJob, FusedRows, Grid, InputAffine, Kernel, RowError, Term, compose_branch,
    fuse_rows,
};
use crate::progress::{Cancel, Hooks};

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
            let pos = ckpt.get(block.main_weight()).map_or(0, |t| t.start);
            let dtype = out_dtype(block.dtype);
            keyed.push((
                pos,
                0,
                Entry {
                    name: block.deploy_weight.clone(),
                    dtype,
                    shape: block.deploy_shape(),
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

    /// Elements in the file.
    pub fn parameters(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// Total size of the file.
    pub fn file_len(&self) -> u64 {
        self.header().len() as u64 + self.entries.iter().map(Entry::len).sum::<u64>()
    }
}

/// Copies input tensor `index`'s bytes to `out` without decoding them (the kernel does the copy
/// where it can).
pub fn copy_tensor(ckpt: &Checkpoint, index: usize, out: &mut impl Write) -> io::Result<()> {
    ckpt.copy_tensor_to(&ckpt.tensors()[index], out)
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
fn fuse_chunk(
    ckpt: &Checkpoint,
    block: &Block,
    rows: Range<usize>,
    eps: f64,
    (dtype, probe): (Dtype, Option<&Input>),
    out: Vec<u8>,
) -> Result<FusedRows, Error> {
    let block_err = |e| Error::block(ckpt, e);
    let values = ChannelValues::load(ckpt, block, rows.clone()).map_err(block_err)?;
    let (affines, post) = values.affines(eps, block).map_err(block_err)?;
    let inputs = values.input_affines(eps, block).map_err(block_err)?;
    RAW.with(|raw_bufs| {
        let mut raw_bufs = raw_bufs.borrow_mut();
        let n = block.branches.len().max(raw_bufs.len());
        raw_bufs.resize_with(n, Vec::new);
        let mut sides = Vec::with_capacity(block.branches.len());
        for (branch, buf) in block.branches.iter().zip(raw_bufs.iter_mut()) {
            sides.push(match branch.conv_weight() {
                Some(name) => Some(read_rows_raw(ckpt, block, name, rows.clone(), buf)?),
                None => None,
            });
        }
        // Sequence branches (DBB's 1×1 → k×k) composed into kernels first.
        let mut composed = Vec::with_capacity(block.branches.len());
        for (b, (buf, side)) in raw_bufs.iter().zip(&sides).enumerate() {
            let raw = side.map(|(dtype, (kh, _))| (dtype, buf.as_slice(), kh));
            composed.push(compose_branch(&values, block, b, raw, eps).map_err(block_err)?);
        }
        let terms: Vec<Term> = block
            .branches
            .iter()
            .zip(raw_bufs.iter())
            .zip(sides)
            .zip(affines)
            .zip(&inputs)
            .zip(&composed)
            .map(|(((((branch, buf), side), mut a), input), comp)| {
                let kernel = match comp {
                    Some((values, through, side)) => {
                        let th = a.scale.iter().zip(through);
                        a.shift
                            .iter_mut()
                            .zip(th)
                            .for_each(|(b, (s, t))| *b += s * t);
                        Kernel::Values {
                            values,
                            side: *side,
                        }
                    }
                    None => kernel_of(branch, buf, side, input.as_ref()),
                };
                Term {
                    kernel,
                    scale: a.scale,
                    shift: a.shift,
                }
            })
            .collect();
        let job = FuseJob {
            rows: &rows,
            grid: Grid::of(block),
            terms: &terms,
            post_shift: post.as_deref(),
            dtype,
            probe,
        };
        fuse_rows(out, &job).map_err(|e| row_error(ckpt, block, rows.start, dtype, e))
    })
}

/// Fuses output channels `rows` of `block` on their own, as the converter does chunk by chunk
/// (for callers outside the write pipeline: the fuzzer, tools).
pub fn fuse_block_rows(
    ckpt: &Checkpoint,
    block: &Block,
    rows: Range<usize>,
    eps: f64,
    dtype: Dtype,
    probe: Option<&Input>,
) -> Result<FusedRows, Error> {
    fuse_chunk(ckpt, block, rows, eps, (dtype, probe), Vec::new())
}

/// Reads rows `rows` of conv weight `name` as raw bytes into `buf`; returns (dtype, kernel).
fn read_rows_raw(
    ckpt: &Checkpoint,
    block: &Block,
    name: &str,
    rows: Range<usize>,
    buf: &mut Vec<u8>,
) -> Result<(Dtype, (usize, usize)), Error> {
    let t = ckpt.get(name).ok_or_else(|| {
        Error::internal(format!(
            "block `{}`: `{name}` vanished after its checks",
            block.name
        ))
    })?;
    let per_row = t.len / block.out_channels as u64;
    ckpt.read_bytes_into(
        t,
        rows.start as u64 * per_row,
        rows.len() as u64 * per_row,
        buf,
    )?;
    Ok((t.dtype, kernel_hw(t)))
}

/// The fusion routine's view of a branch's source.
fn kernel_of<'a>(
    branch: &Branch,
    raw: &'a [u8],
    weights: Option<(Dtype, (usize, usize))>,
    input: Option<&'a InputAffine>,
) -> Kernel<'a> {
    match (branch.source(), weights) {
        (Op::Conv { dilation, .. }, Some((dtype, side))) => Kernel::Weights {
            dtype,
            bytes: raw,
            side,
            dilation: *dilation,
            input: input.map(|(s, t)| (s.as_slice(), t.as_slice())),
        },
        (Op::AvgPool { kernel }, _) => Kernel::AvgPool { side: *kernel },
        _ => Kernel::Identity,
    }
}

/// A [`RowError`] of rows from `start` on, as the user's error: names the tensor and element.
fn row_error(ckpt: &Checkpoint, block: &Block, start: usize, dtype: Dtype, e: RowError) -> Error {
    match e {
        RowError::NonFinite { term, index, value } => {
            let name = block.branches[term].conv_weight().unwrap_or_default();
            let per_row = ckpt.get(name).map_or(0, |t| t.numel() / block.out_channels);
            Error::block(
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
            let (tensor, at) = if bias {
                (&block.deploy_bias, start + index)
            } else {
                (&block.deploy_weight, start * block.row_len() + index)
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
    }
}

/// Why writing stopped: the output failed, or the input did.
pub enum WriteError {
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

/// What the stream learnt about each block while writing it.
#[derive(Debug, Default)]
pub struct Streamed {
    /// Each block's probe deviation (zero without a probe).
    pub probe: Vec<Deviation>,
    /// Each block's INT8 pass one, on its fused weight as written.
    pub int8: Vec<Option<ChannelStats>>,
}

/// Writes the deploy file's header and data to `file`; returns what it learnt of each block
/// (the probe deviations are zero when `probe_seed` is `None`: no probe).
///
/// The main thread fuses (its chunks in parallel) while a writer thread writes what is done,
/// so computing and writing overlap; the pieces arrive in file order through a short queue.
pub fn write_deploy(
    ckpt: &Checkpoint,
    detection: &Detection,
    plan: &Plan,
    eps: f64,
    probe_seed: Option<u64>,
    file: &std::fs::File,
    hooks: Hooks,
) -> Result<Streamed, WriteError> {
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
                        hooks.progress.advance(bytes.len() as u64);
                        buffers.give(bytes);
                    }
                    Piece::Copy(i) => {
                        copy_tensor(ckpt, i, &mut out)?;
                        hooks.progress.advance(ckpt.tensors()[i].len);
                    }
                }
            }
            Ok(())
        });
        let producer = Producer {
            ckpt,
            detection,
            eps,
            probe_seed,
            tx: &tx,
            buffers,
        };
        let produced = producer.run(plan, hooks.cancel);
        drop(tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the writer thread failed")));
        // An output error explains a closed queue better than the producer's view of it.
        written.map_err(WriteError::Io)?;
        produced
    })
}

/// The fusing side of [`write_deploy`]: makes each piece of the file, in order.
struct Producer<'a> {
    ckpt: &'a Checkpoint,
    detection: &'a Detection,
    eps: f64,
    probe_seed: Option<u64>,
    tx: &'a std::sync::mpsc::SyncSender<Piece>,
    buffers: &'a Buffers,
}

impl Producer<'_> {
    fn send(&self, piece: Piece) -> Result<(), WriteError> {
        self.tx
            .send(piece)
            .map_err(|_| WriteError::Io(std::io::Error::other("the writer stopped")))
    }

    fn run(&self, plan: &Plan, cancel: &Cancel) -> Result<Streamed, WriteError> {
        self.send(Piece::Bytes(plan.header()))?;
        let blocks = &self.detection.blocks;
        let mut streamed = Streamed {
            probe: vec![Deviation::default(); blocks.len()],
            int8: vec![None; blocks.len()],
        };
        let mut pending_bias: Vec<Option<Vec<u8>>> = vec![None; blocks.len()];
        for entry in &plan.entries {
            cancel.check()?;
            match entry.source {
                Source::Copy(i) if self.ckpt.tensors()[i].dtype == entry.dtype => {
                    self.send(Piece::Copy(i))?
                }
                Source::Copy(i) => self.send(Piece::Bytes(self.cast(i, entry.dtype)?))?,
                Source::FusedWeight(b) => {
                    let (bias, dev, int8) = self.fuse_block(b, entry.dtype)?;
                    streamed.probe[b] = dev;
                    streamed.int8[b] = Some(int8);
                    pending_bias[b] = Some(bias);
                }
                Source::FusedBias(b) => {
                    let bias = pending_bias[b].take().ok_or_else(|| {
                        Error::internal(format!("the plan puts `{}` before its weight", entry.name))
                    })?;
                    self.send(Piece::Bytes(bias))?
                }
            }
        }
        Ok(streamed)
    }

    /// Input tensor `i`, cast to `dtype`.
    fn cast(&self, i: usize, dtype: Dtype) -> Result<Vec<u8>, Error> {
        let t = &self.ckpt.tensors()[i];
        let values = self.ckpt.read_f64(t, 0..t.numel())?.ok_or_else(|| {
            Error::internal(format!(
                "the plan casts `{}`, which is not floating point",
                t.name
            ))
        })?;
        let mut bytes = Vec::new();
        encode(dtype, &values, &mut bytes).map_err(|at| Error::Overflow {
            path: self.ckpt.path().to_path_buf(),
            block: String::new(),
            tensor: t.name.clone(),
            index: at,
            value: values[at],
            dtype,
        })?;
        Ok(bytes)
    }

    /// Fuses block `b` and queues its weight; returns its bias bytes, probe deviation and
    /// INT8 pass one.
    ///
    /// A window of chunks at a time, one per thread: fused in parallel, then queued for the
    /// writer, which writes them while the next window is fused.
    fn fuse_block(
        &self,
        b: usize,
        dtype: Dtype,
    ) -> Result<(Vec<u8>, Deviation, ChannelStats), WriteError> {
        let block = &self.detection.blocks[b];
        let probe = self.probe_seed.map(|seed| {
            let c = block.in_channels().unwrap_or(block.in_per_group);
            Input::random(1, c, block.kernel, block.kernel, seed, b as u64)
        });
        let mut bias = Vec::new();
        let mut dev = Deviation::default();
        let mut int8 = ChannelStats::new(block.row_len(), 0);
        for window in block
            .row_chunks(FUSE_CHUNK)
            .chunks(4 * rayon::current_num_threads().max(1))
        {
            let chunks: Vec<(FusedRows, ChannelStats)> = window
                .par_iter()
                .map(|rows| {
                    let out = self.buffers.take();
                    let at = (dtype, probe.as_ref());
                    let c = fuse_chunk(self.ckpt, block, rows.clone(), self.eps, at, out)?;
                    // INT8 pass one on the rows as written, while they are in cache.
                    let mut s = ChannelStats::new(block.row_len(), rows.start);
                    s.push_bytes(dtype, &c.weight);
                    Ok::<_, Error>((c, s))
                })
                .collect::<Result<_, _>>()?;
            for (c, s) in chunks {
                int8 = int8.merge(s);
                dev = dev.merge(c.deviation);
                bias.extend(c.bias);
                self.send(Piece::Bytes(c.weight))?;
            }
        }
        Ok((bias, dev, int8))
    }
}
