//! The one fusion routine, [`fuse_rows`]: every branch's kernel placed on the block's kh×kw
//! [`Grid`] (centred, dilated), scaled by α, summed, β summed, rounded once to the output
//! dtype, and probed as written. Flat slices and a row at a time: the hot loop.

use std::ops::Range;

use safetensors::Dtype;

use crate::block::Block;
use crate::block::values::first_non_finite;
use crate::conv::Input;
use crate::deviation::Deviation;
use crate::dtype::{decode_into, dtype_bytes, encode};
use crate::fuse::compose::Affine;

/// A branch's source as the fusion routine sees it, for a range of rows.
#[derive(Debug, Clone, Copy)]
pub enum Kernel<'a> {
    /// Conv weights `[rows, in/groups, kh, kw]` as raw bytes of `dtype`.
    Weights {
        /// Their dtype.
        dtype: Dtype,
        /// The rows' bytes.
        bytes: &'a [u8],
        /// Kernel `(kh, kw)`.
        side: (usize, usize),
        /// Spacing between taps.
        dilation: usize,
        /// A BN on the input, an affine per input channel: each input channel's taps are
        /// scaled, and the weights times the shifts go to the bias.
        input: Option<&'a Affine>,
    },
    /// Kernels already in f64 (a composed sequence), `[rows, in/groups, side, side]`.
    Values {
        /// The rows' values.
        values: &'a [f64],
        /// Kernel side.
        side: usize,
    },
    /// Output channel o reads input channel `o mod (in/groups)` of its group at the centre.
    Identity,
    /// Output channel o averages input channel `o mod (in/groups)` over `side`×`side`.
    AvgPool {
        /// Window side.
        side: usize,
    },
}

/// One branch's share of a range of rows: `scale·kernel`, plus `shift` to the bias.
#[derive(Debug, Clone)]
pub struct Term<'a> {
    /// Where the kernel comes from.
    pub kernel: Kernel<'a>,
    /// α per row.
    pub scale: Vec<f64>,
    /// β per row.
    pub shift: Vec<f64>,
}

/// The block's kernel grid: `in/groups` channels of `kh`×`kw`, `out_per_group` rows a group.
/// Every branch's kernel is centred on it, which is exact when both differ in each direction
/// by an even number (both odd: [`crate::block::fused_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    /// Input channels per group.
    pub in_per_group: usize,
    /// Kernel `(kh, kw)`.
    pub k: (usize, usize),
    /// Output channels per group.
    pub out_per_group: usize,
}

impl Grid {
    /// The grid of `block`.
    pub fn of(block: &Block) -> Grid {
        Grid {
            in_per_group: block.in_per_group,
            k: block.kernel,
            out_per_group: block.out_per_group(),
        }
    }

    /// Weights per row.
    pub fn row_len(&self) -> usize {
        self.in_per_group * self.taps()
    }

    /// Taps per input channel: `kh·kw`.
    fn taps(&self) -> usize {
        self.k.0 * self.k.1
    }

    /// The centre tap's offset within one input channel.
    fn centre(&self) -> usize {
        (self.k.0 / 2) * self.k.1 + self.k.1 / 2
    }

    /// Where tap (y, x) of a `kh`×`kw` kernel with `dilation` lands: its offset within one
    /// input channel of the grid, the kernel centred.
    #[inline(always)]
    fn tap(&self, (kh, kw): (usize, usize), dilation: usize, y: usize, x: usize) -> usize {
        let pad_y = (self.k.0 - ((kh - 1) * dilation + 1)) / 2;
        let pad_x = (self.k.1 - ((kw - 1) * dilation + 1)) / 2;
        (pad_y + y * dilation) * self.k.1 + pad_x + x * dilation
    }

