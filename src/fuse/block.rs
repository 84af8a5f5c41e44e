//! Fusing one block, a chunk of output channels at a time, straight from the tensor source's
//! bytes: its values loaded, its branches composed, the one fusion routine run. Every writer
//! (and inspect, and the fuzzer) fuses through `fuse_chunk` / [`fuse_block_rows`].

use std::ops::Range;

use safetensors::Dtype;

use crate::Error;
use crate::block::values::ChannelValues;
use crate::block::{Block, BlockError, Branch, Op, kernel_hw};
use crate::checkpoint::Checkpoint;
use crate::conv::Input;
use crate::dtype::dtype_bytes;
use crate::fuse::compose::{Affine, compose_branch};
use crate::fuse::rows::{FuseJob, FusedRows, Grid, Kernel, RowError, Term, fuse_rows};

thread_local! {
    /// Each fusing thread's buffers for the branch weights it reads.
    static RAW: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Weights fused at a time by one thread when converting: small enough that the bytes just
/// read are still in the core's cache when they are decoded (64 Ki elements, 256 KB of F32).
pub const FUSE_CHUNK: usize = 1 << 16;

/// The probe input of block `b` (its own kh×kw input, stream `b` of `seed`): each row of the
/// fused kernel meets it at the centre output exactly once.
pub fn probe_input(block: &Block, b: usize, seed: u64) -> Input {
    let c = block.in_channels().unwrap_or(block.in_per_group);
    let (kh, kw) = block.kernel;
    Input::random(1, c, kh, kw, seed, b as u64)
}

/// Fuses output channels `rows` of `block` straight from the file's bytes, encoded in `dtype`
/// into `out`, with the probe deviation of the rows as written.
pub(crate) fn fuse_chunk(
    ckpt: &Checkpoint,
    block: &Block,
    rows: Range<usize>,
    (dtype, probe): (Dtype, Option<&Input>),
    out: Vec<u8>,
) -> Result<FusedRows, Error> {
    let block_err = |e| Error::block(ckpt, e);
    let values = ChannelValues::load(ckpt, block, rows.clone()).map_err(block_err)?;
    let (affines, post) = values.affines(block).map_err(block_err)?;
    let inputs = values.input_affines(block).map_err(block_err)?;
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
            composed.push(compose_branch(&values, block, b, raw).map_err(block_err)?);
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
        let fused =
            fuse_rows(out, &job).map_err(|e| row_error(ckpt, block, rows.start, dtype, e))?;
        let weight = block.rows_to_stored(fused.weight, &rows, dtype_bytes(dtype));
        Ok(FusedRows {
            weight: weight.map_err(block_err)?,
            ..fused
        })
    })
}

/// Fuses output channels `rows` of `block` on their own, as the converter does chunk by chunk
/// (for callers outside the write pipeline: the fuzzer, tools).
pub fn fuse_block_rows(
    ckpt: &Checkpoint,
    block: &Block,
    rows: Range<usize>,
    dtype: Dtype,
    probe: Option<&Input>,
) -> Result<FusedRows, Error> {
    fuse_chunk(ckpt, block, rows, (dtype, probe), Vec::new())
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
    if block.out_axis != 0 {
        let stored = std::mem::take(buf);
        *buf = (block.rows_from_stored(stored, &rows, dtype_bytes(t.dtype)))
            .map_err(|e| Error::block(ckpt, e))?;
    }
    Ok((t.dtype, kernel_hw(t)))
}

/// The fusion routine's view of a branch's source.
fn kernel_of<'a>(
    branch: &Branch,
    raw: &'a [u8],
    weights: Option<(Dtype, (usize, usize))>,
    input: Option<&'a Affine>,
) -> Kernel<'a> {
    match (branch.source(), weights) {
        (Op::Conv { dilation, .. }, Some((dtype, side))) => Kernel::Weights {
            dtype,
            bytes: raw,
            side,
            dilation: *dilation,
            input,
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
