//! INT8 readiness: how much accuracy each fused weight loses when quantized to INT8.
//!
//! Fusion folds the BN scales and the identity into one kernel, so some output channels of a
//! fused weight can spread far wider than others, and one scale for the whole tensor
//! (per-tensor quantization) crushes the narrow ones (the QARepVGG paper traces RepVGG-A0's
//! post-training-quantization collapse to exactly this). The figures here say so from the
//! deploy weights alone, before anyone runs a calibration.
//!
//! # The quantization measured
//! Symmetric INT8, zero-point 0, scale `s = max|w| / 127` (over the tensor, or over one output
//! channel), `q = clamp(round_half_even(w / s), −127, 127)`, dequantized `q·s`: what
//! `torch.quantize_per_tensor` / `torch.quantize_per_channel` with `torch.qint8` and
//! `dequantize()` do with that scale. The error is `w − q·s`; an SQNR is
//! `10·log10(Σw² / Σ(w − q·s)²)` in dB. A ratio with no error (e.g. a tensor of ±max and zeros)
//! is exact and has no SQNR: `None` (`null` in JSON), never infinity.
//!
//! An all-zero output channel (or tensor) has scale 0. torch accepts that: the integers it
//! stores are meaningless (`0 · (1/0)` is NaN; torch 2.15 stores 0 per channel, 127 per tensor)
//! but `dequantize()` multiplies them by the scale 0 and gives the zeros back exactly. So such a
//! channel adds nothing to either sum here and is left out of the worst channel and the channel
//! range; an all-zero tensor has no SQNR (`None`).
//!
//! # Streaming
//! A fused weight is `[out, in/groups, k, k]`, so each output channel (row) is contiguous and
//! whole in every chunk the converter fuses. Per-channel figures need each row once:
//! [`ChannelStats::push_rows`] over the rows in order, in any chunking, is exact in one pass.
//! Per-tensor figures need the tensor's max|w| first, which only the end of the tensor settles:
//! a second pass, [`TensorStats::new`] with [`ChannelStats::max_abs`] then
//! [`TensorStats::push_rows`] over the same rows again. Neither pass holds more than the chunk
//! it is given; chunks can be measured in parallel and [`ChannelStats::merge`] /
//! [`TensorStats::merge`] put them together in order. [`figures`] turns both passes into an
//! [`Int8Report`].
//!
//! The converter runs pass one on each chunk as it fuses it, and pass two ahead on the same
//! chunk with the block's max|w| so far as the guess ([`ChannelStats::speculate`]);
//! [`tensor_pass`] then reads back from the file just written (still in the page cache) only
//! the chunks whose guess was not the tensor's max. The input is read once, and no block's
//! fused weight is ever whole in memory (B3's largest is 70 MB). `inspect` and other deploy
//! files go through [`scan_deploy`], both passes on the file.

use std::ops::Range;

use rayon::prelude::*;
use serde::Serialize;

use ndarray::Array2;
use safetensors::Dtype;

use crate::Error;
use crate::block::Block;
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::conv::grouped_matmul;
use crate::dtype::{decode_into, float_width};
use crate::progress::Cancel;

/// The largest INT8 magnitude used: the range is symmetric, `[−127, 127]`.
pub const QMAX: f64 = 127.0;

/// Rounds `x` to the nearest integer, ties to even, for `|x| < 2^51` (larger values are
/// returned unchanged or nearly so; the callers only pass `|x| ≤ 127·(1 + ε)` or NaN).
///
/// Adding and subtracting 1.5·2^52 leaves no fraction bits in f64, so the FPU's own
/// round-to-nearest-even does the rounding: the same result as `f64::round_ties_even`, but
/// plain arithmetic that vectorizes without SSE4.1.
#[inline(always)]
pub fn round_half_even(x: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    (x + MAGIC) - MAGIC
}

/// `w` quantized with `scale` (and its reciprocal `inv`, `1/scale`) and dequantized:
/// `clamp(round_half_even(w·inv), −127, 127) · scale`.
#[inline(always)]
pub fn fake_quant(w: f64, scale: f64, inv: f64) -> f64 {
    round_half_even(w * inv).clamp(-QMAX, QMAX) * scale
}

/// Sums of squares for an SQNR: of the values, and of their quantization errors.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sqnr {
    /// Σ w².
    pub signal: f64,
    /// Σ (w − q(w))².
    pub noise: f64,
}

impl Sqnr {
    /// `10·log10(signal / noise)` in dB; `None` when there is no error (exact) or the ratio is
    /// not a number (a non-finite value in the tensor).
    pub fn db(&self) -> Option<f64> {
        if self.noise == 0.0 {
            return None;
        }
        let db = 10.0 * (self.signal / self.noise).log10();
        db.is_finite().then_some(db)
    }

    /// The sums for `values` quantized with `scale` (see [`fake_quant`]).
    pub fn of(values: &[f64], scale: f64) -> Sqnr {
        if scale == 0.0 {
            // All zero (max|w| = 0): dequantized exactly, as torch does (module docs).
            return Sqnr::default();
        }
        // The reciprocal of the scale, as torch takes it, so that a tie lands the same way.
        let inv = 1.0 / scale;
        // Four independent lanes so the sums vectorize (f64 addition is not reassociated).
        let mut sig = [0.0f64; 4];
        let mut err = [0.0f64; 4];
        let chunks = values.chunks_exact(4);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..4 {
                let e = c[l] - fake_quant(c[l], scale, inv);
                sig[l] += c[l] * c[l];
                err[l] += e * e;
            }
        }
        for &w in tail {
            let e = w - fake_quant(w, scale, inv);
            sig[0] += w * w;
            err[0] += e * e;
        }
        Sqnr {
            signal: (sig[0] + sig[1]) + (sig[2] + sig[3]),
            noise: (err[0] + err[1]) + (err[2] + err[3]),
        }
    }
}