    /// `Σ` over the taps of row `w` (`[in/groups, kh, kw]`) of `f(tap in grid, weight)`.
    #[inline(always)]
    fn each_tap(
        &self,
        w: &[f64],
        (kh, kw): (usize, usize),
        dilation: usize,
        mut f: impl FnMut(usize, f64),
    ) {
        let kk = self.taps();
        if (kh, kw) == self.k {
            w.iter().enumerate().for_each(|(i, &v)| f(i, v));
            return;
        }
        if (kh, kw) == (1, 1) {
            // One tap per input channel, at the centre: the common 1×1 branch, kept a
            // straight loop.
            let centre = self.centre();
            w.iter()
                .enumerate()
                .for_each(|(i, &v)| f(i * kk + centre, v));
            return;
        }
        for i in 0..self.in_per_group {
            for y in 0..kh {
                for x in 0..kw {
                    let v = w[(i * kh + y) * kw + x];
                    f(i * kk + self.tap((kh, kw), dilation, y, x), v);
                }
            }
        }
    }

    /// The taps of input channel `ch` that a `side`-wide window at the centre covers.
    fn window(&self, ch: usize, side: usize) -> impl Iterator<Item = usize> + '_ {
        let base = ch * self.taps();
        (0..side * side).map(move |t| base + self.tap((side, side), 1, t / side, t % side))
    }
}

/// Fused rows, encoded as they will be written.
#[derive(Debug, Clone, Default)]
pub struct FusedRows {
    /// `[rows, in/groups, kh, kw]` in the output dtype.
    pub weight: Vec<u8>,
    /// `[rows]` in the output dtype.
    pub bias: Vec<u8>,
    /// Fused-as-written vs unfused on the probe input.
    pub deviation: Deviation,
}

/// What stops a row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowError {
    /// A weight of term `term` is NaN or infinite at element `index` of the rows.
    NonFinite {
        /// Index into the terms.
        term: usize,
        /// Element index within the rows' weight.
        index: usize,
        /// The value.
        value: f64,
    },
    /// A fused value overflows f64 or the output dtype.
    Overflow {
        /// Whether it is the bias (else the weight).
        bias: bool,
        /// Element index within the rows.
        index: usize,
        /// The value.
        value: f64,
    },
}

/// Scratch space of one row, reused across rows.
#[derive(Default)]
struct RowScratch {
    fused: Vec<f64>,
    w: Vec<f64>,
    written: Vec<f64>,
    bias_written: Vec<f64>,
}

/// What [`fuse_rows`] fuses: output channels `rows` of a block on `grid`, `Σ term.scale·kernel`
/// placed on the grid, bias `Σ term.shift (+ post_shift)`, written in `dtype`, probed on
/// `probe` (a `1 × C × kh × kw` input; the deviation stays 0 without one).
#[derive(Clone, Copy)]
pub struct FuseJob<'a> {
    /// The output channels.
    pub rows: &'a Range<usize>,
    /// The block's kernel grid.
    pub grid: Grid,
    /// Each branch's share of the rows.
    pub terms: &'a [Term<'a>],
    /// The post-ops' own shift per row, if the block has post-ops.
    pub post_shift: Option<&'a [f64]>,
    /// The output dtype.
    pub dtype: Dtype,
    /// The probe input.
    pub probe: Option<&'a Input>,
}

/// Fuses `job`'s rows into `out` (cleared first; pass a reused buffer to save fresh pages),
/// encoded as they will be written, with the probe deviation of the rows as written. The one
/// fusion routine: the converter, the tests and the fuzzer all fuse through it.
pub fn fuse_rows(out: Vec<u8>, job: &FuseJob) -> Result<FusedRows, RowError> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { fuse_rows_avx2(out, job) };
    }
    fuse_rows_any(out, job)
}

/// [`fuse_rows`] compiled for AVX2: the same code, with 4-wide f64 vectors in the inner loops.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fuse_rows_avx2(out: Vec<u8>, job: &FuseJob) -> Result<FusedRows, RowError> {
    fuse_rows_any(out, job)
}

