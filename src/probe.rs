//! The default conversion's fuse-and-check pass: fuses a block's rows straight from the file's
//! bytes and, in the same pass over the weights, measures each fused row as written against
//! its branches on a tiny seeded input (the probe). One read of each weight, no f64 copy of a
//! whole tensor: this is what keeps conversion near the speed of a file copy.
//!
//! `--verify` runs the full check ([`crate::verify`]) on a larger input with GEMMs instead.

use std::ops::Range;

use safetensors::Dtype;

use crate::checkpoint::{decode_into, encode};
use crate::fuse::add_branch_row;
use crate::layout::Role;
use crate::verify::{BlockInput, Deviation};

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
/// channels per group, writes them in `dtype`, and probes them on `probe` (if given; the
/// deviation stays 0 without one).
pub fn fuse_rows(
    rows: Range<usize>,
    cpg: usize,
    k: usize,
    opg: usize,
    branches: &[BranchRows],
    dtype: Dtype,
    probe: Option<&BlockInput>,
) -> Result<FusedRows, RowError> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { fuse_rows_avx2(rows, cpg, k, opg, branches, dtype, probe) };
    }
    fuse_rows_any(rows, cpg, k, opg, branches, dtype, probe)
}

/// [`fuse_rows`] compiled for AVX2: the same code, with 4-wide f64 vectors in the inner loops.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fuse_rows_avx2(
    rows: Range<usize>,
    cpg: usize,
    k: usize,
    opg: usize,
    branches: &[BranchRows],
    dtype: Dtype,
    probe: Option<&BlockInput>,
) -> Result<FusedRows, RowError> {
    fuse_rows_any(rows, cpg, k, opg, branches, dtype, probe)
}

#[inline(always)]
fn fuse_rows_any(
    rows: Range<usize>,
    cpg: usize,
    k: usize,
    opg: usize,
    branches: &[BranchRows],
    dtype: Dtype,
    probe: Option<&BlockInput>,
) -> Result<FusedRows, RowError> {
    let depth = cpg * k * k;
    let p = probe.map_or(0, |x| x.input.positions());
    let mut out = FusedRows {
        weight: Vec::with_capacity(rows.len() * depth * crate::checkpoint::dtype_bytes(dtype)),
        bias: Vec::new(),
        deviation: Deviation::default(),
    };
    let mut fused = vec![0.0; depth];
    let mut w = Vec::new();
    let mut written = Vec::new();
    let mut bias_written = Vec::new();
    let mut branch_out = vec![0.0; p];
    let mut unfused = vec![0.0; p];
    let mut fused_out = vec![0.0; p];
    for (r, o) in rows.clone().enumerate() {
        let g = o / opg;
        // `fused` still holds the previous row: the first full-size branch overwrites it
        // (saving a pass of zeros over every weight), anything else starts from zero.
        let mut fresh = true;
        unfused.fill(0.0);
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
                    if let Some(probe) = probe {
                        // Output channel o reads input channel o (in == out).
                        let channels = probe.cols(1);
                        let x = &channels.as_slice().expect(STANDARD)[o * p..(o + 1) * p];
                        for (u, x) in unfused.iter_mut().zip(x) {
                            *u += t * x + shift;
                        }
                    }
                }
                (_, Some((wdtype, bytes))) => {
                    let kb = b.kernel;
                    let db = cpg * kb * kb;
                    let width = bytes.len() / (rows.len() * db).max(1);
                    decode_into(wdtype, &bytes[r * db * width..(r + 1) * db * width], &mut w);
                    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
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
                    if let Some(probe) = probe {
                        let cols = probe.cols(kb);
                        let cols = &cols.as_slice().expect(STANDARD)[g * db * p..(g + 1) * db * p];
                        dot_cols(&w, cols, &mut branch_out);
                        for (u, y) in unfused.iter_mut().zip(&branch_out) {
                            *u += t * y + shift;
                        }
                    }
                }
            }
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
        let Some(probe) = probe else { continue };
        // The fused row as written, run on the same input.
        decode_into(dtype, &out.weight[before..], &mut written);
        decode_into(dtype, &out.bias[before_bias..], &mut bias_written);
        let cols = probe.cols(k);
        let cols = &cols.as_slice().expect(STANDARD)[g * depth * p..(g + 1) * depth * p];
        dot_cols(&written, cols, &mut fused_out);
        let mut max_abs: f64 = 0.0;
        let mut max_out: f64 = 0.0;
        for (f, u) in fused_out.iter().zip(&unfused) {
            max_abs = max_abs.max((f + bias_written[0] - u).abs());
            max_out = max_out.max(u.abs());
        }
        out.deviation = out.deviation.merge(Deviation::of(max_abs, max_out));
    }
    Ok(out)
}

const STANDARD: &str = "im2col matrices are standard layout";

/// `acc[j] = Σ_i w[i] · cols[i·P + j]` for the P = `acc.len()` probe positions.
#[inline(always)]
fn dot_cols(w: &[f64], cols: &[f64], acc: &mut [f64]) {
    let p = acc.len();
    acc.fill(0.0);
    if p == 4 {
        // The probe of a 3×3 kernel: four positions, kept in registers.
        let mut a = [0.0f64; 4];
        for (wi, c) in w.iter().zip(cols.chunks_exact(4)) {
            a[0] += wi * c[0];
            a[1] += wi * c[1];
            a[2] += wi * c[2];
            a[3] += wi * c[3];
        }
        acc.copy_from_slice(&a);
        return;
    }
    for (wi, c) in w.iter().zip(cols.chunks_exact(p)) {
        for (a, c) in acc.iter_mut().zip(c) {
            *a += wi * c;
        }
    }
}