impl std::ops::Add for Sqnr {
    type Output = Sqnr;

    /// The sums over both sets of values.
    fn add(self, other: Sqnr) -> Sqnr {
        Sqnr {
            signal: self.signal + other.signal,
            noise: self.noise + other.noise,
        }
    }
}

/// One measured output SQNR: exact (no noise at all; `null` in the report), or in dB.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum OutputSqnr {
    /// The quantized output equals the float output.
    Exact,
    /// Signal over noise, in dB.
    Db(f64),
}

impl From<Option<f64>> for OutputSqnr {
    /// [`Sqnr::db`]'s answer: `None` is exact.
    fn from(db: Option<f64>) -> Self {
        db.map_or(OutputSqnr::Exact, OutputSqnr::Db)
    }
}

/// max |v| over `values` (NaN if any is NaN, so a broken tensor does not pass for a good one).
pub fn max_abs(values: &[f64]) -> f64 {
    let mut m = [0.0f64; 4];
    let mut nan = false;
    let chunks = values.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..4 {
            m[l] = m[l].max(c[l].abs());
            nan |= c[l].is_nan();
        }
    }
    for &v in tail {
        m[0] = m[0].max(v.abs());
        nan |= v.is_nan();
    }
    if nan {
        f64::NAN
    } else {
        m[0].max(m[1]).max(m[2].max(m[3]))
    }
}

/// [`Sqnr::of`] for F32 little-endian `bytes`, computed in f32 as torch's quantizer does
/// (`w · (1/scale)` rounded in float), on 8 lanes; the sums go to f64 every 128 values.
/// This is the converter's hot loop: the fused weights as written are read as they are.
pub fn sqnr_f32(bytes: &[u8], scale: f64) -> Sqnr {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { sqnr_f32_avx2(bytes, scale) };
    }
    sqnr_f32_any(bytes, scale)
}

/// max |w| of F32 little-endian `bytes` (NaN if any is NaN).
pub fn max_abs_f32(bytes: &[u8]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the feature the function is compiled for (checked above).
        return unsafe { max_abs_f32_avx2(bytes) };
    }
    max_abs_f32_any(bytes)
}

/// [`sqnr_f32`] in AVX2 + FMA: 8 lanes, hardware round-half-even (`vroundps`), the f32 sums
/// moved to f64 every 128 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn sqnr_f32_avx2(bytes: &[u8], scale: f64) -> Sqnr {
    use std::arch::x86_64::*;
    if scale == 0.0 {
        return Sqnr::default();
    }
    let full = bytes.len() / 32 * 8;
    let mut out = Sqnr::default();
    // SAFETY: the CPU has AVX2 and FMA (this function's features); every load reads the 32
    // bytes at 4·i with i + 8 ≤ `full` ≤ bytes.len() / 4, inside `bytes`, and `loadu` needs no
    // alignment.
    unsafe {
        let s = scale as f32;
        let (vs, vinv) = (_mm256_set1_ps(s), _mm256_set1_ps(1.0 / s));
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let to_f64 = |v: __m256| {
            let sum = _mm256_add_pd(
                _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
            );
            let mut lanes = [0.0f64; 4];
            _mm256_storeu_pd(lanes.as_mut_ptr(), sum);
            (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
        };
        let ptr = bytes.as_ptr();
        let mut i = 0;
        while i < full {
            let end = (i + 128).min(full);
            let (mut sig, mut err) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            while i < end {
                let w = _mm256_loadu_ps(ptr.add(4 * i).cast::<f32>());
                let q = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(w, vinv),
                );
                let e = _mm256_sub_ps(
                    w,
                    _mm256_mul_ps(_mm256_min_ps(_mm256_max_ps(q, lo), hi), vs),
                );
                sig = _mm256_fmadd_ps(w, w, sig);
                err = _mm256_fmadd_ps(e, e, err);
                i += 8;
            }
            out.signal += to_f64(sig);
            out.noise += to_f64(err);
        }
    }
    out + sqnr_f32_any(&bytes[4 * full..], scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn max_abs_f32_avx2(bytes: &[u8]) -> f64 {
    max_abs_f32_any(bytes)
}

#[inline(always)]
fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

#[inline(always)]
fn sqnr_f32_any(bytes: &[u8], scale: f64) -> Sqnr {
    if scale == 0.0 {
        return Sqnr::default();
    }
    // 1.5 · 2^23: round half to even in f32 (see `round_half_even`).
    const MAGIC: f32 = 12_582_912.0;
    let s = scale as f32;
    let inv = 1.0 / s;
    let mut out = Sqnr::default();
    let blocks = bytes.chunks_exact(4 * 128);
    let tail = blocks.remainder();
    for block in blocks {
        let mut sig = [0.0f32; 8];
        let mut err = [0.0f32; 8];
        for c in block.chunks_exact(32) {
            for l in 0..8 {
                let w = f32_at(c, l);
                let q = ((w * inv + MAGIC) - MAGIC).clamp(-127.0, 127.0) * s;
                sig[l] += w * w;
                err[l] += (w - q) * (w - q);
            }
        }
        out.signal += sig.iter().map(|&v| f64::from(v)).sum::<f64>();
        out.noise += err.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    for i in 0..tail.len() / 4 {
        let w = f32_at(tail, i);
        let q = ((w * inv + MAGIC) - MAGIC).clamp(-127.0, 127.0) * s;
        out.signal += f64::from(w * w);
        out.noise += f64::from((w - q) * (w - q));
    }
    out
}

#[inline(always)]
fn max_abs_f32_any(bytes: &[u8]) -> f64 {
    // On the bits: |w| is the bits without the sign, and for those, integer order is float
    // order, with NaN above infinity (0x7f80_0000).
    let mut m = [0u32; 8];
    let chunks = bytes.chunks_exact(32);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, m) in m.iter_mut().enumerate() {
            *m = (*m).max(f32_at(c, l).to_bits() & 0x7fff_ffff);
        }
    }
    for i in 0..tail.len() / 4 {
        m[0] = m[0].max(f32_at(tail, i).to_bits() & 0x7fff_ffff);
    }
    let max = m.iter().copied().max().unwrap_or(0);
    if max > 0x7f80_0000 {
        f64::NAN
    } else {
        f64::from(f32::from_bits(max))
    }
}

