//! Each op's forward pass, for verification: every source run on a real input (a GEMM),
//! then each per-channel op applied to the outputs in the framework's order — the BN as a BN,
//! never through a composed α/β — so the check does not depend on the fusion algebra.

use std::ops::Range;

use ndarray::{Array2, Zip, s};

use crate::block::values::{BatchNorm, ChannelOp, ChannelValues, OrepaValues, Sequence};
use crate::block::{Block, Branch, Op};
use crate::conv::{BlockInput, conv_rows};

/// A branch's conv weights for some rows, with the kernel `(kh, kw)`.
pub type SourceWeights = (Vec<f64>, (usize, usize));

/// The unfused block's output for output channels `rows`: each branch's source run on `x`,
/// then its per-channel ops applied to the outputs one by one (BN as a BN), times its
/// coefficient; summed; then the post-ops. `sources` holds each branch's conv weights for the
/// rows with their kernel `(kh, kw)` (f64, `None` for a source without weights). An input BN
/// is applied to the input, as a BN, before the branch's conv.
pub fn forward_unfused(
    block: &Block,
    values: &ChannelValues,
    sources: &[Option<SourceWeights>],
    x: &BlockInput,
) -> Array2<f64> {
    let rows = values.rows.clone();
    let mut out = Array2::<f64>::zeros((rows.len(), x.input.positions()));
    let branches = block
        .branches
        .iter()
        .zip(&values.branches)
        .zip(&values.inputs);
    let extra = values
        .sequences
        .iter()
        .zip(&values.conv_fc)
        .zip(&values.generated);
    for ((((branch, (coef, ops)), input), w), ((seq, fc), computed)) in
        branches.zip(sources).zip(extra)
    {
        let w = w.as_ref().map(|(w, hw)| (w.as_slice(), *hw));
        let mut y = match (computed, fc, seq, input) {
            (Some(v), ..) => forward_orepa(block, v, x, rows.clone()),
            (None, Some(fc), ..) => forward_conv_fc(block, fc, x, rows.clone()),
            (None, None, Some(seq), _) => forward_sequence(block, branch, seq, w, x, rows.clone()),
            (None, None, None, Some(bn)) => forward_input_bn(block, bn, w, x, rows.clone()),
            (None, None, None, None) => forward_source(block, branch, w, x, rows.clone()),
        };
        for op in ops {
            forward_channel_op(op, &mut y);
        }
        out.scaled_add(*coef, &y);
    }
    for op in &values.post {
        forward_channel_op(op, &mut out);
    }
    out
}

/// A sequence branch, as DBB and RepNeXt run it: the first conv on the (zero-padded) input,
/// its per-channel ops (a BN), the map padded by what those ops make of zero (BNAndPad), then
/// the second conv (or the average) without padding; for output channels `rows`.
fn forward_sequence(
    block: &Block,
    branch: &Branch,
    seq: &Sequence,
    second: Option<(&[f64], (usize, usize))>,
    x: &BlockInput,
    rows: Range<usize>,
) -> Array2<f64> {
    let groups = block.groups.unwrap_or(1).max(1);
    let ipg = block.in_per_group;
    let cols1 = x.cols(seq.first_hw, 1);
    let mut mid = conv_rows(
        &cols1,
        &seq.first,
        0..seq.mid,
        ipg,
        seq.first_hw,
        seq.mid / groups,
    );
    let mut pad = Array2::<f64>::zeros((seq.mid, 1));
    for op in &seq.ops {
        forward_channel_op(op, &mut mid);
        forward_channel_op(op, &mut pad);
    }
    let (side, second) = match (branch.second(), second) {
        (Some(Op::ThenAvgPool { kernel }), _) => (*kernel, None),
        (_, Some((k2, hw))) => (hw.0.max(hw.1), Some((k2, hw))),
        _ => (1, None),
    };
    let pad: Vec<f64> = pad.column(0).to_vec();
    let padded = pad_with(&mid, &pad, &x.input, side / 2);
    // Each conv runs as itself (a kh×kw one with its own same padding) on the padded map.
    let full = match second {
        Some((k2, hw)) => {
            let cols = crate::conv::im2col(&padded, hw, 1);
            let mpg = k2.len() / (rows.len() * hw.0 * hw.1).max(1);
            conv_rows(&cols, k2, rows.clone(), mpg, hw, block.out_per_group())
        }
        None => {
            let cols = crate::conv::im2col(&padded, (side, side), 1);
            let kk = side * side;
            let mut y = Array2::<f64>::zeros((rows.len(), cols.ncols()));
            for (r, o) in rows.clone().enumerate() {
                let window = cols.slice(s![o * kk..(o + 1) * kk, ..]);
                y.row_mut(r).assign(&window.sum_axis(ndarray::Axis(0)));
            }
            y / kk as f64
        }
    };
    // The valid part: outputs centred on the unpadded positions.
    let (n, h, w, p) = (x.input.n, x.input.h, x.input.w, side / 2);
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let mut y = Array2::<f64>::zeros((rows.len(), n * h * w));
    for img in 0..n {
        for yy in 0..h {
            for xx in 0..w {
                let from = (img * hp + yy + p) * wp + xx + p;
                y.column_mut((img * h + yy) * w + xx)
                    .assign(&full.column(from));
            }
        }
    }
    y
}

