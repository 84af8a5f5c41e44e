//! Running a block both ways — each branch conv then BN, summed (unfused), and the one fused
//! conv — on the same seeded random input, and measuring how far apart the outputs are.

use std::collections::BTreeMap;

use ndarray::{Array2, Zip};
use serde::Serialize;

use crate::block::Block;
use crate::conv::{Input, conv_rows, im2col};
use crate::fuse::{BlockValues, FusedConv};

/// How far the fused output is from the unfused one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Deviation {
    /// max |fused − unfused| over every output element.
    pub max_abs: f64,
    /// `max_abs / max |unfused|` (0 when the unfused output is all zero).
    pub max_rel: f64,
    /// max |unfused|: the scale the relative deviation is taken against.
    pub max_abs_output: f64,
}

impl Deviation {
    /// The deviation given max |fused − unfused| and max |unfused|.
    pub fn of(max_abs: f64, max_abs_output: f64) -> Deviation {
        Deviation {
            max_abs,
            max_rel: relative(max_abs, max_abs_output),
            max_abs_output,
        }
    }

    /// The deviation over the union of two sets of outputs.
    pub fn merge(self, other: Deviation) -> Deviation {
        let max_abs = nan_max(self.max_abs, other.max_abs);
        let max_abs_output = nan_max(self.max_abs_output, other.max_abs_output);
        Deviation {
            max_abs,
            max_rel: relative(max_abs, max_abs_output),
            max_abs_output,
        }
    }

    /// Whether the deviation is within `atol + rtol · max|unfused|`.
    pub fn within(&self, atol: f64, rtol: f64) -> bool {
        // Written so that NaN fails.
        self.max_abs <= atol + rtol * self.max_abs_output
    }
}

/// `max` that keeps a NaN instead of dropping it: a NaN deviation must fail, not vanish.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn relative(abs: f64, scale: f64) -> f64 {
    if scale > 0.0 {
        abs / scale
    } else if abs > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// The input a block is run on, and its im2col matrices by kernel size.
pub struct BlockInput {
    /// The input images.
    pub input: Input,
    cols: BTreeMap<usize, Array2<f64>>,
}

impl BlockInput {
    /// A seeded random input for `block`: `batch` images of `h×w`, with as many channels as
    /// the block reads (in/groups × groups; in/groups alone when groups are unknown, which
    /// computes the same for the comparison). `stream` keeps blocks' inputs independent.
    pub fn new(block: &Block, batch: usize, h: usize, w: usize, seed: u64, stream: u64) -> Self {
        let c = block.in_channels().unwrap_or(block.in_per_group);
        let input = Input::random(batch, c, h, w, seed, stream);
        let mut kernels: Vec<usize> = vec![1, block.kernel];
        kernels.dedup();
        let mut cols = BTreeMap::new();
        for k in kernels {
            cols.insert(k, im2col(&input, k));
        }
        BlockInput { input, cols }
    }

    /// The im2col matrix of the input for a k×k kernel (computed on demand for a k not cached).
    pub fn cols(&self, k: usize) -> std::borrow::Cow<'_, Array2<f64>> {
        match self.cols.get(&k) {
            Some(c) => std::borrow::Cow::Borrowed(c),
            None => std::borrow::Cow::Owned(im2col(&self.input, k)),
        }
    }
}

/// The unfused block's output for the rows of `values`: Σ over branches of BN(conv(x) + c).
pub fn unfused(
    values: &BlockValues,
    x: &BlockInput,
    out_per_group: usize,
    eps: f64,
) -> Array2<f64> {
    let rows = values.rows.clone();
    let p = x.input.positions();
    let mut out = Array2::<f64>::zeros((rows.len(), p));
    for branch in &values.branches {
        let (t, shift) = branch.affine(rows.len(), eps);
        let y = match &branch.weight {
            Some(w) => conv_rows(
                &x.cols(branch.kernel),
                w,
                rows.clone(),
                values.in_per_group,
                branch.kernel,
                out_per_group,
            ),
            // The identity reads input channel o for output channel o.
            None => x.cols(1).slice(ndarray::s![rows.clone(), ..]).to_owned(),
        };
        for (r, mut row) in out.rows_mut().into_iter().enumerate() {
            Zip::from(&mut row)
                .and(y.row(r))
                .for_each(|o, &v| *o += t[r] * v + shift[r]);
        }
    }
    out
}

/// The fused conv's output for its rows.
pub fn fused(conv: &FusedConv, x: &BlockInput, out_per_group: usize) -> Array2<f64> {
    let mut y = conv_rows(
        &x.cols(conv.kernel),
        &conv.weight,
        conv.rows.clone(),
        conv.in_per_group,
        conv.kernel,
        out_per_group,
    );
    for (r, mut row) in y.rows_mut().into_iter().enumerate() {
        row += conv.bias[r];
    }
    y
}

/// Deviation between two outputs of the same shape; `reference` is the unfused one.
pub fn deviation(reference: &Array2<f64>, candidate: &Array2<f64>) -> Deviation {
    let mut max_abs: f64 = 0.0;
    let mut max_out: f64 = 0.0;
    Zip::from(reference).and(candidate).for_each(|&r, &c| {
        max_abs = nan_max(max_abs, (c - r).abs());
        max_out = nan_max(max_out, r.abs());
    });
    Deviation {
        max_abs,
        max_rel: relative(max_abs, max_out),
        max_abs_output: max_out,
    }
}
