//! The default conversion's fuse-and-check pass: fuses a block's rows straight from the file's
//! bytes and, in the same pass over the weights, measures each fused row as written against
//! its branches on a seeded random k×k input (the probe). One read of each weight, no f64 copy
//! of a whole tensor: this is what keeps conversion near the speed of a file copy.
//!
//! The probe looks at the output's centre position, where every tap of every kernel meets
//! the input: each fused weight as written is multiplied by an input value exactly once, and
//! so is each branch weight, so no weight escapes the comparison. `--verify` runs the full
//! check ([`crate::verify`]) on a larger input, borders included, with GEMMs.

use std::ops::Range;

use safetensors::Dtype;

use crate::checkpoint::{decode_into, encode};
use crate::conv::Input;
use crate::fuse::add_branch_row;
use crate::layout::Role;
use crate::verify::Deviation;

/// One branch's share of a range of output channels.
pub struct BranchRows<'a> {
    /// Identity, or a conv branch.
    pub role: Role,
    /// Kernel size of the branch's conv (1 for the identity).
    pub kernel: usize,
    /// The conv weight's raw bytes for the rows, and their dtype (absent for the identity).
    pub weight: Option<(Dtype, &'a [u8])>,
    /// Per row: the BN scale t.
    pub t: Vec<f64>,
    /// Per row: the branch's bias after BN, `β + t·(c − μ)`.
    pub shift: Vec<f64>,
}

/// Fused rows, encoded as they will be written.
pub struct FusedRows {
    /// `[rows, in/groups, k, k]` in the output dtype.
    pub weight: Vec<u8>,
    /// `[rows]` in the output dtype.
    pub bias: Vec<u8>,
    /// Fused-as-written vs unfused on the probe input.
    pub deviation: Deviation,
}

/// What stops a row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowError {
    /// A weight of branch `branch` is NaN or infinite at element `index` of the rows.
    NonFinite {
        /// Index into the branches.
        branch: usize,
        /// Element index within the rows' weight.
        index: usize,
        /// The value.
        value: f64,
    },
    /// A fused value overflows the output dtype.
    Overflow {
        /// Whether it is the bias (else the weight).
        bias: bool,
        /// Element index within the rows.
        index: usize,
        /// The value.
        value: f64,
    },
}

/// Fuses output channels `rows` of a block with in/groups `cpg`, kernel `k` and `opg` output
/// channels per group, writes them in `dtype` into `out` (cleared first; pass a reused buffer
/// to save fresh pages), and probes them on `probe`, a `1 × C × k × k` input (if given; the
/// deviation stays 0 without one).
#[allow(clippy::too_many_arguments)]
pub fn fuse_rows(
    out: Vec<u8>,
    rows: Range<usize>,
    cpg: usize,
    k: usize,
    opg: usize,
    branches: &[BranchRows],
    dtype: Dtype,
    probe: Option<&Input>,
) -> Result<FusedRows, RowError> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { fuse_rows_avx2(out, rows, cpg, k, opg, branches, dtype, probe) };
    }
    fuse_rows_any(out, rows, cpg, k, opg, branches, dtype, probe)
}