/// A conv over each group's patch, as RepMLP runs it: at every position of the input, each
/// group's `in/groups` = h·w values are an h×w image (h = w), convolved with that group's
/// k×k kernel `kernel` (side `k`) with zero padding; output `g·hw + y·w + x` is the result at
/// (y, x) of group g's image. For output channels `rows`.
fn forward_conv_fc(
    block: &Block,
    (kernel, k): &(Vec<f64>, usize),
    x: &BlockInput,
    rows: Range<usize>,
) -> Array2<f64> {
    let hw = block.in_per_group;
    let side = (1..=hw).find(|s| s * s >= hw).unwrap_or(1);
    let (k, opg) = (*k, hw.max(1));
    let cols = x.cols((1, 1), 1);
    let mut y = Array2::<f64>::zeros((rows.len(), cols.ncols()));
    for (r, o) in rows.enumerate() {
        let (g, oy, ox) = (o / opg, o % opg / side, o % opg % side);
        for dy in 0..k {
            for dx in 0..k {
                // The input pixel this tap meets, inside the patch (else the zero padding).
                let (iy, ix) = ((oy + dy).wrapping_sub(k / 2), (ox + dx).wrapping_sub(k / 2));
                if iy >= side || ix >= side {
                    continue;
                }
                let tap = kernel[(g * k + dy) * k + dx];
                let input = cols.row(g * hw + iy * side + ix);
                y.row_mut(r).scaled_add(tap, &input);
            }
        }
    }
    y
}

/// OREPA's six branches run on `x` through their feature maps, as convolutions (not as the
/// kernel `weight_gen()` composes), each times `vector[j]`, summed; for output channels `rows`.
/// The 1×1 ⊗ k×k branches are a 1×1 conv then each row's own k×k filter; `conv2 ∘ first` is
/// the internal map then conv2; the separable one the depthwise map then the pointwise rows.
fn forward_orepa(
    block: &Block,
    v: &OrepaValues,
    x: &BlockInput,
    rows: Range<usize>,
) -> Array2<f64> {
    let (ipg, opg, k, groups) = (block.in_per_group, block.out_per_group(), v.k, v.groups);
    let kk = k * k;
    let (cols1, colsk) = (x.cols((1, 1), 1), x.cols((k, k), 1));
    let conv1 = |w: &[f64]| conv_rows(&cols1, w, rows.clone(), ipg, (1, 1), opg);
    // Row r of `map` filtered by its own k×k filter (zero padded).
    let filtered = |map: &Array2<f64>, filters: &[f64]| {
        let images = pad_with(map, &[], &x.input, 0);
        conv_rows(
            &crate::conv::im2col(&images, (k, k), 1),
            filters,
            0..map.nrows(),
            1,
            (k, k),
            1,
        )
    };
    let n = rows.len();
    let avg: Vec<f64> = (0..n).flat_map(|_| v.avg_avg.iter().copied()).collect();
    let mid_t = v.first.len() / ipg.max(1);
    let mid = conv_rows(&cols1, &v.first, 0..mid_t, ipg, (1, 1), mid_t / groups);
    let mid = crate::conv::im2col(&pad_with(&mid, &[], &x.input, 0), (k, k), 1);
    let expand = v.dw.len() / (kk * ipg * groups).max(1);
    let dw = conv_rows(&colsk, &v.dw, 0..expand * ipg * groups, 1, (k, k), expand);
    let pw: Vec<f64> = rows
        .clone()
        .flat_map(|o| {
            let row = (o % opg) * groups + o / opg;
            v.pw[row * expand * ipg..(row + 1) * expand * ipg]
                .iter()
                .copied()
        })
        .collect();
    let branches = [
        conv_rows(&colsk, &v.origin, rows.clone(), ipg, (k, k), opg),
        filtered(&conv1(&v.avg_conv), &avg),
        filtered(&conv1(&v.pfir_conv), &v.prior),
        conv_rows(&mid, &v.conv2, rows.clone(), mid_t / groups, (k, k), opg),
        conv1(&v.one),
        conv_rows(&dw, &pw, rows.clone(), expand * ipg, (1, 1), opg),
    ];
    let mut out = Array2::<f64>::zeros((n, x.input.positions()));
    for (j, y) in branches.iter().enumerate() {
        for (r, (mut o, y)) in out.rows_mut().into_iter().zip(y.rows()).enumerate() {
            o.scaled_add(v.vector[j][r], &y);
        }
    }
    out
}

