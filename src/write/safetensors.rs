//! Writing the deploy file as safetensors, each piece at its place: the header fixes every
//! tensor's offset, so the threads that fuse a chunk write it there themselves (`pwrite`)
//! while it is in their cache, in any order; pass-through tensors are copied by the kernel.

use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use safetensors::Dtype;

use crate::Error;
use crate::checkpoint::Checkpoint;
use crate::conv::Input;
use crate::deviation::Deviation;
use crate::dtype::{dtype_bytes, encode};
use crate::find::Detection;
use crate::fuse::block::{FUSE_CHUNK, fuse_chunk, probe_input};
use crate::fuse::rows::FusedRows;
use crate::int8::ChannelStats;
use crate::progress::{Cancel, Hooks};
use crate::write::plan::{Plan, Source, copy_tensor};

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
/// A block's chunks are fused in parallel, each written at its offset by the thread that
/// fused it: the bytes go from that core's cache to the page cache, and the buffer they were
/// in stays that thread's for its next chunk. Nothing waits for the file's order.
pub fn write_deploy(
    ckpt: &Checkpoint,
    detection: &Detection,
    plan: &Plan,
    probe_seed: Option<u64>,
    file: &std::fs::File,
    hooks: Hooks,
) -> Result<Streamed, WriteError> {
    let header = plan.header();
    let mut offsets = Vec::with_capacity(plan.entries.len());
    let mut at = header.len() as u64;
    for entry in &plan.entries {
        offsets.push(at);
        at += entry.len();
    }
    let writer = Writer {
        file,
        hooks: &hooks,
    };
    writer.put(&header, 0)?;
    let producer = Producer {
        ckpt,
        detection,
        probe_seed,
        writer,
    };
    producer.run(plan, &offsets, hooks.cancel)
}

/// The output file and the progress it reports.
#[derive(Clone, Copy)]
struct Writer<'a> {
    file: &'a std::fs::File,
    hooks: &'a Hooks<'a>,
}

impl Writer<'_> {
    /// `bytes` written at `offset`.
    fn put(&self, bytes: &[u8], offset: u64) -> Result<(), WriteError> {
        self.file
            .write_all_at(bytes, offset)
            .map_err(WriteError::Io)?;
        self.hooks.progress.advance(bytes.len() as u64);
        Ok(())
    }

    /// Input tensor `i` of `ckpt` copied to `offset` (by the kernel where it can: the file
    /// position is only ever moved here, the chunks are written by position).
    fn copy(&self, ckpt: &Checkpoint, i: usize, offset: u64) -> Result<(), WriteError> {
        let mut out = self.file;
        out.seek(SeekFrom::Start(offset)).map_err(WriteError::Io)?;
        copy_tensor(ckpt, i, &mut out).map_err(WriteError::Io)?;
        self.hooks.progress.advance(ckpt.tensors()[i].len);
        Ok(())
    }
}

/// A block fused, its weight written: what the file still needs of it (its bias) and what the
/// report learns.
struct Fused {
    bias: Vec<u8>,
    deviation: Deviation,
    int8: ChannelStats,
}

thread_local! {
    /// Each fusing thread's output buffer, reused for every chunk it fuses (fresh ones would
    /// cost a page fault per 4 KiB, and the faults of two threads contend for one lock).
    static OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `buf` back as this thread's output buffer.
fn recycle(buf: Vec<u8>) {
    OUT.with(|o| *o.borrow_mut() = buf);
}

/// The fusing side of [`write_deploy`]: makes each piece of the file and puts it in place.
struct Producer<'a> {
    ckpt: &'a Checkpoint,
    detection: &'a Detection,
    probe_seed: Option<u64>,
    writer: Writer<'a>,
}