#[inline(always)]
fn fuse_rows_any(weight: Vec<u8>, job: &FuseJob) -> Result<FusedRows, RowError> {
    let FuseJob {
        rows, grid, dtype, ..
    } = *job;
    let depth = grid.row_len();
    let mut out = FusedRows {
        weight,
        ..FusedRows::default()
    };
    let need = rows.len() * depth * dtype_bytes(dtype);
    out.weight.clear();
    if out.weight.capacity() < need {
        // A fresh buffer, not `reserve`: growing a recycled one copies its old capacity's
        // bytes (stale data) to the new allocation.
        out.weight = Vec::with_capacity(need);
    }
    // Taken out of the thread-local and put back, not used inside `with`: a closure there
    // is compiled without this function's AVX2, and the row loop ran scalar.
    let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    // Its contents do not matter: the first term of a row overwrites it or zeroes it.
    scratch.fused.resize(depth, 0.0);
    let done = fuse_each_row(&mut out, &mut scratch, job);
    SCRATCH.with(|s| *s.borrow_mut() = scratch);
    done.map(|()| out)
}

thread_local! {
    /// Each fusing thread's row scratch, kept across chunks (a fresh one per chunk cost a
    /// zeroed allocation of a row for every chunk).
    static SCRATCH: std::cell::RefCell<RowScratch> = std::cell::RefCell::new(RowScratch::default());
}

/// The row loop of [`fuse_rows`]: each row of `job` fused, encoded into `out`, probed.
#[inline(always)]
fn fuse_each_row(
    out: &mut FusedRows,
    scratch: &mut RowScratch,
    job: &FuseJob,
) -> Result<(), RowError> {
    let FuseJob {
        rows,
        grid,
        terms,
        post_shift,
        dtype,
        probe,
    } = *job;
    let depth = grid.row_len();
    for (r, o) in rows.clone().enumerate() {
        // The input group this row reads, `[in/groups, kh, kw]`: at the centre output, grid
        // tap (i, y, x) meets exactly x[g·in/groups + i, y, x].
        let g = o / grid.out_per_group;
        let patch = probe.map(|x| &x.data[g * depth..(g + 1) * depth]);
        let (mut unfused, mut bias) = fuse_row(scratch, (r, o), grid, terms, patch)?;
        if let Some(p) = post_shift {
            bias += p[r];
            unfused += p[r];
        }
        let fast = dtype == Dtype::F32 && encode_row_f32(out, &scratch.fused, bias);
        if !fast {
            encode_row(out, &scratch.fused, bias, r, dtype)?;
        }
        if let Some(patch) = patch {
            let dev = if fast {
                probe_row_f32(&scratch.fused, bias, patch, unfused)
            } else {
                probe_row(scratch, out, dtype, patch, unfused)
            };
            out.deviation = out.deviation.merge(dev);
        }
    }
    Ok(())
}

/// Sums the terms' row `r` (output channel `o`) into `scratch.fused`; returns the unfused
/// output at the probe's centre (0 without a probe) and the bias before post-ops.
#[inline(always)]
fn fuse_row(
    scratch: &mut RowScratch,
    (r, o): (usize, usize),
    grid: Grid,
    terms: &[Term],
    patch: Option<&[f64]>,
) -> Result<(f64, f64), RowError> {
    // `fused` still holds the previous row: the first full-size term overwrites it (saving a
    // pass of zeros over every weight), anything else starts from zero.
    let mut fresh = true;
    let (mut unfused, mut bias) = (0.0, 0.0);
    for (ti, term) in terms.iter().enumerate() {
        let (a, b) = (term.scale[r], term.shift[r]);
        bias += b;
        let y = match term.kernel {
            Kernel::Weights {
                dtype,
                bytes,
                side,
                dilation,
                input,
            } => {
                let per_row = grid.in_per_group * side.0 * side.1;
                let row_bytes = per_row * dtype_bytes(dtype);
                let raw = &bytes[r * row_bytes..(r + 1) * row_bytes];
                decode_into(dtype, raw, &mut scratch.w);
                finite_row(&scratch.w, ti, r * per_row)?;
                let through = fold_input(&mut scratch.w, input);
                bias += a * through;
                let first = std::mem::take(&mut fresh);
                let w = &scratch.w;
                add_weights(
                    grid,
                    &mut scratch.fused,
                    w,
                    (side, dilation),
                    a,
                    first,
                    patch,
                ) + through
            }
            Kernel::Values { values, side } => {
                let per_row = grid.in_per_group * side * side;
                let w = &values[r * per_row..(r + 1) * per_row];
                finite_row(w, ti, r * per_row)?;
                let first = std::mem::take(&mut fresh);
                add_weights(
                    grid,
                    &mut scratch.fused,
                    w,
                    ((side, side), 1),
                    a,
                    first,
                    patch,
                )
            }
            Kernel::Identity => {
                let first = std::mem::take(&mut fresh);
                add_window(grid, &mut scratch.fused, (o, 1), a, first, patch)
            }
            Kernel::AvgPool { side } => {
                let first = std::mem::take(&mut fresh);
                add_window(grid, &mut scratch.fused, (o, side), a, first, patch)
            }
        };
        if patch.is_some() {
            unfused += a * y + b;
        }
    }
    if fresh {
        scratch.fused.fill(0.0);
    }
    debug_assert_eq!(scratch.fused.len(), grid.row_len());
    Ok((unfused, bias))
}

