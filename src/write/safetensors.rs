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

/// One piece of a block's fused weight, written: what the block still needs of it (its part
/// of the bias) and what the report learns.
struct Piece {
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

/// One chunk of rows of a block's fused weight, and where in the file the weight starts.
struct Chunk {
    block: usize,
    rows: std::ops::Range<usize>,
    dtype: Dtype,
    offset: u64,
}

/// The fusing side of [`write_deploy`]: makes each piece of the file and puts it in place.
struct Producer<'a> {
    ckpt: &'a Checkpoint,
    detection: &'a Detection,
    probe_seed: Option<u64>,
    writer: Writer<'a>,
}

impl Producer<'_> {
    /// Every chunk of every block fused in one parallel pass, in file order split among the
    /// threads (no thread waits at the end of a block: a model of 168 small blocks is one
    /// pass, not 168); the tensors copied through, one after another, beside it. Each block's
    /// bias, gathered from its chunks, is written last.
    fn run(&self, plan: &Plan, offsets: &[u64], cancel: &Cancel) -> Result<Streamed, WriteError> {
        let blocks = &self.detection.blocks;
        let mut chunks = Vec::new();
        let mut copies = Vec::new();
        let mut bias_at = vec![None; blocks.len()];
        for (entry, &offset) in plan.entries.iter().zip(offsets) {
            match entry.source {
                Source::Copy(i) => copies.push((i, entry.dtype, offset)),
                Source::FusedWeight(b) => {
                    chunks.extend((blocks[b].row_chunks(FUSE_CHUNK).into_iter()).map(|rows| {
                        Chunk {
                            block: b,
                            rows,
                            dtype: entry.dtype,
                            offset,
                        }
                    }))
                }
                Source::FusedBias(b) => bias_at[b] = Some(offset),
            }
        }
        let probes: Vec<Option<Input>> = match self.probe_seed {
            Some(seed) => (blocks.par_iter().enumerate())
                .map(|(b, block)| Some(probe_input(block, b, seed)))
                .collect(),
            None => blocks.iter().map(|_| None).collect(),
        };
        // Bits of a non-negative f64 order as its values (NaN above all; `max_abs` is NaN
        // only for a weight that is, which the fusion refuses).
        let max_so_far: Vec<AtomicU64> = blocks.iter().map(|_| AtomicU64::new(0)).collect();
        let (copied, pieces) = rayon::join(
            || self.copy_all(&copies, cancel),
            || {
                (chunks.par_iter())
                    .map(|c| {
                        cancel.check()?;
                        self.fuse_piece(c, probes[c.block].as_ref(), &max_so_far[c.block])
                    })
                    .collect::<Result<Vec<_>, _>>()
            },
        );
        copied?;
        let mut probe = vec![Deviation::default(); blocks.len()];
        let mut int8: Vec<ChannelStats> = (blocks.iter())
            .map(|b| ChannelStats::new(b.row_len(), 0))
            .collect();
        let mut bias = vec![Vec::new(); blocks.len()];
        for (c, piece) in chunks.iter().zip(pieces?) {
            let b = c.block;
            int8[b] = std::mem::replace(&mut int8[b], ChannelStats::new(0, 0)).merge(piece.int8);
            probe[b] = probe[b].merge(piece.deviation);
            bias[b].extend(piece.bias);
        }
        for (b, at) in bias_at.iter().enumerate() {
            let at = at.ok_or_else(|| {
                Error::internal(format!("the plan has no bias for `{}`", blocks[b].name))
            })?;
            self.writer.put(&bias[b], at)?;
        }
        Ok(Streamed {
            probe,
            int8: int8.into_iter().map(Some).collect(),
        })
    }

    /// The tensors that go through unfused, in file order: copied by the kernel, or cast.
    fn copy_all(&self, copies: &[(usize, Dtype, u64)], cancel: &Cancel) -> Result<(), WriteError> {
        for &(i, dtype, offset) in copies {
            cancel.check()?;
            match self.ckpt.tensors()[i].dtype == dtype {
                true => self.writer.copy(self.ckpt, i, offset)?,
                false => self.writer.put(&self.cast(i, dtype)?, offset)?,
            }
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

    /// Chunk `c` fused and written, with INT8 pass one on it and pass two ahead at its
    /// block's max|w| so far (a max over the chunks done, in whatever order they finish):
    /// right for every chunk fused after the tensor's max, which then need not be read back
    /// from the written file.
    fn fuse_piece(
        &self,
        c: &Chunk,
        probe: Option<&Input>,
        max_so_far: &AtomicU64,
    ) -> Result<Piece, WriteError> {
        let (fused, mut s) =
            self.fuse_and_put(c.block, c.rows.clone(), (c.dtype, probe), c.offset)?;
        let max = s.max_abs();
        let seen = max_so_far.fetch_max(max.to_bits(), Ordering::Relaxed);
        s.speculate(
            c.dtype,
            &fused.weight,
            c.rows.clone(),
            max.max(f64::from_bits(seen)),
        );
        recycle(fused.weight);
        Ok(Piece {
            bias: fused.bias,
            deviation: fused.deviation,
            int8: s,
        })
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