thread_local! {
    /// Values decoded from a dtype other than F32.
    static DECODED: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Pass one: per-channel figures and the tensor's max|w|, row by row.
///
/// Feed it the rows of a tensor (`row_len` values each, the output channels) in order, in
/// chunks of whole rows; [`ChannelStats::merge`] joins the stats of consecutive chunks measured
/// apart (in parallel). Exact in one pass: each row carries its own scale.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelStats {
    row_len: usize,
    /// The index of the next row pushed.
    next_row: usize,
    /// Σ over every channel, each quantized with its own scale.
    total: Sqnr,
    /// The lowest channel SQNR (as `noise / signal`, the largest) and its channel.
    worst: Option<(usize, Sqnr)>,
    /// max|w| over the rows.
    max_abs: f64,
    /// The smallest non-zero channel max|w|.
    min_channel_max: Option<f64>,
    /// Pass two measured ahead, at a guess of the tensor's max|w| ([`ChannelStats::speculate`]):
    /// (rows, the max|w| guessed, bits, and pass two's stats of those rows under it), in row
    /// order.
    ahead: Vec<(Range<usize>, u64, TensorStats)>,
}

impl ChannelStats {
    /// Stats of no rows yet, for rows of `row_len` values starting at channel `first_row`.
    pub fn new(row_len: usize, first_row: usize) -> Self {
        ChannelStats {
            row_len: row_len.max(1),
            next_row: first_row,
            total: Sqnr::default(),
            worst: None,
            max_abs: 0.0,
            min_channel_max: None,
            ahead: Vec::new(),
        }
    }

    /// Measures pass two of rows `rows` (given as little-endian `dtype` bytes, as written)
    /// ahead, with `max_abs` as the tensor's max|w|: [`tensor_pass`] takes these stats instead
    /// of reading the rows again when the tensor's max|w| turns out to be exactly `max_abs`.
    ///
    /// The converter guesses the max over the chunks fused so far: the guess is right for
    /// every chunk from the one holding the tensor's max on, so only the chunks before it are
    /// read again.
    pub fn speculate(&mut self, dtype: Dtype, bytes: &[u8], rows: Range<usize>, max_abs: f64) {
        let mut t = TensorStats::new(max_abs, self.row_len, rows.start);
        t.push_bytes(dtype, bytes);
        self.ahead.push((rows, max_abs.to_bits(), t));
    }

    /// Pass two of exactly `rows` measured ahead with exactly `max_abs`, if it was.
    fn ahead_of(&self, rows: &Range<usize>, max_abs: f64) -> Option<TensorStats> {
        let i = self
            .ahead
            .binary_search_by_key(&rows.start, |(r, ..)| r.start)
            .ok()?;
        let (r, bits, t) = &self.ahead[i];
        (r == rows && *bits == max_abs.to_bits() && !max_abs.is_nan()).then_some(*t)
    }

    /// Adds whole rows (a multiple of `row_len` values; a ragged tail counts as a row).
    pub fn push_rows(&mut self, rows: &[f64]) {
        for row in rows.chunks(self.row_len) {
            let m = max_abs(row);
            self.push_row(m, Sqnr::of(row, m / QMAX));
        }
    }

    /// Adds whole rows given as little-endian `dtype` bytes, as written to a file: F32 is read
    /// as it is ([`sqnr_f32`]), other dtypes are decoded first.
    pub fn push_bytes(&mut self, dtype: Dtype, bytes: &[u8]) {
        if dtype == Dtype::F32 {
            for row in bytes.chunks(4 * self.row_len) {
                let m = max_abs_f32(row);
                self.push_row(m, sqnr_f32(row, m / QMAX));
            }
        } else {
            DECODED.with(|v| {
                let mut v = v.borrow_mut();
                decode_into(dtype, bytes, &mut v);
                self.push_rows(&v);
            });
        }
    }

    /// Adds one row with max|w| `m` and per-channel sums `s`.
    fn push_row(&mut self, m: f64, s: Sqnr) {
        self.total = self.total + s;
        self.max_abs = if m.is_nan() || self.max_abs.is_nan() {
            f64::NAN
        } else {
            self.max_abs.max(m)
        };
        if m > 0.0 {
            self.min_channel_max = Some(self.min_channel_max.map_or(m, |x| x.min(m)));
        }
        if s.noise > 0.0 && self.worst.is_none_or(|(_, w)| worse(s, w)) {
            self.worst = Some((self.next_row, s));
        }
        self.next_row += 1;
    }

    /// The stats of these rows followed by `later`'s (which must start where these end).
    pub fn merge(self, later: ChannelStats) -> ChannelStats {
        let worst = match (self.worst, later.worst) {
            // The earlier channel wins a tie, as in one pass.
            (Some(a), Some(b)) => Some(if worse(b.1, a.1) { b } else { a }),
            (a, b) => a.or(b),
        };
        ChannelStats {
            row_len: self.row_len,
            next_row: later.next_row,
            total: self.total + later.total,
            worst,
            max_abs: if self.max_abs.is_nan() || later.max_abs.is_nan() {
                f64::NAN
            } else {
                self.max_abs.max(later.max_abs)
            },
            min_channel_max: match (self.min_channel_max, later.min_channel_max) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            ahead: {
                let mut ahead = self.ahead;
                ahead.extend(later.ahead);
                ahead
            },
        }
    }