/// An input BN `s·x + t` (1×1 kernels only) folded into row `w`: `w·s` on the weights;
/// returns `w·t`, what it adds to the bias.
#[inline(always)]
fn fold_input(w: &mut [f64], input: Option<&Affine>) -> f64 {
    match input {
        Some(bn) => {
            let through = dot(w, &bn.shift);
            w.iter_mut().zip(&bn.scale).for_each(|(w, s)| *w *= s);
            through
        }
        None => 0.0,
    }
}

/// Adds `a` times the identity (side 1) or a `side`×`side` average of input channel
/// `o mod (in/groups)` to `fused` (from zero if `first`); returns its own output at the centre
/// of `patch` (0 without one).
#[inline(always)]
fn add_window(
    grid: Grid,
    fused: &mut [f64],
    (o, side): (usize, usize),
    a: f64,
    first: bool,
    patch: Option<&[f64]>,
) -> f64 {
    if first {
        fused.fill(0.0);
    }
    let ch = o % grid.in_per_group;
    if side == 1 {
        // The identity: one tap at the centre.
        let at = ch * grid.taps() + grid.centre();
        fused[at] += a;
        return match patch {
            Some(p) => p[at],
            None => 0.0,
        };
    }
    let v = 1.0 / (side * side) as f64;
    grid.window(ch, side).for_each(|at| fused[at] += a * v);
    // A `match`, not `Option::map_or`: see `add_weights`.
    match patch {
        Some(p) => grid.window(ch, side).map(|at| p[at]).sum::<f64>() * v,
        None => 0.0,
    }
}

/// Refuses a row of term `term` holding NaN or ±∞ (its first element is element `start`).
#[inline(always)]
fn finite_row(w: &[f64], term: usize, start: usize) -> Result<(), RowError> {
    match first_non_finite(w) {
        Some(i) => Err(RowError::NonFinite {
            term,
            index: start + i,
            value: w[i],
        }),
        None => Ok(()),
    }
}

/// Adds `a·w` (one row of a `side.0`×`side.1` kernel, taps `dilation` apart) to `fused`, centred
/// (over whatever it holds unless `first`); returns the kernel's own conv at the centre of
/// `patch` (0 without one).
#[inline(always)]
fn add_weights(
    grid: Grid,
    fused: &mut [f64],
    w: &[f64],
    (side, dilation): ((usize, usize), usize),
    a: f64,
    first: bool,
    patch: Option<&[f64]>,
) -> f64 {
    // Plain loops and `match`, not closures through `Option::map_or`: those are compiled
    // outside the AVX2 build of the caller, and the probe's dot product ran scalar.
    if side == grid.k {
        if first {
            fused.iter_mut().zip(w).for_each(|(f, w)| *f = a * w);
        } else {
            fused.iter_mut().zip(w).for_each(|(f, w)| *f += a * w);
        }
        return match patch {
            Some(p) => dot(w, p),
            None => 0.0,
        };
    }
    if first {
        fused.fill(0.0);
    }
    grid.each_tap(w, side, dilation, |at, v| fused[at] += a * v);
    match patch {
        Some(p) => {
            let mut y = 0.0;
            grid.each_tap(w, side, dilation, |at, v| y += v * p[at]);
            y
        }
        None => 0.0,
    }
}

