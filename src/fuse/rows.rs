//! The one fusion routine, [`fuse_rows`]: every branch's kernel placed on the block's kh×kw
//! [`Grid`] (centred, dilated), scaled by α, summed, β summed, rounded once to the output
//! dtype, and probed as written. Flat slices and a row at a time: the hot loop.

use std::mem::MaybeUninit;
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

    /// `Σ` over the taps of `w` (whole input channels of a row, `[channels, kh, kw]`) of
    /// `f(tap in the same channels of the grid, weight)`.
    #[inline(always)]
    fn each_tap(
        &self,
        w: &[f64],
        (kh, kw): (usize, usize),
        dilation: usize,
        mut f: impl FnMut(usize, f64),
    ) {
        let kk = self.taps();
        // A kernel with no taps has no weights either (none to place).
        for i in 0..w.len().checked_div(kh * kw).unwrap_or(0) {
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

/// Weights of a row fused at a time: a tile of whole input channels whose f64 sums stay in the
/// core's L1 cache from being summed to being encoded (a whole row of B3's widest blocks is
/// 23,040 weights, 184 KB of f64, re-read from L2 by every pass).
const TILE: usize = 1024;

/// A dot product summed across a row's tiles exactly as one pass over the whole row sums it:
/// four lanes by element index mod 4 over the whole quads, then the last elements in order
/// (every tile but the last starts and ends on a whole quad, see [`Grid::tiles`]).
#[derive(Debug, Clone, Copy, Default)]
struct Lanes {
    acc: [f64; 4],
    tail: f64,
}

impl Lanes {
    /// `Σ a[i]·b[i]` over one tile added.
    #[inline(always)]
    fn dot(&mut self, a: &[f64], b: &[f64]) {
        let mut a4 = a.chunks_exact(4);
        let mut b4 = b.chunks_exact(4);
        for (a, b) in (&mut a4).zip(&mut b4) {
            for j in 0..4 {
                self.acc[j] += a[j] * b[j];
            }
        }
        for (a, b) in a4.remainder().iter().zip(b4.remainder()) {
            self.tail += a * b;
        }
    }

    /// The sum.
    #[inline(always)]
    fn total(&self) -> f64 {
        (self.acc[0] + self.acc[1]) + (self.acc[2] + self.acc[3]) + self.tail
    }
}

impl Grid {
    /// The input channels of each tile of a row: [`TILE`] weights or so, a multiple of 4
    /// channels (so of 4 weights) in every tile but the last.
    fn tiles(&self) -> impl Iterator<Item = Range<usize>> + use<> {
        let step = (TILE / self.taps().max(1)).max(4) / 4 * 4;
        let n = self.in_per_group;
        (0..n).step_by(step).map(move |c| c..(c + step).min(n))
    }
}

/// What one term has summed of a row so far, across its tiles.
#[derive(Debug, Clone, Copy, Default)]
struct TermSums {
    /// Its kernel's own output at the probe's centre.
    probe: Lanes,
    /// An input BN's shifts through its weights (`w·t`), for the bias.
    through: Lanes,
}

/// Scratch space of one row, reused across rows.
#[derive(Default)]
struct RowScratch {
    /// The tile's fused values.
    fused: Vec<f64>,
    /// A term's weights of the tile, decoded.
    w: Vec<f64>,
    /// The tile as written, decoded back (dtypes without a fused path).
    written: Vec<f64>,
    /// Each term's sums over the row.
    sums: Vec<TermSums>,
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
    let mut out = FusedRows {
        weight,
        ..FusedRows::default()
    };
    let need = rows.len() * grid.row_len() * dtype_bytes(dtype);
    out.weight.clear();
    if out.weight.capacity() < need {
        // A fresh buffer, not `reserve`: growing a recycled one copies its old capacity's
        // bytes (stale data) to the new allocation.
        out.weight = Vec::with_capacity(need);
    }
    // Taken out of the thread-local and put back, not used inside `with`: a closure there
    // is compiled without this function's AVX2, and the row loop ran scalar.
    let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let done = fuse_each_row(&mut out, &mut scratch, job);
    SCRATCH.with(|s| *s.borrow_mut() = scratch);
    done.map(|()| out)
}

thread_local! {
    /// Each fusing thread's row scratch, kept across chunks (a fresh one per chunk cost a
    /// zeroed allocation of a row for every chunk).
    static SCRATCH: std::cell::RefCell<RowScratch> = std::cell::RefCell::new(RowScratch::default());
}

/// The row loop of [`fuse_rows`]: each row of `job` fused a tile at a time, encoded into
/// `out`, probed.
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
        scratch.sums.clear();
        scratch.sums.resize(terms.len(), TermSums::default());
        let mut written = Lanes::default();
        for tile in grid.tiles() {
            let taps = tile.start * grid.taps()..tile.end * grid.taps();
            let patch = patch.map(|p| &p[taps.clone()]);
            fuse_tile(scratch, (r, o), grid, terms, &tile, patch)?;
            let at = r * depth + taps.start;
            encode_tile(out, scratch, (at, dtype), patch, &mut written)?;
        }
        let (mut unfused, mut bias) = (0.0, 0.0);
        for (term, sums) in terms.iter().zip(&scratch.sums) {
            let (a, b) = (term.scale[r], term.shift[r]);
            let through = sums.through.total();
            bias += b;
            if matches!(term.kernel, Kernel::Weights { .. }) {
                bias += a * through;
            }
            unfused += a * (sums.probe.total() + through) + b;
        }
        if let Some(p) = post_shift {
            bias += p[r];
            unfused += p[r];
        }
        let bias = encode_bias(out, scratch, bias, r, dtype)?;
        if patch.is_some() {
            let fused_out = written.total() + bias;
            let dev = Deviation::of((fused_out - unfused).abs(), unfused.abs());
            out.deviation = out.deviation.merge(dev);
        }
    }
    Ok(())
}