/// [`fuse_rows`] compiled for AVX2: the same code, with 4-wide f64 vectors in the inner loops.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn fuse_rows_avx2(
    out: Vec<u8>,
    rows: Range<usize>,
    cpg: usize,
    k: usize,
    opg: usize,
    branches: &[BranchRows],
    dtype: Dtype,
    probe: Option<&Input>,
) -> Result<FusedRows, RowError> {
    fuse_rows_any(out, rows, cpg, k, opg, branches, dtype, probe)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fuse_rows_any(
    mut weight: Vec<u8>,
    rows: Range<usize>,
    cpg: usize,
    k: usize,
    opg: usize,
    branches: &[BranchRows],
    dtype: Dtype,
    probe: Option<&Input>,
) -> Result<FusedRows, RowError> {
    let depth = cpg * k * k;
    let c = k / 2;
    weight.clear();
    weight.reserve(rows.len() * depth * crate::checkpoint::dtype_bytes(dtype));
    let mut out = FusedRows {
        weight,
        bias: Vec::new(),
        deviation: Deviation::default(),
    };
    let mut fused = vec![0.0; depth];
    let mut w = Vec::new();
    let mut written = Vec::new();
    let mut bias_written = Vec::new();
    for (r, o) in rows.clone().enumerate() {
        let g = o / opg;
        // The input group this row reads, `[cpg, k, k]`: at the centre output, kernel tap
        // (i, y, x) meets exactly x[g·cpg + i, y, x].
        let patch = probe.map(|x| &x.data[g * depth..(g + 1) * depth]);
        // `fused` still holds the previous row: the first full-size branch overwrites it
        // (saving a pass of zeros over every weight), anything else starts from zero.
        let mut fresh = true;
        let mut unfused = 0.0;
        let mut bias = 0.0;
        for (bi, b) in branches.iter().enumerate() {
            let (t, shift) = (b.t[r], b.shift[r]);
            bias += shift;
            match (b.role, b.weight) {
                (Role::Identity, _) | (_, None) => {
                    if std::mem::take(&mut fresh) {
                        fused.fill(0.0);
                    }
                    add_branch_row(&mut fused, o, cpg, k, 1, t, None);
                    // Output channel o reads input channel o (in == out) at the centre.
                    if let Some(x) = probe {
                        unfused += t * x.data[(o * k + c) * k + c] + shift;
                    }
                }
                (_, Some((wdtype, bytes))) => {
                    let kb = b.kernel;
                    let db = cpg * kb * kb;
                    let width = bytes.len() / (rows.len() * db).max(1);
                    decode_into(wdtype, &bytes[r * db * width..(r + 1) * db * width], &mut w);
                    // A branchless pass (vectorizes); the scan for the culprit runs only on
                    // failure.
                    let mut finite = true;
                    for v in &w {
                        finite &= v.is_finite();
                    }
                    if !finite {
                        let i = w.iter().position(|v| !v.is_finite()).unwrap_or(0);
                        return Err(RowError::NonFinite {
                            branch: bi,
                            index: r * db + i,
                            value: w[i],
                        });
                    }
                    if std::mem::take(&mut fresh) {
                        if kb == k {
                            for (f, w) in fused.iter_mut().zip(&w) {
                                *f = t * w;
                            }
                        } else {
                            fused.fill(0.0);
                            add_branch_row(&mut fused, o, cpg, k, kb, t, Some(&w));
                        }
                    } else {
                        add_branch_row(&mut fused, o, cpg, k, kb, t, Some(&w));
                    }
                    if let Some(patch) = patch {
                        // The branch's own conv, with its own (smaller) kernel at the centre.
                        let y = if kb == k {
                            dot(&w, patch)
                        } else if kb == 1 {
                            // A 1×1 kernel: one tap per input channel, at the centre.
                            let mut y = 0.0;
                            for (i, w) in w.iter().enumerate() {
                                y += w * patch[(i * k + c) * k + c];
                            }
                            y
                        } else {
                            let pad = (k - kb) / 2;
                            let mut y = 0.0;
                            for i in 0..cpg {
                                for ky in 0..kb {
                                    let row = &patch[(i * k + ky + pad) * k + pad..][..kb];
                                    y += dot(&w[(i * kb + ky) * kb..][..kb], row);
                                }
                            }
                            y
                        };
                        unfused += t * y + shift;
                    }
                }
            }
        }
        // A sum of finite branches can still overflow f64 itself; encode only sees inf then.
        let mut finite = bias.is_finite();
        for v in &fused {
            finite &= v.is_finite();
        }
        if !finite {
            return Err(match fused.iter().position(|v| !v.is_finite()) {
                Some(i) => RowError::Overflow {
                    bias: false,
                    index: r * depth + i,
                    value: fused[i],
                },
                None => RowError::Overflow {
                    bias: true,
                    index: r,
                    value: bias,
                },
            });
        }
        let before = out.weight.len();
        encode(dtype, &fused, &mut out.weight).map_err(|i| RowError::Overflow {
            bias: false,
            index: r * depth + i,
            value: fused[i],
        })?;
        let before_bias = out.bias.len();
        encode(dtype, &[bias], &mut out.bias).map_err(|_| RowError::Overflow {
            bias: true,
            index: r,
            value: bias,
        })?;
        let Some(patch) = patch else { continue };
        // The fused row as written, run on the same input.
        decode_into(dtype, &out.weight[before..], &mut written);
        decode_into(dtype, &out.bias[before_bias..], &mut bias_written);
        let fused_out = dot(&written, patch) + bias_written[0];
        out.deviation = out
            .deviation
            .merge(Deviation::of((fused_out - unfused).abs(), unfused.abs()));
    }
    Ok(out)
}

/// `Σ a[i]·b[i]`, in four interleaved sums so the adds do not wait on each other.
#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut a4 = a.chunks_exact(4);
    let mut b4 = b.chunks_exact(4);
    for (a, b) in (&mut a4).zip(&mut b4) {
        for j in 0..4 {
            acc[j] += a[j] * b[j];
        }
    }
    let mut tail = 0.0;
    for (a, b) in a4.remainder().iter().zip(b4.remainder()) {
        tail += a * b;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}