/// Checks row `r`'s fused values and appends them, encoded in `dtype`, to `out`.
#[inline(always)]
fn encode_row(
    out: &mut FusedRows,
    fused: &[f64],
    bias: f64,
    r: usize,
    dtype: Dtype,
) -> Result<(), RowError> {
    let depth = fused.len();
    // A sum of finite terms can still overflow f64 itself; encode only sees inf then.
    if let Some(i) = first_non_finite(fused) {
        return Err(RowError::Overflow {
            bias: false,
            index: r * depth + i,
            value: fused[i],
        });
    }
    let bias_overflow = RowError::Overflow {
        bias: true,
        index: r,
        value: bias,
    };
    if !bias.is_finite() {
        return Err(bias_overflow);
    }
    encode(dtype, fused, &mut out.weight).map_err(|i| RowError::Overflow {
        bias: false,
        index: r * depth + i,
        value: fused[i],
    })?;
    encode(dtype, &[bias], &mut out.bias).map_err(|_| bias_overflow)
}

/// Values of at least this magnitude round to ±∞ in F32 (2^128 − 2^103: half an ulp above
/// `f32::MAX`, where the tie goes to the even infinity).
const F32_OVERFLOW: f64 = 340_282_356_779_733_661_637_539_395_458_142_568_448.0;

/// [`encode_row`] for F32 in one pass over the row, when every value (and the bias) is finite
/// and fits; returns false, having written nothing, otherwise ([`encode_row`] then says what
/// is wrong).
#[inline(always)]
fn encode_row_f32(out: &mut FusedRows, fused: &[f64], bias: f64) -> bool {
    let mut fits = bias.abs() < F32_OVERFLOW;
    // `<` is false for NaN: one compare covers NaN, ±∞ and what overflows F32.
    for v in fused {
        fits &= v.abs() < F32_OVERFLOW;
    }
    if fits {
        crate::dtype::extend_f32(&mut out.weight, fused);
        out.bias.extend((bias as f32).to_le_bytes());
    }
    fits
}

/// [`probe_row`] for a row [`encode_row_f32`] wrote: the values as written are the fused ones
/// rounded to F32, so they are not decoded back from the bytes.
#[inline(always)]
fn probe_row_f32(fused: &[f64], bias: f64, patch: &[f64], unfused: f64) -> Deviation {
    let fused_out = dot_by(fused, patch, |v| f64::from(v as f32)) + f64::from(bias as f32);
    Deviation::of((fused_out - unfused).abs(), unfused.abs())
}

/// The last row of `out` as written, run on `patch` at the centre, against `unfused`.
#[inline(always)]
fn probe_row(
    scratch: &mut RowScratch,
    out: &FusedRows,
    dtype: Dtype,
    patch: &[f64],
    unfused: f64,
) -> Deviation {
    let width = dtype_bytes(dtype);
    let row_bytes = scratch.fused.len() * width;
    let weight = &out.weight[out.weight.len() - row_bytes..];
    decode_into(dtype, weight, &mut scratch.written);
    decode_into(
        dtype,
        &out.bias[out.bias.len() - width..],
        &mut scratch.bias_written,
    );
    let fused_out = dot(&scratch.written, patch) + scratch.bias_written[0];
    Deviation::of((fused_out - unfused).abs(), unfused.abs())
}

/// `Σ a[i]·b[i]`, in four interleaved sums so the adds do not wait on each other.
#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    dot_by(a, b, |v| v)
}