/// `map` (`[c, n·h·w]` over `like`'s images) as images padded by `p` on every side, channel m's
/// border filled with `value[m]`.
fn pad_with(
    map: &Array2<f64>,
    value: &[f64],
    like: &crate::conv::Input,
    p: usize,
) -> crate::conv::Input {
    let (n, c, h, w) = (like.n, map.nrows(), like.h, like.w);
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let mut data = vec![0.0; n * c * hp * wp];
    for img in 0..n {
        for m in 0..c {
            let plane = &mut data[(img * c + m) * hp * wp..(img * c + m + 1) * hp * wp];
            plane.fill(value.get(m).copied().unwrap_or(0.0));
            for y in 0..h {
                for xx in 0..w {
                    plane[(y + p) * wp + xx + p] = map[[m, (img * h + y) * w + xx]];
                }
            }
        }
    }
    crate::conv::Input {
        n,
        c,
        h: hp,
        w: wp,
        data,
    }
}

/// A 1×1 conv (or Linear) after a BN on its input: the BN applied to every input channel
/// as a BN, then the conv.
fn forward_input_bn(
    block: &Block,
    bn: &BatchNorm,
    weight: Option<(&[f64], (usize, usize))>,
    x: &BlockInput,
    rows: Range<usize>,
) -> Array2<f64> {
    let mut cols = x.cols((1, 1), 1).into_owned();
    for (c, mut row) in cols.rows_mut().into_iter().enumerate() {
        let (t, s) = bn_row(bn, c % bn.var.len().max(1));
        Zip::from(&mut row).for_each(|v| *v = t * *v + s);
    }
    let w = weight.map_or(&[][..], |(w, _)| w);
    conv_rows(
        &cols,
        w,
        rows,
        block.in_per_group,
        (1, 1),
        block.out_per_group(),
    )
}

/// A branch's source op on `x`, for output channels `rows`: `[rows, n·h·w]`.
fn forward_source(
    block: &Block,
    branch: &Branch,
    weight: Option<(&[f64], (usize, usize))>,
    x: &BlockInput,
    rows: Range<usize>,
) -> Array2<f64> {
    match (branch.source(), weight) {
        // A kh×kw kernel runs as itself, same-padded by (kh − 1)/2 and (kw − 1)/2.
        (Op::Conv { dilation, .. }, Some((w, k))) => x.conv(
            w,
            rows,
            block.in_per_group,
            (k, *dilation),
            block.out_per_group(),
        ),
        (Op::AvgPool { kernel }, _) => {
            // Channel o's window: rows o·k²..(o+1)·k² of the k×k im2col, averaged.
            let cols = x.cols((*kernel, *kernel), 1);
            let kk = kernel * kernel;
            let mut y = Array2::<f64>::zeros((rows.len(), cols.ncols()));
            for (r, o) in rows.enumerate() {
                let window = cols.slice(s![o * kk..(o + 1) * kk, ..]);
                y.row_mut(r).assign(&window.sum_axis(ndarray::Axis(0)));
            }
            y / kk as f64
        }
        // The identity reads input channel o for output channel o.
        _ => x.cols((1, 1), 1).slice(s![rows, ..]).to_owned(),
    }
}

/// A per-channel op applied to outputs `y` (`[rows, positions]`).
fn forward_channel_op(op: &ChannelOp, y: &mut Array2<f64>) {
    for (r, mut row) in y.rows_mut().into_iter().enumerate() {
        match op {
            ChannelOp::Bias(c) => row += c[r],
            ChannelOp::Scale(g) => row *= g[r],
            ChannelOp::ScaleShift { scale, shift } => {
                Zip::from(&mut row).for_each(|v| *v = scale[r] * *v + shift[r]);
            }
            ChannelOp::Bn(bn) => {
                let (t, s) = bn_row(bn, r);
                Zip::from(&mut row).for_each(|v| *v = t * *v + s);
            }
        }
    }
}

/// BN `r`'s `(γ/√(σ² + ε), β − μ·γ/√(σ² + ε))`.
fn bn_row(bn: &BatchNorm, r: usize) -> (f64, f64) {
    let t = bn.gamma[r] / (bn.var[r] + bn.eps).sqrt();
    (t, bn.beta[r] - t * bn.mean[r])
}