    /// max|w| over the rows so far: what the per-tensor pass needs ([`TensorStats::new`]).
    pub fn max_abs(&self) -> f64 {
        self.max_abs
    }
}

/// Whether `a` has a lower SQNR than `b` (a larger noise-to-signal ratio), by cross
/// multiplication so that a zero signal needs no special case.
fn worse(a: Sqnr, b: Sqnr) -> bool {
    a.noise * b.signal > b.noise * a.signal
}

/// Pass two: the per-tensor figures, with the scale the whole tensor's max|w| gives.
///
/// Feed it the same rows again, in chunks of whole rows (any order: each chunk says where it
/// starts); [`TensorStats::merge`] joins chunks measured apart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorStats {
    scale: f64,
    row_len: usize,
    next_row: usize,
    sums: Sqnr,
    /// The channel that fares worst under the tensor's scale, and its sums.
    worst: Option<(usize, Sqnr)>,
}

impl TensorStats {
    /// Stats for rows of `row_len` values from channel `first_row` on, of a tensor whose
    /// max|w| is `max_abs` (from [`ChannelStats::max_abs`] after all its rows).
    pub fn new(max_abs: f64, row_len: usize, first_row: usize) -> Self {
        TensorStats {
            scale: max_abs / QMAX,
            row_len: row_len.max(1),
            next_row: first_row,
            sums: Sqnr::default(),
            worst: None,
        }
    }

    /// Adds whole rows (a multiple of `row_len` values).
    pub fn push_rows(&mut self, rows: &[f64]) {
        for row in rows.chunks(self.row_len) {
            self.push_row(Sqnr::of(row, self.scale));
        }
    }

    /// Adds whole rows given as little-endian `dtype` bytes (see [`ChannelStats::push_bytes`]).
    pub fn push_bytes(&mut self, dtype: Dtype, bytes: &[u8]) {
        if dtype == Dtype::F32 {
            for row in bytes.chunks(4 * self.row_len) {
                self.push_row(sqnr_f32(row, self.scale));
            }
        } else {
            DECODED.with(|v| {
                let mut v = v.borrow_mut();
                decode_into(dtype, bytes, &mut v);
                self.push_rows(&v);
            });
        }
    }

    fn push_row(&mut self, s: Sqnr) {
        self.sums = self.sums + s;
        if s.noise > 0.0 && self.worst.is_none_or(|(_, w)| worse(s, w)) {
            self.worst = Some((self.next_row, s));
        }
        self.next_row += 1;
    }

    /// The stats of these rows and `later`'s (the same tensor, rows after these).
    pub fn merge(self, later: TensorStats) -> TensorStats {
        TensorStats {
            scale: self.scale,
            row_len: self.row_len,
            next_row: later.next_row,
            sums: self.sums + later.sums,
            worst: match (self.worst, later.worst) {
                (Some(a), Some(b)) => Some(if worse(b.1, a.1) { b } else { a }),
                (a, b) => a.or(b),
            },
        }
    }

    /// The per-tensor sums so far.
    pub fn sums(&self) -> Sqnr {
        self.sums
    }
}

/// A fused block's INT8 figures (`blocks[i].int8` in the report). Every SQNR is in dB; `null`
/// means exact (no quantization error at all), never infinity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Int8Report {
    /// SQNR of the weight with one scale for the whole tensor.
    pub per_tensor_sqnr_db: Option<f64>,
    /// SQNR of the whole weight, each output channel with its own scale.
    pub per_channel_sqnr_db: Option<f64>,
    /// The lowest SQNR of any single output channel (per-channel scales).
    pub worst_channel_sqnr_db: Option<f64>,
    /// That channel's index.
    pub worst_channel: Option<usize>,
    /// Largest over smallest per-channel max|w|, all-zero channels left out: how far apart
    /// the channels' ranges are (what per-tensor quantization suffers from).
    pub channel_range_ratio: Option<f64>,
    /// The lowest SQNR of any single output channel with the per-tensor scale. The per-tensor
    /// SQNR weighs channels by their energy, so one channel far wider than the rest can hide
    /// that every other channel rounds to zero (it stays high); this one does not.
    pub per_tensor_worst_channel_sqnr_db: Option<f64>,
    /// With verification: SQNR of the block's output with per-channel INT8 weights against
    /// its float output, on the verification input (bias in float in both). Absent without
    /// verification, `null` when exact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_sqnr_db: Option<OutputSqnr>,
}

/// The figures of a tensor from both passes over it.
pub fn figures(channel: &ChannelStats, tensor: &TensorStats) -> Int8Report {
    let worst = channel.worst.and_then(|(c, s)| s.db().map(|db| (c, db)));
    Int8Report {
        per_tensor_sqnr_db: tensor.sums.db(),
        per_channel_sqnr_db: channel.total.db(),
        worst_channel_sqnr_db: worst.map(|w| w.1),
        worst_channel: worst.map(|w| w.0),
        channel_range_ratio: channel
            .min_channel_max
            .map(|min| channel.max_abs / min)
            .filter(|r| r.is_finite()),
        per_tensor_worst_channel_sqnr_db: tensor.worst.and_then(|(_, s)| s.db()),
        output_sqnr_db: None,
    }
}