/// Sums the terms' row `r` (output channel `o`) over input channels `tile` into
/// `scratch.fused`, each term's probe and input-BN sums into `scratch.sums`.
#[inline(always)]
fn fuse_tile(
    scratch: &mut RowScratch,
    (r, o): (usize, usize),
    grid: Grid,
    terms: &[Term],
    tile: &Range<usize>,
    patch: Option<&[f64]>,
) -> Result<(), RowError> {
    let RowScratch { fused, w, sums, .. } = scratch;
    fused.resize(tile.len() * grid.taps(), 0.0);
    // `fused` still holds the previous tile: the first full-size term overwrites it (saving
    // a pass of zeros over every weight), anything else starts from zero.
    let mut fresh = true;
    for (ti, (term, sums)) in terms.iter().zip(sums.iter_mut()).enumerate() {
        let a = term.scale[r];
        let first = std::mem::take(&mut fresh);
        let probe = &mut sums.probe;
        match term.kernel {
            Kernel::Weights {
                dtype,
                bytes,
                side,
                dilation,
                input,
            } => {
                let taps = side.0 * side.1;
                let row = grid.in_per_group * taps;
                let es = dtype_bytes(dtype);
                let raw =
                    &bytes[(r * row + tile.start * taps) * es..(r * row + tile.end * taps) * es];
                // The common branch, a full-size F32 kernel, in one pass; a tile it refuses (a
                // weight not finite) goes the long way, which says where.
                let full = dtype == Dtype::F32 && input.is_none() && side == grid.k;
                if full && scale_f32_tile(fused, raw, a, first, patch, probe) {
                    continue;
                }
                decode_into(dtype, raw, w);
                finite_row(w, ti, r * row + tile.start * taps)?;
                if let Some(bn) = input {
                    fold_input(w, bn, tile, &mut sums.through);
                }
                add_weights(grid, fused, w, (side, dilation), (a, first), patch, probe);
            }
            Kernel::Values { values, side } => {
                let taps = side * side;
                let start = r * grid.in_per_group * taps;
                let w = &values[start + tile.start * taps..start + tile.end * taps];
                finite_row(w, ti, start + tile.start * taps)?;
                add_weights(grid, fused, w, ((side, side), 1), (a, first), patch, probe);
            }
            Kernel::Identity => add_window(grid, fused, (o, 1, tile), (a, first), patch, probe),
            Kernel::AvgPool { side } => {
                add_window(grid, fused, (o, side, tile), (a, first), patch, probe)
            }
        }
    }
    if fresh {
        fused.fill(0.0);
    }
    Ok(())
}

/// An input BN `s·x + t` (1×1 kernels only) folded into the tile `w` of input channels `tile`:
/// `w·s` on the weights; `w·t`, what it adds to the bias, summed into `through`.
#[inline(always)]
fn fold_input(w: &mut [f64], bn: &Affine, tile: &Range<usize>, through: &mut Lanes) {
    through.dot(w, &bn.shift[tile.clone()]);
    w.iter_mut()
        .zip(&bn.scale[tile.clone()])
        .for_each(|(w, s)| *w *= s);
}