impl Producer<'_> {
    fn run(&self, plan: &Plan, offsets: &[u64], cancel: &Cancel) -> Result<Streamed, WriteError> {
        let blocks = &self.detection.blocks;
        let mut streamed = Streamed {
            probe: vec![Deviation::default(); blocks.len()],
            int8: vec![None; blocks.len()],
        };
        let mut pending_bias: Vec<Option<Vec<u8>>> = vec![None; blocks.len()];
        let mut ahead: Vec<Option<Fused>> = (0..blocks.len()).map(|_| None).collect();
        for (at, (entry, &offset)) in plan.entries.iter().zip(offsets).enumerate() {
            cancel.check()?;
            match entry.source {
                Source::Copy(i) if self.ckpt.tensors()[i].dtype == entry.dtype => {
                    self.writer.copy(self.ckpt, i, offset)?
                }
                Source::Copy(i) => self.writer.put(&self.cast(i, entry.dtype)?, offset)?,
                Source::FusedWeight(b) => {
                    if ahead[b].is_none() && self.is_small(b) {
                        self.fuse_small_ahead(plan, (at, offsets), &mut ahead)?;
                    }
                    let fused = match ahead[b].take() {
                        Some(f) => f,
                        None => self.fuse_block(b, entry.dtype, offset)?,
                    };
                    streamed.probe[b] = fused.deviation;
                    streamed.int8[b] = Some(fused.int8);
                    pending_bias[b] = Some(fused.bias);
                }
                Source::FusedBias(b) => {
                    let bias = pending_bias[b].take().ok_or_else(|| {
                        Error::internal(format!("the plan puts `{}` before its weight", entry.name))
                    })?;
                    self.writer.put(&bias, offset)?
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
        (from, offsets): (usize, &[u64]),
        ahead: &mut [Option<Fused>],
    ) -> Result<(), WriteError> {
        let most = 4 * rayon::current_num_threads().max(1);
        let mut batch = Vec::with_capacity(most);
        for (entry, &offset) in plan.entries[from..].iter().zip(&offsets[from..]) {
            match entry.source {
                Source::FusedWeight(b) if !self.is_small(b) => break,
                Source::FusedWeight(b) => batch.push((b, entry.dtype, offset)),
                _ => {}
            }
            if batch.len() == most {
                break;
            }
        }
        let fused: Vec<Fused> = batch
            .par_iter()
            .map(|&(b, dtype, offset)| self.fuse_block(b, dtype, offset))
            .collect::<Result<_, _>>()?;
        for ((b, ..), f) in batch.into_iter().zip(fused) {
            ahead[b] = Some(f);
        }
        Ok(())
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

    /// Fuses block `b` (its weight at `offset` in the file); returns its bias bytes, probe
    /// deviation and INT8 pass one.
    ///
    /// Every chunk in parallel, each written where it goes by the thread that fused it.
    /// INT8 pass two runs ahead on each chunk at the block's max|w| so far (a max over the
    /// chunks done, in whatever order they finish): right for every chunk fused after the
    /// tensor's max, which then need not be read back from the written file.
    fn fuse_block(&self, b: usize, dtype: Dtype, offset: u64) -> Result<Fused, WriteError> {
        let block = &self.detection.blocks[b];
        let probe = self.probe_seed.map(|seed| probe_input(block, b, seed));
        // Bits of a non-negative f64 order as its values (NaN above all; `max_abs` is NaN
        // only for a weight that is, which the fusion refuses).
        let max_so_far = AtomicU64::new(0);
        let chunks: Vec<_> = block
            .row_chunks(FUSE_CHUNK)
            .into_par_iter()
            .map(|rows| {
                let at = (dtype, probe.as_ref());
                let (c, mut s) = self.fuse_and_put(b, rows.clone(), at, offset)?;
                let max = s.max_abs();
                let seen = max_so_far.fetch_max(max.to_bits(), Ordering::Relaxed);
                s.speculate(dtype, &c.weight, rows, max.max(f64::from_bits(seen)));
                recycle(c.weight);
                Ok::<_, WriteError>((c.bias, c.deviation, s))
            })
            .collect::<Result<_, _>>()?;
        let mut fused = Fused {
            bias: Vec::with_capacity(block.out_channels * dtype_bytes(dtype)),
            deviation: Deviation::default(),
            int8: ChannelStats::new(block.row_len(), 0),
        };
        for (bias, dev, s) in chunks {
            fused.int8 = fused.int8.merge(s);
            fused.deviation = fused.deviation.merge(dev);
            fused.bias.extend(bias);
        }
        Ok(fused)
    }

    /// Rows `rows` of block `b` fused into this thread's buffer and written at their place
    /// in the weight at `offset`, with INT8 pass one on them while they are in cache.
    fn fuse_and_put(
        &self,
        b: usize,
        rows: std::ops::Range<usize>,
        (dtype, probe): (Dtype, Option<&Input>),
        offset: u64,
    ) -> Result<(FusedRows, ChannelStats), WriteError> {
        let block = &self.detection.blocks[b];
        let row_bytes = (block.row_len() * dtype_bytes(dtype)) as u64;
        let out = OUT.with(|o| std::mem::take(&mut *o.borrow_mut()));
        let c = fuse_chunk(self.ckpt, block, rows.clone(), (dtype, probe), out)?;
        if c.weight.len() as u64 != rows.len() as u64 * row_bytes {
            return Err(Error::internal(format!(
                "block `{}`: rows {rows:?} fused to {} bytes, not {}",
                block.name,
                c.weight.len(),
                rows.len() as u64 * row_bytes
            ))
            .into());
        }
        self.writer
            .put(&c.weight, offset + rows.start as u64 * row_bytes)?;
        let mut s = ChannelStats::new(block.row_len(), rows.start);
        s.push_bytes(dtype, &c.weight);
        Ok((c, s))
    }
}