/// Both passes over a tensor held in memory (`row_len` values per output channel).
pub fn tensor_figures(values: &[f64], row_len: usize) -> Int8Report {
    let mut c = ChannelStats::new(row_len, 0);
    c.push_rows(values);
    let mut t = TensorStats::new(c.max_abs(), row_len, 0);
    t.push_rows(values);
    figures(&c, &t)
}

/// The model's INT8 summary (`summary.int8`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Int8Summary {
    /// The (up to) five blocks with the lowest per-tensor SQNR, lowest first.
    pub worst_blocks: Vec<WorstBlock>,
    /// The lowest per-tensor SQNR of any block (`null` if every block is exact).
    pub min_per_tensor_sqnr_db: Option<f64>,
    /// The lowest per-channel SQNR of any block.
    pub min_per_channel_sqnr_db: Option<f64>,
}

/// A block and its per-tensor SQNR.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorstBlock {
    /// The block prefix.
    pub name: String,
    /// Its per-tensor SQNR in dB.
    pub per_tensor_sqnr_db: f64,
}

impl Int8Summary {
    /// The summary of blocks `(name, figures)`; `None` when no block has figures.
    pub fn of<'a>(
        blocks: impl IntoIterator<Item = (&'a str, Option<&'a Int8Report>)>,
    ) -> Option<Int8Summary> {
        let measured: Vec<(&str, &Int8Report)> = blocks
            .into_iter()
            .filter_map(|(n, r)| r.map(|r| (n, r)))
            .collect();
        if measured.is_empty() {
            return None;
        }
        let mut tensor: Vec<(&str, f64)> = measured
            .iter()
            .filter_map(|(n, r)| r.per_tensor_sqnr_db.map(|v| (*n, v)))
            .collect();
        // Stable: equal figures keep file order.
        tensor.sort_by(|a, b| a.1.total_cmp(&b.1));
        let min = |f: fn(&Int8Report) -> Option<f64>| {
            measured
                .iter()
                .filter_map(|(_, r)| f(r))
                .min_by(f64::total_cmp)
        };
        Some(Int8Summary {
            worst_blocks: tensor
                .iter()
                .take(5)
                .map(|(n, v)| WorstBlock {
                    name: n.to_string(),
                    per_tensor_sqnr_db: *v,
                })
                .collect(),
            min_per_tensor_sqnr_db: min(|r| r.per_tensor_sqnr_db),
            min_per_channel_sqnr_db: min(|r| r.per_channel_sqnr_db),
        })
    }
}

/// The blocks whose per-channel SQNR is below `min_db`, with it: what `--int8-min-db` refuses.
/// Exact blocks (`null`) and blocks without figures pass.
pub fn below<'a>(
    blocks: impl IntoIterator<Item = (&'a str, Option<&'a Int8Report>)>,
    min_db: f64,
) -> Vec<(String, f64)> {
    blocks
        .into_iter()
        .filter_map(|(n, r)| {
            let v = r?.per_channel_sqnr_db?;
            (v < min_db).then(|| (n.to_string(), v))
        })
        .collect()
}

/// Values per chunk when scanning a file: 64 Ki, like the converter's chunks, so each
/// chunk's bytes and values stay in the core's cache between the read and the sums.
const SCAN_CHUNK: usize = 1 << 16;

/// Output-channel ranges of about `elements` values each, whole rows.
fn chunks_of(rows: usize, row_len: usize, elements: usize) -> Vec<Range<usize>> {
    let step = (elements / row_len.max(1)).max(1);
    (0..rows)
        .step_by(step)
        .map(|s| s..(s + step).min(rows))
        .collect()
}

thread_local! {
    /// Each scanning thread's buffer for the bytes it reads.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads rows `rows` of `tensor` (rows of `row_len`) and hands their bytes to `f`.
fn with_rows<T>(
    ckpt: &Checkpoint,
    tensor: &TensorInfo,
    row_len: usize,
    rows: &Range<usize>,
    f: impl FnOnce(&[u8]) -> T,
) -> Result<T, Error> {
    let width = float_width(tensor.dtype).unwrap_or(4);
    let bytes_per_row = (row_len * width) as u64;
    SCRATCH.with(|bytes| {
        let mut bytes = bytes.borrow_mut();
        ckpt.read_bytes_into(
            tensor,
            rows.start as u64 * bytes_per_row,
            rows.len() as u64 * bytes_per_row,
            &mut bytes,
        )?;
        Ok(f(&bytes))
    })
}

/// Each block's fused weight in `deploy`, with its row length, split in chunks of whole rows:
/// `(block, weight, row length, rows)`. Blocks whose weight is missing there, not floating
/// point, or not `[out, in/groups, k, k]` (a Linear's `[out, in]`) have no chunks.
fn scan_tasks<'a>(
    deploy: &'a Checkpoint,
    blocks: &[Block],
) -> Vec<(usize, &'a TensorInfo, usize, Range<usize>)> {
    let mut tasks = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let row_len = b.row_len();
        let t = deploy
            .get(&b.deploy_weight)
            .filter(|t| float_width(t.dtype).is_some() && t.shape == b.deploy_shape());
        if let Some(t) = t {
            let chunks = chunks_of(b.out_channels, row_len, SCAN_CHUNK);
            tasks.extend(chunks.into_iter().map(|r| (i, t, row_len, r)));
        }
    }
    tasks
}