/// Adds `a` times the identity (side 1) or a `side`×`side` average of input channel
/// `o mod (in/groups)` to the tile `fused` of input channels `tile` (from zero if `first`), and
/// its own output at the centre of `patch` to `probe`.
#[inline(always)]
fn add_window(
    grid: Grid,
    fused: &mut [f64],
    (o, side, tile): (usize, usize, &Range<usize>),
    (a, first): (f64, bool),
    patch: Option<&[f64]>,
    probe: &mut Lanes,
) {
    if first {
        fused.fill(0.0);
    }
    let ch = o % grid.in_per_group;
    if !tile.contains(&ch) {
        return;
    }
    let ch = ch - tile.start;
    if side == 1 {
        // The identity: one tap at the centre.
        let at = ch * grid.taps() + grid.centre();
        fused[at] += a;
        if let Some(p) = patch {
            probe.tail += p[at];
        }
        return;
    }
    let v = 1.0 / (side * side) as f64;
    grid.window(ch, side).for_each(|at| fused[at] += a * v);
    // A `match`, not `Option::map_or`: see `add_weights`.
    if let Some(p) = patch {
        probe.tail += grid.window(ch, side).map(|at| p[at]).sum::<f64>() * v;
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

/// Adds `a·w` (a tile of a `side.0`×`side.1` kernel, taps `dilation` apart) to the tile
/// `fused`, centred (over whatever it holds unless `first`), and the kernel's own conv at the
/// centre of `patch` to `probe`.
#[inline(always)]
fn add_weights(
    grid: Grid,
    fused: &mut [f64],
    w: &[f64],
    (side, dilation): ((usize, usize), usize),
    (a, first): (f64, bool),
    patch: Option<&[f64]>,
    probe: &mut Lanes,
) {
    // Plain loops and `if let`, not closures through `Option::map_or`: those are compiled
    // outside the AVX2 build of the caller, and the probe's dot product ran scalar.
    if side == grid.k {
        if first {
            fused.iter_mut().zip(w).for_each(|(f, w)| *f = a * w);
        } else {
            fused.iter_mut().zip(w).for_each(|(f, w)| *f += a * w);
        }
        if let Some(p) = patch {
            probe.dot(w, p);
        }
        return;
    }
    if first {
        fused.fill(0.0);
    }
    if side == (1, 1) {
        // The common 1×1 branch: one tap per input channel at the centre, placed and probed in
        // one pass, the probe in four sums by channel (one chained sum waited on each add).
        let (kk, centre) = (grid.taps(), grid.centre());
        // `max(1)`: a grid with no taps has no weights, and `chunks_exact` no zero size.
        let taps = fused.chunks_exact_mut(kk.max(1)).zip(w);
        match patch {
            Some(p) => {
                for (i, ((f, &v), p)) in taps.zip(p.chunks_exact(kk.max(1))).enumerate() {
                    f[centre] += a * v;
                    probe.acc[i % 4] += v * p[centre];
                }
            }
            None => taps.for_each(|(f, &v)| f[centre] += a * v),
        }
        return;
    }
    grid.each_tap(w, side, dilation, |at, v| fused[at] += a * v);
    if let Some(p) = patch {
        grid.each_tap(w, side, dilation, |at, v| probe.tail += v * p[at]);
    }
}

/// Appends the tile `scratch.fused` (its first element is element `at` of the rows) to `out`,
/// encoded in `dtype`, checked, and the tile as written run on `patch` into `written`.
#[inline(always)]
fn encode_tile(
    out: &mut FusedRows,
    scratch: &mut RowScratch,
    (at, dtype): (usize, Dtype),
    patch: Option<&[f64]>,
    written: &mut Lanes,
) -> Result<(), RowError> {
    let fused = &scratch.fused;
    if dtype == Dtype::F32 && round_f32_tile(out, fused, patch, written) {
        return Ok(());
    }
    // A sum of finite terms can still overflow f64 itself; encode only sees inf then.
    let overflow = |i: usize| RowError::Overflow {
        bias: false,
        index: at + i,
        value: fused[i],
    };
    if let Some(i) = first_non_finite(fused) {
        return Err(overflow(i));
    }
    let start = out.weight.len();
    encode(dtype, fused, &mut out.weight).map_err(overflow)?;
    if let Some(p) = patch {
        decode_into(dtype, &out.weight[start..], &mut scratch.written);
        written.dot(&scratch.written, p);
    }
    Ok(())
}

/// Appends row `r`'s bias to `out`, encoded in `dtype`; returns it as written.
#[inline(always)]
fn encode_bias(
    out: &mut FusedRows,
    scratch: &mut RowScratch,
    bias: f64,
    r: usize,
    dtype: Dtype,
) -> Result<f64, RowError> {
    let overflow = RowError::Overflow {
        bias: true,
        index: r,
        value: bias,
    };
    if !bias.is_finite() {
        return Err(overflow);
    }
    if dtype == Dtype::F32 && bias.abs() < F32_OVERFLOW {
        out.bias.extend((bias as f32).to_le_bytes());
        return Ok(f64::from(bias as f32));
    }
    let start = out.bias.len();
    encode(dtype, &[bias], &mut out.bias).map_err(|_| overflow)?;
    decode_into(dtype, &out.bias[start..], &mut scratch.written);
    Ok(scratch.written[0])
}

/// Values of at least this magnitude round to ±∞ in F32 (2^128 − 2^103: half an ulp above
/// `f32::MAX`, where the tie goes to the even infinity).
const F32_OVERFLOW: f64 = 340_282_356_779_733_661_637_539_395_458_142_568_448.0;

/// [`encode_tile`] for F32 in one pass over the tile, which also runs the tile as written on
/// `patch` into `written`, when every value is finite and fits; returns false, having written
/// and summed nothing, otherwise ([`encode_tile`] then says what is wrong).
#[inline(always)]
fn round_f32_tile(
    out: &mut FusedRows,
    fused: &[f64],
    patch: Option<&[f64]>,
    written: &mut Lanes,
) -> bool {
    let start = out.weight.len();
    let n = 4 * fused.len();
    out.weight.reserve(n);
    let dst = &mut out.weight.spare_capacity_mut()[..n];
    let mut sums = *written;
    let fits = match patch {
        Some(p) => round_f32::<true>(dst, fused, p, &mut sums),
        None => round_f32::<false>(dst, fused, &[], &mut sums),
    };
    if fits {
        // SAFETY: `round_f32` wrote all `n` bytes after `start` (4 for each value, within the
        // capacity reserved for them).
        unsafe { out.weight.set_len(start + n) }
        *written = sums;
    }
    fits
}

/// Each of `fused` rounded to F32 into `dst` (4 bytes a value), and (with `PROBE`) `f32(v)·p`
/// over `patch` summed into `sums`; returns whether all are finite and fit F32.
#[inline(always)]
fn round_f32<const PROBE: bool>(
    dst: &mut [MaybeUninit<u8>],
    fused: &[f64],
    patch: &[f64],
    sums: &mut Lanes,
) -> bool {
    let mut fits = Finite::default();
    // Whole quads as arrays (`as_chunks`), so each is four lanes of one vector, with no
    // bounds checks; the last values one by one.
    let (dq, dt) = dst.as_chunks_mut::<16>();
    let (fq, ft) = fused.as_chunks::<4>();
    let quads = 4 * fq.len();
    if PROBE {
        let (pq, _) = patch.as_chunks::<4>();
        for ((d, f), p) in dq.iter_mut().zip(fq).zip(pq) {
            let r = round_f32_quad(d, f, &mut fits);
            for j in 0..4 {
                sums.acc[j] += f64::from(r[j]) * p[j];
            }
        }
    } else {
        for (d, f) in dq.iter_mut().zip(fq) {
            round_f32_quad(d, f, &mut fits);
        }
    }
    for (i, (d, v)) in dt.as_chunks_mut::<4>().0.iter_mut().zip(ft).enumerate() {
        let r = *v as f32;
        fits.see(0, f64::from(r));
        for (d, b) in d.iter_mut().zip(r.to_le_bytes()) {
            d.write(b);
        }
        if PROBE {
            sums.tail += f64::from(r) * patch[quads + i];
        }
    }
    fits.all()
}

/// Whether every value seen was finite, kept as four lanes of `Σ v·0`: ±0 while every `v`
/// is finite, NaN from the first that is not (NaN or ±∞) on. Plain arithmetic, so the loops
/// that keep it vectorize (a `bool` and-ed per value made them test and branch per quad).
#[derive(Clone, Copy, Default)]
struct Finite([f64; 4]);

impl Finite {
    /// `v` seen in lane `j`.
    #[inline(always)]
    fn see(&mut self, j: usize, v: f64) {
        self.0[j] += v * 0.0;
    }

    /// Whether every value seen was finite.
    #[inline(always)]
    fn all(&self) -> bool {
        (self.0[0] + self.0[1]) + (self.0[2] + self.0[3]) == 0.0
    }
}

/// Four values rounded to F32 into `dst` (4 bytes each), seen by `fits` as rounded (±∞ where
/// they overflow F32, NaN where they were); returns them rounded.
#[inline(always)]
fn round_f32_quad(
    dst: &mut [MaybeUninit<u8>; 16],
    values: &[f64; 4],
    fits: &mut Finite,
) -> [f32; 4] {
    let mut r = [0.0f32; 4];
    for j in 0..4 {
        r[j] = values[j] as f32;
        fits.see(j, f64::from(r[j]));
        for (d, b) in dst[4 * j..4 * j + 4].iter_mut().zip(r[j].to_le_bytes()) {
            d.write(b);
        }
    }
    r
}

/// `a·w` for the tile `raw` of a full-size F32 kernel written to `fused` (`first`) or added to
/// it, in one pass that also checks every weight is finite and runs the tile on `patch` into
/// `probe`; returns false, having summed nothing into `probe`, when a weight is not finite.
#[inline(always)]
fn scale_f32_tile(
    fused: &mut [f64],
    raw: &[u8],
    a: f64,
    first: bool,
    patch: Option<&[f64]>,
    probe: &mut Lanes,
) -> bool {
    let mut sums = *probe;
    let finite = match (first, patch) {
        (true, Some(p)) => scale_f32::<true, true>(fused, raw, a, p, &mut sums),
        (false, Some(p)) => scale_f32::<false, true>(fused, raw, a, p, &mut sums),
        (true, None) => scale_f32::<true, false>(fused, raw, a, &[], &mut sums),
        (false, None) => scale_f32::<false, false>(fused, raw, a, &[], &mut sums),
    };
    if finite {
        *probe = sums;
    }
    finite
}

/// [`scale_f32_tile`] with its branches fixed: `FIRST` writes rather than adds, `PROBE` sums
/// the probe.
#[inline(always)]
fn scale_f32<const FIRST: bool, const PROBE: bool>(
    fused: &mut [f64],
    raw: &[u8],
    a: f64,
    patch: &[f64],
    sums: &mut Lanes,
) -> bool {
    let mut finite = Finite::default();
    // Whole quads as arrays (`as_chunks`), so each is four lanes of one vector, with no
    // bounds checks; the last values one by one.
    let (fq, ft) = fused.as_chunks_mut::<4>();
    let (rq, rt) = raw.as_chunks::<16>();
    let quads = 4 * fq.len();
    if PROBE {
        let (pq, _) = patch.as_chunks::<4>();
        for ((f, r), p) in fq.iter_mut().zip(rq).zip(pq) {
            let w = scale_f32_quad::<FIRST>(f, r, a, &mut finite);
            for j in 0..4 {
                sums.acc[j] += w[j] * p[j];
            }
        }
    } else {
        for (f, r) in fq.iter_mut().zip(rq) {
            scale_f32_quad::<FIRST>(f, r, a, &mut finite);
        }
    }
    for (i, (f, r)) in ft.iter_mut().zip(rt.as_chunks::<4>().0).enumerate() {
        let w = f64::from(f32::from_le_bytes(*r));
        finite.see(0, w);
        *f = if FIRST { a * w } else { *f + a * w };
        if PROBE {
            sums.tail += w * patch[quads + i];
        }
    }
    finite.all()
}

/// Four F32 weights of `raw` decoded, seen by `finite`, and `a·w` written to `fused`
/// (`FIRST`) or added to it; returns the weights.
#[inline(always)]
fn scale_f32_quad<const FIRST: bool>(
    fused: &mut [f64; 4],
    raw: &[u8; 16],
    a: f64,
    finite: &mut Finite,
) -> [f64; 4] {
    let mut w = [0.0f64; 4];
    for j in 0..4 {
        let b = [raw[4 * j], raw[4 * j + 1], raw[4 * j + 2], raw[4 * j + 3]];
        w[j] = f64::from(f32::from_le_bytes(b));
        finite.see(j, w[j]);
        fused[j] = if FIRST { a * w[j] } else { fused[j] + a * w[j] };
    }
    w
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
    /// A row of 300 input channels on a 3×3 grid (2,700 weights: three tiles of up to 112
    /// channels) fused from an F32 3×3 kernel (the one-pass path), an F32 1×1 with a BN on its
    /// input, an f64 1×3 and the identity equals each weight summed on its own in the same
    /// order, bit for bit, whatever tile it falls in; the bias carries the input BN's shifts
    /// through the 1×1; and the probe, run tile by tile, agrees with the rows as written.
    #[test]
    fn rows_wider_than_a_tile_fuse_as_one_row() {
        let (c, out) = (300, 3);
        let value =
            |i: usize, salt: usize| (((i * 7919 + salt * 104_729) % 1999) as f64 - 999.0) / 512.0;
        let w3: Vec<f32> = (0..out * c * 9).map(|i| value(i, 1) as f32).collect();
        let w1: Vec<f32> = (0..out * c).map(|i| value(i, 2) as f32).collect();
        let w13: Vec<f64> = (0..out * c * 3).map(|i| value(i, 3)).collect();
        let bn = Affine {
            scale: (0..c).map(|i| 1.0 + value(i, 4) / 8.0).collect(),
            shift: (0..c).map(|i| value(i, 5)).collect(),
        };
        let f32_bytes = |w: &[f32]| -> Vec<u8> { w.iter().flat_map(|v| v.to_le_bytes()).collect() };
        let (b3, b1, b13) = (f32_bytes(&w3), f32_bytes(&w1), bytes(&w13));
        let weights = |dtype, bytes, side, input| Kernel::Weights {
            dtype,
            bytes,
            side,
            dilation: 1,
            input,
        };
        let term = |kernel, salt: usize| Term {
            kernel,
            scale: (0..out).map(|o| 0.5 + value(o, salt)).collect(),
            shift: (0..out).map(|o| value(o, salt + 1)).collect(),
        };
        let terms = [
            term(weights(Dtype::F32, &b3, (3, 3), None), 6),
            term(weights(Dtype::F32, &b1, (1, 1), Some(&bn)), 8),
            term(weights(Dtype::F64, &b13, (1, 3), None), 10),
            term(Kernel::Identity, 12),
        ];
        let grid = Grid {
            in_per_group: c,
            k: (3, 3),
            out_per_group: out,
        };
        assert!(grid.tiles().count() >= 3);
        let probe = Input::random(1, c, 3, 3, 7, 0);
        let job = FuseJob {
            rows: &(0..out),
            grid,
            terms: &terms,
            post_shift: None,
            dtype: Dtype::F64,
            probe: Some(&probe),
        };
        let fused = fuse_rows(Vec::new(), &job).expect("finite");
        let fw: Vec<f64> = (fused.weight.chunks(8))
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let fb: Vec<f64> = (fused.bias.chunks(8))
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        for o in 0..out {
            let a: Vec<f64> = terms.iter().map(|t| t.scale[o]).collect();
            let mut bias = 0.0;
            for (t, term) in terms.iter().enumerate() {
                bias += term.shift[o];
                if t == 1 {
                    let through: f64 = (0..c).map(|i| f64::from(w1[o * c + i]) * bn.shift[i]).sum();
                    bias += a[1] * through;
                }
            }
            assert!(
                (fb[o] - bias).abs() <= 1e-12 * bias.abs().max(1.0),
                "bias {o}"
            );
            for i in 0..c {
                for tap in 0..9 {
                    let (y, x) = (tap / 3, tap % 3);
                    let mut want = a[0] * f64::from(w3[(o * c + i) * 9 + tap]);
                    if tap == 4 {
                        want += a[1] * (f64::from(w1[o * c + i]) * bn.scale[i]);
                    }
                    if y == 1 {
                        want += a[2] * w13[(o * c + i) * 3 + x];
                    }
                    if tap == 4 && i == o {
                        want += a[3];
                    }
                    let got = fw[(o * c + i) * 9 + tap];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "row {o}, channel {i}, tap {tap}"
                    );
                }
            }
        }
        // The rows as written meet the probe at the centre as the branches do: only the
        // rounding of two ways of summing the same f64 terms apart.
        assert!(fused.deviation.max_abs <= 1e-9, "{:?}", fused.deviation);
    }
}
