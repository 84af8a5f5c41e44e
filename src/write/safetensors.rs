//! Writing the deploy file as safetensors, as a stream: the producer fuses (its chunks in
//! parallel) while a writer thread writes what is done; pass-through tensors are copied by the
//! kernel; byte buffers are recycled.

use std::io::Write;

use rayon::prelude::*;
use safetensors::Dtype;

use crate::Error;
use crate::checkpoint::Checkpoint;
use crate::deviation::Deviation;
use crate::dtype::encode;
use crate::find::Detection;
use crate::fuse::block::{FUSE_CHUNK, fuse_chunk, probe_input};
use crate::fuse::rows::FusedRows;
use crate::int8::ChannelStats;
use crate::progress::{Cancel, Hooks};
use crate::write::plan::{Plan, Source, copy_tensor};

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
    /// Bytes made for this piece alone (the header, a cast tensor, a bias): dropped once
    /// written.
    Bytes(Vec<u8>),
    /// A fused chunk in a buffer of the pool: given back once written. Only these go back, so
    /// the pool holds at most the chunks in flight (every block's bias went back too, and
    /// each was then grown to a chunk: 133 buffers, 31 MB, for repvit_m2_3's 168 blocks).
    Chunk(Vec<u8>),
    /// Input tensor `i`, copied.
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
                    }
                    Piece::Chunk(bytes) => {
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

/// A small block fused ahead of its place in the file.
#[derive(Clone)]
struct Fused {
    weight: Vec<u8>,
    bias: Vec<u8>,
    deviation: Deviation,
    int8: ChannelStats,
}

/// The fusing side of [`write_deploy`]: makes each piece of the file, in order.
struct Producer<'a> {
    ckpt: &'a Checkpoint,
    detection: &'a Detection,
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
        let mut ahead: Vec<Option<Fused>> = vec![None; blocks.len()];
        for (at, entry) in plan.entries.iter().enumerate() {
            cancel.check()?;
            match entry.source {
                Source::Copy(i) if self.ckpt.tensors()[i].dtype == entry.dtype => {
                    self.send(Piece::Copy(i))?
                }
                Source::Copy(i) => self.send(Piece::Bytes(self.cast(i, entry.dtype)?))?,
                Source::FusedWeight(b) => {
                    if ahead[b].is_none() && self.is_small(b) {
                        self.fuse_small_ahead(plan, at, &mut ahead)?;
                    }
                    let (bias, dev, int8) = match ahead[b].take() {
                        Some(f) => {
                            self.send(Piece::Chunk(f.weight))?;
                            (f.bias, f.deviation, f.int8)
                        }
                        None => self.fuse_block(b, entry.dtype)?,
                    };
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

    /// Whether block `b` is fused in one chunk.
    fn is_small(&self, b: usize) -> bool {
        self.detection.blocks[b].row_chunks(FUSE_CHUNK).len() == 1
    }

    /// Fuses the small blocks whose weights come next in the plan from entry `from` on (up
    /// to the next large block), a few per thread, in parallel, into `ahead`: a model of
    /// many small blocks (repvit_m2_3: 168) would otherwise fuse one block at a time, its
    /// one chunk on one thread while the other waits.
    fn fuse_small_ahead(
        &self,
        plan: &Plan,
        from: usize,
        ahead: &mut [Option<Fused>],
    ) -> Result<(), WriteError> {
        let most = 4 * rayon::current_num_threads().max(1);
        let mut batch = Vec::with_capacity(most);
        for entry in &plan.entries[from..] {
            match entry.source {
                Source::FusedWeight(b) if !self.is_small(b) => break,
                Source::FusedWeight(b) => batch.push((b, entry.dtype)),
                _ => {}
            }
            if batch.len() == most {
                break;
            }
        }
        let fused: Vec<Fused> = batch
            .par_iter()
            .map(|&(b, dtype)| self.fuse_small(b, dtype))
            .collect::<Result<_, _>>()?;
        for ((b, _), f) in batch.into_iter().zip(fused) {
            ahead[b] = Some(f);
        }
        Ok(())
    }

    /// Block `b` fused in one chunk: what [`Producer::fuse_block`] gives for it, with the
    /// weight not yet queued.
    fn fuse_small(&self, b: usize, dtype: Dtype) -> Result<Fused, Error> {
        let block = &self.detection.blocks[b];
        let probe = self.probe_seed.map(|seed| probe_input(block, b, seed));
        let rows = 0..block.out_channels;
        let out = self.buffers.take();
        let c = fuse_chunk(self.ckpt, block, rows.clone(), (dtype, probe.as_ref()), out)?;
        let mut s = ChannelStats::new(block.row_len(), 0);
        s.push_bytes(dtype, &c.weight);
        // The chunk is the whole tensor: its max is the tensor's, the guess is right.
        let max = s.max_abs();
        s.speculate(dtype, &c.weight, rows, max);
        Ok(Fused {
            int8: ChannelStats::new(block.row_len(), 0).merge(s),
            deviation: Deviation::default().merge(c.deviation),
            weight: c.weight,
            bias: c.bias,
        })
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
        let probe = self.probe_seed.map(|seed| probe_input(block, b, seed));
        let mut bias = Vec::new();
        let mut dev = Deviation::default();
        let mut int8 = ChannelStats::new(block.row_len(), 0);
        // The block's max|w| over the windows so far: INT8 pass two's guess of the tensor's.
        let mut max_so_far = 0.0f64;
        for window in block
            .row_chunks(FUSE_CHUNK)
            .chunks(4 * rayon::current_num_threads().max(1))
        {
            let mut chunks: Vec<(FusedRows, ChannelStats)> = window
                .par_iter()
                .map(|rows| {
                    let out = self.buffers.take();
                    let at = (dtype, probe.as_ref());
                    let c = fuse_chunk(self.ckpt, block, rows.clone(), at, out)?;
                    // INT8 pass one on the rows as written, while they are in cache.
                    let mut s = ChannelStats::new(block.row_len(), rows.start);
                    s.push_bytes(dtype, &c.weight);
                    Ok::<_, Error>((c, s))
                })
                .collect::<Result<_, _>>()?;
            // Pass two ahead, at the max so far: right for every chunk from the tensor's max
            // on, which then need not be read back from the written file.
            max_so_far = chunks
                .iter()
                .fold(max_so_far, |m, (_, s)| m.max(s.max_abs()));
            let guess = max_so_far;
            let ahead = |(c, s): &mut (FusedRows, ChannelStats), rows: &std::ops::Range<usize>| {
                s.speculate(dtype, &c.weight, rows.clone(), guess)
            };
            if chunks.len() > 1 {
                chunks
                    .par_iter_mut()
                    .zip(window)
                    .for_each(|(c, r)| ahead(c, r));
            } else {
                chunks.iter_mut().zip(window).for_each(|(c, r)| ahead(c, r));
            }
            for (c, s) in chunks {
                int8 = int8.merge(s);
                dev = dev.merge(c.deviation);
                bias.extend(c.bias);
                self.send(Piece::Chunk(c.weight))?;
            }
        }
        Ok((bias, dev, int8))
    }
}