/// Pass one over every block's fused weight in `deploy` (see [`scan_deploy`]).
pub fn channel_pass(
    deploy: &Checkpoint,
    blocks: &[Block],
    cancel: &Cancel,
) -> Result<Vec<Option<ChannelStats>>, Error> {
    let tasks = scan_tasks(deploy, blocks);
    let chan: Vec<ChannelStats> = tasks
        .par_iter()
        .map(|&(_, t, row_len, ref rows)| {
            cancel.check()?;
            with_rows(deploy, t, row_len, rows, |bytes| {
                let mut c = ChannelStats::new(row_len, rows.start);
                c.push_bytes(t.dtype, bytes);
                c
            })
        })
        .collect::<Result<_, Error>>()?;
    let mut per_block: Vec<Option<ChannelStats>> = vec![None; blocks.len()];
    for (&(i, ..), c) in tasks.iter().zip(chan) {
        per_block[i] = Some(match per_block[i].take() {
            Some(acc) => acc.merge(c),
            None => c,
        });
    }
    Ok(per_block)
}

/// Pass two over every block's fused weight in `deploy`, given pass one's stats of each
/// (`None`: no figures for that block), and the figures of both.
///
/// The converter runs pass one while fusing, on each chunk as it is written, and this one on
/// the written file, which it reads only for the chunks it did not measure ahead
/// ([`ChannelStats::speculate`]) with the tensor's max|w|.
pub fn tensor_pass(
    deploy: &Checkpoint,
    blocks: &[Block],
    channels: &[Option<ChannelStats>],
    cancel: &Cancel,
) -> Result<Vec<Option<Int8Report>>, Error> {
    let tasks: Vec<_> = scan_tasks(deploy, blocks)
        .into_iter()
        .filter(|(i, ..)| channels.get(*i).is_some_and(Option::is_some))
        .collect();
    let max = |i: usize| channels[i].as_ref().map_or(0.0, ChannelStats::max_abs);
    let tens: Vec<TensorStats> = tasks
        .par_iter()
        .map(|&(i, t, row_len, ref rows)| {
            cancel.check()?;
            let ahead = channels[i].as_ref().and_then(|c| c.ahead_of(rows, max(i)));
            if let Some(s) = ahead.filter(|s| s.row_len == row_len) {
                return Ok(s);
            }
            with_rows(deploy, t, row_len, rows, |bytes| {
                let mut s = TensorStats::new(max(i), row_len, rows.start);
                s.push_bytes(t.dtype, bytes);
                s
            })
        })
        .collect::<Result<_, Error>>()?;
    let mut sums: Vec<Option<TensorStats>> = vec![None; blocks.len()];
    for (&(i, ..), s) in tasks.iter().zip(tens) {
        sums[i] = Some(sums[i].map_or(s, |acc| acc.merge(s)));
    }
    Ok(channels
        .iter()
        .zip(&sums)
        .map(|(c, t)| Some(figures(c.as_ref()?, t.as_ref()?)))
        .collect())
}

/// The INT8 figures of every block's fused weight in `deploy` (any deploy file): `None` for a
/// block whose weight is missing there, not floating point, or not `[out, in/groups, k, k]`.
///
/// Both passes read the weights from `deploy` in chunks of whole rows, every chunk of every
/// block in parallel: pass one ([`channel_pass`]) gives the per-channel figures and each
/// tensor's max|w|, pass two ([`tensor_pass`]) the per-tensor ones. Memory: a chunk per thread.
pub fn scan_deploy(
    deploy: &Checkpoint,
    blocks: &[Block],
    cancel: &Cancel,
) -> Result<Vec<Option<Int8Report>>, Error> {
    let channels = channel_pass(deploy, blocks, cancel)?;
    tensor_pass(deploy, blocks, &channels, cancel)
}

/// Rows of a fused conv's weight: `[rows, in/groups, kh, kw]`.
#[derive(Debug, Clone, Copy)]
pub struct ConvRows<'a> {
    /// The weights of the rows.
    pub weight: &'a [f64],
    /// The output channels they are.
    pub first_row: usize,
    /// Input channels per group.
    pub in_per_group: usize,
    /// Kernel `(kh, kw)`.
    pub kernel: (usize, usize),
}

/// `weight` (rows of `row_len`) with each output channel's weights quantized to INT8 with its
/// own scale and dequantized (a bias stays float, as INT8 backends keep it at the
/// accumulator's scale).
pub fn per_channel_quantized(weight: &[f64], row_len: usize) -> Vec<f64> {
    let mut q = weight.to_vec();
    for row in q.chunks_mut(row_len.max(1)) {
        let scale = max_abs(row) / QMAX;
        if scale > 0.0 {
            let inv = 1.0 / scale;
            row.iter_mut().for_each(|w| *w = fake_quant(*w, scale, inv));
        }
    }
    q
}