/// [`dot`] of `f(a[i])` and `b[i]`, summed in the same order.
#[inline(always)]
fn dot_by(a: &[f64], b: &[f64], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut a4 = a.chunks_exact(4);
    let mut b4 = b.chunks_exact(4);
    for (a, b) in (&mut a4).zip(&mut b4) {
        for j in 0..4 {
            acc[j] += f(a[j]) * b[j];
        }
    }
    let mut tail = 0.0;
    for (a, b) in a4.remainder().iter().zip(b4.remainder()) {
        tail += f(*a) * b;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `y[o, oy, ox] = Σ w[o, i, ky, kx]·x[i, oy + ky − kh/2, ox + kx − kw/2]`, zero outside:
    /// a same-padded conv straight from its definition (one group).
    fn direct(x: &Input, w: &[f64], out: usize, (kh, kw): (usize, usize)) -> Vec<f64> {
        let (c, h, wd) = (x.c, x.h as isize, x.w as isize);
        let mut y = vec![0.0; out * x.h * x.w];
        for o in 0..out {
            for oy in 0..h {
                for ox in 0..wd {
                    let mut acc = 0.0;
                    for i in 0..c {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = oy + ky as isize - (kh / 2) as isize;
                                let ix = ox + kx as isize - (kw / 2) as isize;
                                if (0..h).contains(&iy) && (0..wd).contains(&ix) {
                                    let v = x.data[(i * x.h + iy as usize) * x.w + ix as usize];
                                    acc += w[((o * c + i) * kh + ky) * kw + kx] * v;
                                }
                            }
                        }
                    }
                    y[(o * x.h + oy as usize) * x.w + ox as usize] = acc;
                }
            }
        }
        y
    }

    fn bytes(w: &[f64]) -> Vec<u8> {
        w.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// docTR's (3, 5) layer: 3×5 + 3×1 + 1×5 kernels and an identity, each scaled per
    /// channel, fused on the 3×5 grid, equal the branches run one by one at every position of
    /// a 4×7 input (borders included), where a kernel placed off centre or on a square grid
    /// would not.
    #[test]
    fn kh_by_kw_branches_centre_on_a_kh_by_kw_grid() {
        let c = 2;
        let weights = |n: usize, salt: usize| -> Vec<f64> {
            (0..n)
                .map(|i| (((i + salt) * 37 % 23) as f64 - 11.0) / 7.0)
                .collect()
        };
        let shapes = [(3, 5), (3, 1), (1, 5)];
        let ws: Vec<Vec<f64>> = (shapes.iter().enumerate())
            .map(|(s, &(kh, kw))| weights(c * c * kh * kw, s))
            .collect();
        let raw: Vec<Vec<u8>> = ws.iter().map(|w| bytes(w)).collect();
        let scale = |s: f64| vec![s, -2.0 * s];
        let mut terms: Vec<Term> = (shapes.iter().zip(&raw).enumerate())
            .map(|(s, (&side, b))| Term {
                kernel: Kernel::Weights {
                    dtype: Dtype::F64,
                    bytes: b,
                    side,
                    dilation: 1,
                    input: None,
                },
                scale: scale(0.5 + s as f64),
                shift: vec![0.25, -1.0],
            })
            .collect();
        terms.push(Term {
            kernel: Kernel::Identity,
            scale: scale(3.0),
            shift: vec![0.0, 0.5],
        });
        let grid = Grid {
            in_per_group: c,
            k: (3, 5),
            out_per_group: c,
        };
        let job = FuseJob {
            rows: &(0..c),
            grid,
            terms: &terms,
            post_shift: None,
            dtype: Dtype::F64,
            probe: None,
        };
        let fused = fuse_rows(Vec::new(), &job).expect("finite");
        let fw: Vec<f64> = fused
            .weight
            .chunks(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let fb: Vec<f64> = fused
            .bias
            .chunks(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(fw.len(), c * c * 15);
        let x = Input::random(1, c, 4, 7, 3, 0);
        let mut want = vec![0.0; c * 28];
        let identity: Vec<f64> = (0..c * c)
            .map(|i| f64::from(u8::from(i / c == i % c)))
            .collect();
        let branches = ws
            .iter()
            .map(Vec::as_slice)
            .zip(shapes)
            .chain([(&identity[..], (1, 1))]);
        for ((w, k), t) in branches.zip(&terms) {
            for (o, y) in direct(&x, w, c, k).chunks(28).enumerate() {
                for (acc, v) in want[o * 28..(o + 1) * 28].iter_mut().zip(y) {
                    *acc += t.scale[o] * v + t.shift[o];
                }
            }
        }
        let got = direct(&x, &fw, c, (3, 5));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let g = g + fb[i / 28];
            assert!(
                (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                "output {i}: {g} vs {w}"
            );
        }
    }
}