/// Sums for the output SQNR of `conv` with per-channel INT8 weights: `float_out` is the
/// block's float fused output on the input whose im2col for the conv's kernel is `cols`
/// ([`crate::conv::BlockInput::cols`]); the error is the output of
/// the weights' quantization error, `conv(W − q(W), x)` (the bias cancels). [`Sqnr::db`] of
/// the sums over a block's chunks is `blocks[i].int8.output_sqnr_db`.
///
/// The error conv runs in f32: the errors are at most half an INT8 step, so f32's relative
/// 6e-8 on them is far below what an SQNR shows, and an f32 GEMM does twice the work of an
/// f64 one per instruction (verification's cost is its GEMMs).
pub fn output_sums(
    conv: ConvRows,
    float_out: &Array2<f64>,
    cols: &Array2<f64>,
    out_per_group: usize,
) -> Sqnr {
    let (kh, kw) = conv.kernel;
    let depth = conv.in_per_group * kh * kw;
    let rows = conv.first_row..conv.first_row + conv.weight.len() / depth.max(1);
    let mut delta = Vec::with_capacity(conv.weight.len());
    for row in conv.weight.chunks(depth.max(1)) {
        let scale = max_abs(row) / QMAX;
        let inv = 1.0 / scale;
        delta.extend(row.iter().map(|&w| {
            if scale > 0.0 {
                (w - fake_quant(w, scale, inv)) as f32
            } else {
                0.0
            }
        }));
    }
    let p = cols.ncols();
    let cols: Vec<f32> = cols.iter().map(|&v| v as f32).collect();
    let mut err = vec![0.0f32; rows.len() * p];
    grouped_matmul(&delta, &cols, &mut err, rows, depth, out_per_group);
    Sqnr {
        signal: float_out.iter().map(|y| y * y).sum(),
        noise: err.iter().map(|&e| f64::from(e) * f64::from(e)).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_even_matches_the_std_rounding() {
        for x in [
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            126.5,
            -126.5,
            127.5,
            0.49999999999999994,
            3.7,
            -3.7,
            0.0,
            -0.0,
            1e-300,
        ] {
            assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
        }
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(-2.5), -2.0);
    }

    #[test]
    fn fake_quant_clamps_to_127() {
        // A value past max|w| (as a scale from a smaller max would give) is clamped.
        let s = 1.0 / QMAX;
        let inv = 1.0 / s;
        assert_eq!(fake_quant(2.0, s, inv), 127.0 * s);
        assert_eq!(fake_quant(-2.0, s, inv), -127.0 * s);
        assert_eq!(fake_quant(1.0, s, inv), 1.0);
        // Half a step rounds to even: 0.5 steps → 0, 1.5 → 2.
        assert_eq!(fake_quant(0.5 * s, s, inv), 0.0);
        assert_eq!(fake_quant(1.5 * s, s, inv), 2.0 * s);
    }

    #[test]
    fn exact_tensors_have_no_sqnr() {
        // ±max and zeros quantize exactly: no error, so null, not infinity.
        let r = tensor_figures(&[127.0, -127.0, 0.0, 0.0, 2.0, -2.0], 2);
        assert_eq!(r.per_tensor_sqnr_db, None);
        assert_eq!(r.per_channel_sqnr_db, None);
        assert_eq!(r.worst_channel, None);
        assert_eq!(r.worst_channel_sqnr_db, None);
        assert_eq!(r.channel_range_ratio, Some(63.5));
        assert_eq!(r.per_tensor_worst_channel_sqnr_db, None);
        let json = serde_json::to_value(r).unwrap();
        assert!(json["per_tensor_sqnr_db"].is_null());
        assert!(json.get("output_sqnr_db").is_none());
    }

    #[test]
    fn zero_tensor_and_zero_channels() {
        let r = tensor_figures(&[0.0; 8], 4);
        assert_eq!(r, Int8Report::default());
        // Channel 1 all zero: left out of the range ratio and never the worst channel.
        let v = [0.3, -0.7, 0.0, 0.0, 0.01, 0.02];
        let r = tensor_figures(&v, 2);
        assert_eq!(r.channel_range_ratio, Some(0.7 / 0.02));
        // Channel 0: 0.3/0.7·127 = 54.4 → 54, ~50 dB; channel 2: 0.01/0.02·127 = 63.5, a tie
        // → 64 (even), ~49 dB.
        assert_eq!(r.worst_channel, Some(2));
        assert!(r.per_channel_sqnr_db.is_some());
    }

    #[test]
    fn sqnr_by_hand() {
        // max 1 → scale 1/127; 0.3 → round(38.1) = 38 → error 0.3 − 38/127.
        let r = tensor_figures(&[1.0, 0.3], 2);
        let e: f64 = 0.3 - 38.0 / 127.0;
        let want = 10.0 * ((1.0 + 0.09) / (e * e)).log10();
        assert!((r.per_tensor_sqnr_db.unwrap() - want).abs() < 1e-9);
        assert!((r.per_channel_sqnr_db.unwrap() - want).abs() < 1e-9);
        // Per channel, the second row on its own is exact.
        let r = tensor_figures(&[1.0, 0.3, 0.3, 0.1], 2);
        assert!(r.per_channel_sqnr_db.unwrap() > r.per_tensor_sqnr_db.unwrap());
    }

    #[test]
    fn pass_two_measured_ahead_is_used_only_with_the_tensors_max() {
        // The second half twice as wide: the tensor's max is in the second chunk.
        let v: Vec<f32> = (0..96)
            .map(|i| (((i * 37) % 23) as f32 / 7.0 - 1.5) * if i < 48 { 1.0 } else { 2.0 })
            .collect();
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        // Two chunks of 4 rows of 12; the first measured ahead at a max below the tensor's.
        let (first, second) = (0..4, 4..8);
        let mut a = ChannelStats::new(12, 0);
        a.push_bytes(Dtype::F32, &bytes[..192]);
        a.speculate(Dtype::F32, &bytes[..192], first.clone(), a.max_abs());
        let mut b = ChannelStats::new(12, 4);
        b.push_bytes(Dtype::F32, &bytes[192..]);
        let max = a.max_abs().max(b.max_abs());
        assert!(
            a.max_abs() < max,
            "the test needs the max in the second chunk"
        );
        b.speculate(Dtype::F32, &bytes[192..], second.clone(), max);
        let c = a.merge(b);
        assert_eq!(c.max_abs(), max);
        assert_eq!(c.ahead_of(&first, max), None);
        let mut want = TensorStats::new(max, 12, 4);
        want.push_bytes(Dtype::F32, &bytes[192..]);
        assert_eq!(c.ahead_of(&second, max), Some(want));
        assert_eq!(c.ahead_of(&(4..7), max), None);
        assert_eq!(c.ahead_of(&second, f64::NAN), None);
    }

    #[test]
    fn chunked_and_merged_equals_one_pass() {
        let v: Vec<f64> = (0..600)
            .map(|i| ((i * 7919) % 1000) as f64 / 997.0 - 0.5)
            .collect();
        let whole = tensor_figures(&v, 12);
        let mut acc: Option<ChannelStats> = None;
        for (k, rows) in chunks_of(50, 12, 40).into_iter().enumerate() {
            let mut c = ChannelStats::new(12, rows.start);
            c.push_rows(&v[rows.start * 12..rows.end * 12]);
            acc = Some(match acc {
                Some(a) => a.merge(c),
                None => c,
            });
            assert!(k < 50);
        }
        let c = acc.unwrap();
        let mut t = TensorStats::new(c.max_abs(), 12, 0);
        t.push_rows(&v[..120]);
        for (k, part) in v[120..].chunks(120).enumerate() {
            let mut p = TensorStats::new(c.max_abs(), 12, 10 + 10 * k);
            p.push_rows(part);
            t = t.merge(p);
        }
        let split = figures(&c, &t);
        assert_eq!(split.worst_channel, whole.worst_channel);
        for (a, b) in [
            (split.per_tensor_sqnr_db, whole.per_tensor_sqnr_db),
            (split.per_channel_sqnr_db, whole.per_channel_sqnr_db),
            (split.worst_channel_sqnr_db, whole.worst_channel_sqnr_db),
            (
                split.per_tensor_worst_channel_sqnr_db,
                whole.per_tensor_worst_channel_sqnr_db,
            ),
        ] {
            assert!((a.unwrap() - b.unwrap()).abs() < 1e-9);
        }
    }

    #[test]
    fn f32_bytes_agree_with_f64_values() {
        // 37 rows of 21: odd lengths, so the 8-lane blocks and the tails are both used.
        let v: Vec<f64> = (0..37 * 21)
            .map(|i| {
                let x = (((i * 7919) % 1013) as f64 / 1013.0 - 0.3) * (1.0 + (i / 21) as f64);
                f64::from(x as f32)
            })
            .collect();
        let bytes: Vec<u8> = v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect();
        let whole = tensor_figures(&v, 21);
        let mut c = ChannelStats::new(21, 0);
        c.push_bytes(Dtype::F32, &bytes);
        let mut t = TensorStats::new(c.max_abs(), 21, 0);
        t.push_bytes(Dtype::F32, &bytes);
        let f = figures(&c, &t);
        assert_eq!(f.worst_channel, whole.worst_channel);
        assert_eq!(c.max_abs(), max_abs(&v));
        for (a, b) in [
            (f.per_tensor_sqnr_db, whole.per_tensor_sqnr_db),
            (f.per_channel_sqnr_db, whole.per_channel_sqnr_db),
            (f.worst_channel_sqnr_db, whole.worst_channel_sqnr_db),
        ] {
            assert!((a.unwrap() - b.unwrap()).abs() < 1e-3, "{a:?} {b:?}");
        }
        // A NaN is not lost.
        let mut nan = bytes.clone();
        nan[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(max_abs_f32(&nan).is_nan());
    }

    #[test]
    fn output_sums_equal_the_quantized_conv_in_f64() {
        use crate::conv::{Input, conv2d};
        // 6 output channels, 2 groups of 2 input channels, 3×3; rows 1..5 only.
        let w: Vec<f64> = (0..6 * 2 * 9)
            .map(|i| ((i * 37 % 101) as f64 / 101.0 - 0.5) * (1.0 + (i % 7) as f64))
            .collect();
        let input = Input::random(1, 4, 5, 5, 7, 0);
        let conv = ConvRows {
            weight: &w[18..5 * 18],
            first_row: 1,
            in_per_group: 2,
            kernel: (3, 3),
        };
        let cols = crate::conv::im2col(&input, (3, 3), 1);
        let mut out = crate::conv::conv_rows(&cols, conv.weight, 1..5, 2, (3, 3), 3);
        out += 0.5;
        let s = output_sums(conv, &out, &cols, 3);
        // The same by whole convs in f64: the float and the quantized weights.
        let bias = vec![0.5; 6];
        let y = conv2d(&input, &w, Some(&bias), 6, 2);
        let wq = per_channel_quantized(&w, 18);
        let yq = conv2d(&input, &wq, Some(&bias), 6, 2);
        let hw = 25;
        let (mut sig, mut noise) = (0.0, 0.0);
        for i in hw..5 * hw {
            sig += y.data[i] * y.data[i];
            noise += (y.data[i] - yq.data[i]).powi(2);
        }
        assert!((s.signal - sig).abs() < 1e-9 * sig, "{} {sig}", s.signal);
        assert!(
            (s.noise - noise).abs() < 1e-5 * noise,
            "{} {noise}",
            s.noise
        );
    }

    #[test]
    fn summary_and_gate() {
        let r = |t: f64, c: f64| Int8Report {
            per_tensor_sqnr_db: Some(t),
            per_channel_sqnr_db: Some(c),
            ..Int8Report::default()
        };
        let blocks = [
            ("a", Some(r(30.0, 40.0))),
            ("b", Some(r(10.0, 35.0))),
            ("c", None),
            ("d", Some(Int8Report::default())),
        ];
        let s = Int8Summary::of(blocks.iter().map(|(n, r)| (*n, r.as_ref()))).unwrap();
        assert_eq!(s.worst_blocks.len(), 2);
        assert_eq!(s.worst_blocks[0].name, "b");
        assert_eq!(s.min_per_tensor_sqnr_db, Some(10.0));
        assert_eq!(s.min_per_channel_sqnr_db, Some(35.0));
        let low = below(blocks.iter().map(|(n, r)| (*n, r.as_ref())), 38.0);
        assert_eq!(low, vec![("b".to_string(), 35.0)]);
    }
}
