//! Property: for any block — output channels, input channels per group, groups (in == out when
//! there is an identity), kernel 1/3/5/7 with a 1×1 branch, several k×k branches (smaller ones
//! dilated now and then), conv biases or not, any BN statistics with σ² ≥ 0, branch
//! coefficients (a subtracted branch), a layer scale, a scalar (alpha), an average-pool branch, a BN after the
//! sum, kh×kw branches (ACNet's k×1 and 1×k), a BN on the input of the 1×1 branch (a
//! NormLinear), a DBB-style sequence (1×1 conv, BN, then a k×k conv or average over the map
//! padded with what the BN makes of zero) — the fused conv applied to a random input equals the sum of the branches applied
//! separately, to f64 rounding.
//!
//! The reference is an independent direct convolution written here (loops over every tap,
//! each branch with its own kernel, dilation and padding, then its BN), not the crate's
//! fusion or conv. What is tested is the one fusion routine the converter ships
//! ([`fuse_rows`]), fed as the converter feeds it: raw weight bytes and the composed
//! per-channel affines.

use proptest::prelude::*;
use proptest::sample::select;
use repvgg_fuse::block::Role;
use repvgg_fuse::block::values::{BatchNorm, ChannelOp, Sequence};
use repvgg_fuse::conv::Input;
use repvgg_fuse::deviation::Deviation;
use repvgg_fuse::dtype::decode;
use repvgg_fuse::fuse::compose::{Affine, compose_rows};
use repvgg_fuse::fuse::rows::{FuseJob, Grid, Kernel, Term, fuse_rows};
use safetensors::Dtype;

/// One branch's values, as a framework's module holds them.
#[derive(Debug, Clone)]
struct BranchValues {
    /// Kernel height (1 for the identity, the window for a pool).
    kernel: usize,
    /// Kernel width (`kernel` but for ACNet-style k×1 / 1×k branches).
    kernel_w: usize,
    /// A BN on the input before the conv (1×1, one group only), per input channel.
    input_bn: Option<BatchNorm>,
    dilation: usize,
    /// `[out, cpg, kernel, kernel]`; `None` for the identity or a pool.
    weight: Option<Vec<f64>>,
    /// An average pool of this side instead of a conv (in == out, like the identity).
    pool: Option<usize>,
    conv_bias: Option<Vec<f64>>,
    bn: Option<BatchNorm>,
    /// A layer scale after the BN.
    scale: Option<Vec<f64>>,
    /// One scalar on the whole branch after that (super-gradients' `alpha`: `Op::Scalar`,
    /// loaded as the per-channel scale broadcast).
    alpha: Option<f64>,
    /// A sequence's first stage: `weight` is then the second conv `[out, mpg, k, k]` (or
    /// `None` for an average, mid == out).
    seq: Option<SeqValues>,
    coef: f64,
}

/// The first stage of a DBB-style sequence branch.
#[derive(Debug, Clone)]
struct SeqValues {
    /// `[mid, cpg]`, 1×1.
    first: Vec<f64>,
    /// BN over the mid channels.
    bn: BatchNorm,
    /// Mid channels per group.
    mpg: usize,
}

/// A block: branches, then optionally a BN on their sum.
#[derive(Debug, Clone)]
struct BlockValues {
    branches: Vec<BranchValues>,
    post: Option<BatchNorm>,
}

/// A fused conv.
struct FusedConv {
    kernel: usize,
    weight: Vec<f64>,
    bias: Vec<f64>,
}

/// The block's shape.
#[derive(Debug, Clone)]
struct Shape {
    groups: usize,
    /// Input channels per group.
    cpg: usize,
    /// Output channels per group.
    opg: usize,
    /// The block's kernel: the largest branch kernel.
    k: usize,
    /// (kh, kw, dilation) of each k×k branch: one is `k`×`k`; MobileOne-style extra branches
    /// may be smaller odd sizes (zero-padded like the 1×1), UniRepLKNet-style ones dilated,
    /// ACNet-style ones k×1 or 1×k, and the largest need not come first.
    kxk: Vec<(usize, usize, usize)>,
    scale: bool,
    identity: bool,
    /// An average-pool branch of this side (only with in == out).
    pool: Option<usize>,
    /// A sequence branch: (second kernel side, mid channels per group, an average instead).
    seq: Option<(usize, usize, bool)>,
    h: usize,
    w: usize,
}

impl Shape {
    fn out(&self) -> usize {
        self.groups * self.opg
    }

    fn cin(&self) -> usize {
        self.groups * self.cpg
    }

    /// (role, kh, kw, dilation) of every conv branch.
    fn conv_branches(&self) -> Vec<(Role, usize, usize, usize)> {
        let mut v: Vec<_> = self
            .kxk
            .iter()
            .map(|&(kh, kw, d)| (Role::Kxk, kh, kw, d))
            .collect();
        if self.scale {
            v.push((Role::Pointwise, 1, 1, 1));
        }
        v
    }
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        1..=3usize,
        1..=3usize,
        1..=3usize,
        select(vec![1usize, 3, 5, 7]),
        any::<bool>(),
        any::<bool>(),
        1..=7usize,
        1..=7usize,
    )
        .prop_flat_map(|(groups, cpg, opg, k, scale, identity, h, w)| {
            let odd: Vec<usize> = (1..=k).step_by(2).collect();
            // A dilated branch: taps 2 apart where its extent still fits the block's kernel.
            // Or an asymmetric one: kb×1 or 1×kb.
            let extra_branch = move |kb: usize, d: bool, form: usize| match form {
                1 => (kb, 1, 1),
                2 => (1, kb, 1),
                _ => (kb, kb, if d && 2 * kb - 1 <= k { 2 } else { 1 }),
            };
            let extra = proptest::collection::vec(
                (select(odd), any::<bool>(), 0..4usize)
                    .prop_map(move |(kb, d, form)| extra_branch(kb, d, form)),
                0..=2,
            );
            let pools: Vec<usize> = [1, 3].into_iter().filter(|&p| p <= k).collect();
            (
                Just((groups, cpg, opg, k, scale, identity, h, w)),
                extra,
                0..3usize,
                proptest::option::weighted(0.3, select(pools)),
                proptest::option::weighted(
                    0.3,
                    (
                        select((1..=k).step_by(2).collect::<Vec<_>>()),
                        1..=3usize,
                        any::<bool>(),
                    ),
                ),
            )
        })
        .prop_map(
            |((groups, cpg, opg, k, scale, identity, h, w), extra, at, pool, seq)| {
                let mut kxk = extra;
                kxk.insert(at.min(kxk.len()), (k, k, 1));
                let pool = pool.filter(|_| identity);
                Shape {
                    pool,
                    seq,
                    groups,
                    cpg,
                    // The identity maps channel o to channel o: in == out.
                    opg: if identity { cpg } else { opg },
                    k,
                    kxk,
                    scale,
                    identity,
                    h,
                    w,
                }
            },
        )
}

fn values(n: usize, range: std::ops::Range<f64>) -> impl Strategy<Value = Vec<f64>> {
    proptest::collection::vec(range, n)
}

fn batch_norm(n: usize) -> impl Strategy<Value = BatchNorm> {
    // σ² ≥ 0, exactly 0 now and then (dead channels exist in real checkpoints).
    let var = proptest::collection::vec(prop_oneof![1 => Just(0.0), 4 => 0.0..4.0f64], n);
    (
        values(n, -2.0..2.0),
        values(n, -2.0..2.0),
        values(n, -2.0..2.0),
        var,
    )
        .prop_map(|(gamma, beta, mean, var)| BatchNorm {
            gamma,
            beta,
            mean,
            var,
            // The case's ε is set on every BN once it is drawn (see `case`).
            eps: 0.0,
        })
}

/// A block with its values, an input, a BN ε, a row to split the fusion at, and the dtype
/// the conv weights are stored in (their values are rounded to it).
#[derive(Debug, Clone)]
struct Case {
    shape: Shape,
    block: BlockValues,
    x: Vec<f64>,
    eps: f64,
    split: usize,
    stored: Dtype,
}

/// A conv branch with a `kh`×`kw` kernel, taps `d` apart; with a BN on its input now and
/// then where `input_bn` allows one.
fn conv_branch(
    out: usize,
    cpg: usize,
    (kh, kw, d): (usize, usize, usize),
    allow_input_bn: bool,
) -> BoxedStrategy<BranchValues> {
    (
        values(out * cpg * kh * kw, -1.0..1.0),
        proptest::option::of(values(out, -1.0..1.0)),
        proptest::option::weighted(0.9, batch_norm(out)),
        proptest::option::weighted(0.2, values(out, -2.0..2.0)),
        select(vec![1.0, 1.0, -1.0, 0.5]),
        proptest::option::weighted(0.4, batch_norm(cpg)),
        proptest::option::weighted(0.2, 0.25..1.75f64),
    )
        .prop_map(
            move |(weight, conv_bias, bn, scale, coef, input_bn, alpha)| BranchValues {
                kernel: kh,
                kernel_w: kw,
                input_bn: input_bn.filter(|_| allow_input_bn),
                dilation: d,
                weight: Some(weight),
                pool: None,
                conv_bias,
                bn,
                scale,
                alpha,
                seq: None,
                coef,
            },
        )
        .boxed()
}

/// A sequence branch: 1×1 conv `[mid, cpg]`, BN over mid, then a `kb`×`kb` conv `[out, mpg,
/// kb, kb]` (or, with `avg`, a `kb`×`kb` average: mid == out), then a BN.
fn seq_branch(s: &Shape, kb: usize, mpg: usize, avg: bool) -> BoxedStrategy<BranchValues> {
    let (out, cpg) = (s.out(), s.cpg);
    let mpg = if avg { s.opg } else { mpg };
    let mid = s.groups * mpg;
    (
        values(mid * cpg, -1.0..1.0),
        batch_norm(mid),
        values(out * mpg * kb * kb, -1.0..1.0),
        proptest::option::weighted(0.9, batch_norm(out)),
        select(vec![1.0, -1.0, 0.5]),
    )
        .prop_map(move |(first, mid_bn, second, bn, coef)| BranchValues {
            kernel: kb,
            kernel_w: kb,
            input_bn: None,
            dilation: 1,
            weight: (!avg).then_some(second),
            pool: avg.then_some(kb),
            conv_bias: None,
            bn,
            scale: None,
            alpha: None,
            seq: Some(SeqValues {
                first,
                bn: mid_bn,
                mpg,
            }),
            coef,
        })
        .boxed()
}

/// The identity branch (a BN on the input), or an average pool then a BN.
fn skip_branch(out: usize, pool: Option<usize>) -> BoxedStrategy<BranchValues> {
    (batch_norm(out), select(vec![1.0, -1.0]))
        .prop_map(move |(bn, coef)| BranchValues {
            kernel: pool.unwrap_or(1),
            kernel_w: pool.unwrap_or(1),
            input_bn: None,
            dilation: 1,
            weight: None,
            pool,
            conv_bias: None,
            bn: Some(bn),
            scale: None,
            alpha: None,
            seq: None,
            coef,
        })
        .boxed()
}

fn case() -> impl Strategy<Value = Case> {
    shape().prop_flat_map(|s| {
        let (out, cpg) = (s.out(), s.cpg);
        let mut branches: Vec<BoxedStrategy<BranchValues>> = s
            .conv_branches()
            .into_iter()
            .map(|(role, kh, kw, d)| {
                let input_bn = role == Role::Pointwise && s.groups == 1;
                conv_branch(out, cpg, (kh, kw, d), input_bn)
            })
            .collect();
        if s.identity {
            branches.push(skip_branch(out, None));
        }
        if let Some((kb, mpg, avg)) = s.seq {
            branches.push(seq_branch(&s, kb, mpg, avg));
        }
        if let Some(side) = s.pool {
            branches.push(skip_branch(out, Some(side)));
        }
        (
            Just(s.clone()),
            branches,
            proptest::option::weighted(0.3, batch_norm(out)),
            values(s.cin() * s.h * s.w, -1.0..1.0),
            select(vec![1e-5, 1e-3]),
            0..=out,
            select(vec![Dtype::F32, Dtype::F64]),
        )
            .prop_map(|(shape, mut branches, mut post, x, eps, split, stored)| {
                // Each BN carries the ε it normalizes with; one ε per case.
                for b in &mut branches {
                    let bns = [
                        b.input_bn.as_mut(),
                        b.bn.as_mut(),
                        b.seq.as_mut().map(|q| &mut q.bn),
                    ];
                    bns.into_iter().flatten().for_each(|bn| bn.eps = eps);
                }
                post.iter_mut().for_each(|bn| bn.eps = eps);
                if stored == Dtype::F32 {
                    for b in &mut branches {
                        for v in b.weight.iter_mut().flatten() {
                            *v = f64::from(*v as f32);
                        }
                    }
                }
                Case {
                    shape,
                    block: BlockValues { branches, post },
                    x,
                    eps,
                    split,
                    stored,
                }
            })
    })
}

/// Direct grouped convolution of `x` (`[cin, h, w]`), stride 1, same padding, no bias, with
/// `weight` `[out, cpg, kh, kw]` and taps `d` apart; also returns Σ|w|·xm per output (xm: the
/// input's magnitude) for the rounding bound.
fn direct_conv_m(
    s: &Shape,
    (x, xm): (&[f64], &[f64]),
    weight: &[f64],
    (kh, kw): (usize, usize),
    d: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (out, cpg, h, w) = (s.out(), s.cpg, s.h, s.w);
    let opg = out / s.groups;
    let (pad_y, pad_x) = (((kh - 1) * d / 2) as isize, ((kw - 1) * d / 2) as isize);
    let mut y = vec![0.0; out * h * w];
    let mut mag = vec![0.0; out * h * w];
    for o in 0..out {
        let g = o / opg;
        for oy in 0..h {
            for ox in 0..w {
                let (mut acc, mut m) = (0.0, 0.0);
                for i in 0..cpg {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = oy as isize + (ky * d) as isize - pad_y;
                            let ix = ox as isize + (kx * d) as isize - pad_x;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let at = ((g * cpg + i) * h + iy as usize) * w + ix as usize;
                            let wt = weight[((o * cpg + i) * kh + ky) * kw + kx];
                            acc += wt * x[at];
                            m += wt.abs() * xm[at];
                        }
                    }
                }
                y[(o * h + oy) * w + ox] = acc;
                mag[(o * h + oy) * w + ox] = m;
            }
        }
    }
    (y, mag)
}

fn direct_conv(s: &Shape, x: &[f64], weight: &[f64], kb: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    let xm: Vec<f64> = x.iter().map(|v| v.abs()).collect();
    direct_conv_m(s, (x, &xm), weight, (kb, kb), d)
}

/// The input through a BN per input channel (`[cin, h, w]`), straight from the formula, and
/// its magnitude |γ·x/√(σ² + ε)| + |β − γ·μ/√(σ² + ε)| (what the fused weights see).
fn input_through_bn(s: &Shape, x: &[f64], n: &BatchNorm, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let hw = s.h * s.w;
    let mut y = x.to_vec();
    let mut m = x.to_vec();
    for (i, (v, mv)) in y.iter_mut().zip(&mut m).enumerate() {
        let c = i / hw;
        let d = (n.var[c] + eps).sqrt();
        *v = n.gamma[c] * (*v - n.mean[c]) / d + n.beta[c];
        *mv = (n.gamma[c] * *mv / d).abs() + (n.beta[c] - n.gamma[c] * n.mean[c] / d).abs();
    }
    (y, m)
}

/// A sequence branch straight from its definition: the 1×1 conv, the BN, the map padded with
/// the BN's value at zero (DBB's BNAndPad), then the second conv or the average, unpadded.
fn direct_sequence(s: &Shape, c: &Case, b: &BranchValues, q: &SeqValues) -> (Vec<f64>, Vec<f64>) {
    let (h, w, cpg, kb) = (s.h, s.w, s.cpg, b.kernel);
    let mid = s.groups * q.mpg;
    let p = kb / 2;
    // The mid map and its magnitude, padded: index (m, y + p, x + p).
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let mut z = vec![0.0; mid * hp * wp];
    let mut zm = vec![0.0; mid * hp * wp];
    for m in 0..mid {
        let g = m / q.mpg;
        let d = (q.bn.var[m] + c.eps).sqrt();
        let zero = q.bn.beta[m] - q.bn.gamma[m] * q.bn.mean[m] / d;
        for y in 0..hp {
            for x in 0..wp {
                let at = (m * hp + y) * wp + x;
                if y < p || x < p || y >= h + p || x >= w + p {
                    (z[at], zm[at]) = (zero, zero.abs());
                    continue;
                }
                let (mut v, mut mag) = (0.0, 0.0);
                for i in 0..cpg {
                    let xi = c.x[((g * cpg + i) * h + y - p) * w + x - p];
                    v += q.first[m * cpg + i] * xi;
                    mag += (q.first[m * cpg + i] * xi).abs();
                }
                z[at] = q.bn.gamma[m] * (v - q.bn.mean[m]) / d + q.bn.beta[m];
                zm[at] = (q.bn.gamma[m] / d).abs() * mag + zero.abs();
            }
        }
    }
    let out = s.out();
    let mut y = vec![0.0; out * h * w];
    let mut mag = vec![0.0; out * h * w];
    for o in 0..out {
        let g = o / s.opg;
        for oy in 0..h {
            for ox in 0..w {
                let (mut acc, mut m) = (0.0, 0.0);
                for ml in 0..q.mpg {
                    let mch = g * q.mpg + ml;
                    for ky in 0..kb {
                        for kx in 0..kb {
                            let k2 = match &b.weight {
                                Some(k2) => k2[((o * q.mpg + ml) * kb + ky) * kb + kx],
                                None if mch == o => 1.0 / (kb * kb) as f64,
                                None => 0.0,
                            };
                            let at = (mch * hp + oy + ky) * wp + ox + kx;
                            acc += k2 * z[at];
                            m += k2.abs() * zm[at];
                        }
                    }
                }
                y[(o * h + oy) * w + ox] = acc;
                mag[(o * h + oy) * w + ox] = m;
            }
        }
    }
    (y, mag)
}

/// Average pooling of channel o of `x` (in == out), `side`×`side`, zero padding counted.
fn direct_pool(s: &Shape, x: &[f64], side: usize) -> (Vec<f64>, Vec<f64>) {
    let cpg = s.cpg;
    let ones = vec![1.0 / (side * side) as f64; s.out() * cpg * side * side];
    // A depthwise-in-the-group kernel: 1/side² on channel o mod cpg only.
    let mut w = vec![0.0; ones.len()];
    for o in 0..s.out() {
        let i = o % cpg;
        w[(o * cpg + i) * side * side..(o * cpg + i + 1) * side * side]
            .copy_from_slice(&ones[..side * side]);
    }
    direct_conv(s, x, &w, side, 1)
}

/// BN straight from its formula γ·(y − μ)/√(σ² + ε) + β, and the magnitude bound.
fn bn(bn: &BatchNorm, o: usize, eps: f64, (v, m): (f64, f64)) -> (f64, f64) {
    let d = (bn.var[o] + eps).sqrt();
    (
        bn.gamma[o] * (v - bn.mean[o]) / d + bn.beta[o],
        bn.gamma[o].abs() * (m + bn.mean[o].abs()) / d + bn.beta[o].abs(),
    )
}

/// The unfused block: Σ over branches of coef·scale·BN(conv(x) + c), each branch on its own,
/// then the post BN. Returns the output and, per element, the sum of the magnitudes of every
/// term (the scale f64 rounding is relative to).
fn unfused(c: &Case) -> (Vec<f64>, Vec<f64>) {
    let s = &c.shape;
    let hw = s.h * s.w;
    let mut y = vec![0.0; s.out() * hw];
    let mut mag = vec![0.0; s.out() * hw];
    for b in &c.block.branches {
        let (conv, conv_mag) = match (&b.weight, b.pool, &b.input_bn) {
            _ if b.seq.is_some() => direct_sequence(s, c, b, b.seq.as_ref().unwrap()),
            (Some(w), _, Some(n)) => {
                let (x, xm) = input_through_bn(s, &c.x, n, c.eps);
                direct_conv_m(s, (&x, &xm), w, (b.kernel, b.kernel_w), b.dilation)
            }
            (Some(w), _, None) => {
                let xm: Vec<f64> = c.x.iter().map(|v| v.abs()).collect();
                direct_conv_m(s, (&c.x, &xm), w, (b.kernel, b.kernel_w), b.dilation)
            }
            (None, Some(side), _) => direct_pool(s, &c.x, side),
            // Identity: output channel o is input channel o.
            (None, None, _) => (c.x.clone(), c.x.iter().map(|v: &f64| v.abs()).collect()),
        };
        for o in 0..s.out() {
            let bias = b.conv_bias.as_ref().map_or(0.0, |c| c[o]);
            let scale = b.scale.as_ref().map_or(1.0, |g| g[o]) * b.alpha.unwrap_or(1.0);
            for p in 0..hw {
                let i = o * hw + p;
                let mut vm = (conv[i] + bias, conv_mag[i] + bias.abs());
                if let Some(n) = &b.bn {
                    vm = bn(n, o, c.eps, vm);
                }
                y[i] += b.coef * scale * vm.0;
                mag[i] += (b.coef * scale).abs() * vm.1;
            }
        }
    }
    if let Some(post) = &c.block.post {
        for o in 0..s.out() {
            for i in o * hw..(o + 1) * hw {
                (y[i], mag[i]) = bn(post, o, c.eps, (y[i], mag[i]));
            }
        }
    }
    (y, mag)
}

/// The fused conv applied with the same direct convolution, plus its bias.
fn apply_fused(s: &Shape, x: &[f64], f: &FusedConv) -> Vec<f64> {
    let (mut y, _) = direct_conv(s, x, &f.weight, f.kernel, 1);
    let hw = s.h * s.w;
    for (o, b) in f.bias.iter().enumerate() {
        for v in &mut y[o * hw..(o + 1) * hw] {
            *v += b;
        }
    }
    y
}

/// Little-endian bytes of `values` in `dtype` (F32 or F64; the values fit exactly).
fn raw_bytes(dtype: Dtype, values: &[f64]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values
            .iter()
            .flat_map(|v| (*v as f32).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// A branch's per-channel ops for output channels `rows`, as the converter loads them.
fn channel_ops(b: &BranchValues, rows: &std::ops::Range<usize>) -> Vec<ChannelOp> {
    let cut = |v: &Vec<f64>| v[rows.clone()].to_vec();
    let mut ops = Vec::new();
    ops.extend(b.conv_bias.as_ref().map(|c| ChannelOp::Bias(cut(c))));
    ops.extend(b.bn.as_ref().map(|bn| ChannelOp::Bn(cut_bn(bn, rows))));
    ops.extend(b.scale.as_ref().map(|g| ChannelOp::Scale(cut(g))));
    ops.extend(b.alpha.map(|a| ChannelOp::Scale(vec![a; rows.len()])));
    ops
}

fn cut_bn(bn: &BatchNorm, rows: &std::ops::Range<usize>) -> BatchNorm {
    let cut = |v: &Vec<f64>| v[rows.clone()].to_vec();
    BatchNorm {
        gamma: cut(&bn.gamma),
        beta: cut(&bn.beta),
        mean: cut(&bn.mean),
        var: cut(&bn.var),
        eps: bn.eps,
    }
}

/// The converter's own pass ([`fuse_rows`]: raw weight bytes in, encoded rows out, with the
/// probe measured alongside) for output channels `rows`, written as F64. Also returns a bound
/// on every term the probe sums.
fn shipped_rows(
    c: &Case,
    rows: std::ops::Range<usize>,
    probe: &Input,
) -> (Vec<f64>, Vec<f64>, Deviation, f64) {
    let s = &c.shape;
    let n = rows.len();
    let post = c
        .block
        .post
        .as_ref()
        .map(|bn| Affine::chain(n, &[ChannelOp::Bn(cut_bn(bn, &rows))], 1.0));
    let raw: Vec<Option<Vec<u8>>> = c
        .block
        .branches
        .iter()
        .map(|b| {
            b.weight.as_ref().map(|w| {
                let cpg = b.seq.as_ref().map_or(s.cpg, |q| q.mpg);
                let per_row = cpg * b.kernel * b.kernel_w;
                raw_bytes(c.stored, &w[rows.start * per_row..rows.end * per_row])
            })
        })
        .collect();
    let mut bound = post.as_ref().map_or(0.0, |p| max_abs(&p.shift));
    let inputs: Vec<Option<Affine>> = c
        .block
        .branches
        .iter()
        .map(|b| {
            b.input_bn.as_ref().map(|n| {
                let (scale, shift) = n.affine();
                Affine { scale, shift }
            })
        })
        .collect();
    let grid = Grid {
        in_per_group: s.cpg,
        k: (s.k, s.k),
        out_per_group: s.opg,
    };
    // Sequences composed by the shipped routine, from the second conv's bytes as stored.
    let composed: Vec<Option<(Vec<f64>, Vec<f64>)>> = c
        .block
        .branches
        .iter()
        .zip(&raw)
        .map(|(b, raw)| {
            let q = b.seq.as_ref()?;
            let seq = Sequence {
                first: q.first.clone(),
                mid: q.bn.var.len(),
                ops: vec![ChannelOp::Bn(q.bn.clone())],
                first_hw: (1, 1),
                second_hw: (b.kernel, b.kernel),
            };
            let second = raw.as_ref().map(|r| decode(c.stored, r));
            let mid = seq.affine();
            Some(compose_rows(
                &seq,
                &mid,
                second.as_deref(),
                b.kernel,
                rows.clone(),
                grid,
            ))
        })
        .collect();
    let terms: Vec<Term> = c
        .block
        .branches
        .iter()
        .zip(&raw)
        .zip(&inputs)
        .zip(&composed)
        .map(|(((b, raw), input), comp)| {
            let mut a = Affine::chain(n, &channel_ops(b, &rows), b.coef);
            if let Some(p) = &post {
                a.then_scaled(p);
            }
            if let Some((values, through)) = comp {
                let th = a.scale.iter().zip(through);
                a.shift
                    .iter_mut()
                    .zip(th)
                    .for_each(|(b, (s, t))| *b += s * t);
                let per_row = values.len() / n.max(1);
                let l1 = values
                    .chunks(per_row.max(1))
                    .map(|r| r.iter().map(|v| v.abs()).sum::<f64>())
                    .fold(0.0, f64::max);
                bound += max_abs(&a.scale) * l1 + max_abs(&a.shift);
                let kernel = Kernel::Values {
                    values,
                    side: b.kernel,
                };
                return Term {
                    kernel,
                    scale: a.scale,
                    shift: a.shift,
                };
            }
            // |x| < 1 and |w| ≤ 1: a bound on every term the probe sums, per branch.
            // With an input BN `s·x + t`: |w·(s·x + t)| ≤ |s| + |t|.
            let taps = (s.cpg * b.kernel * b.kernel_w) as f64;
            let reach = input
                .as_ref()
                .map_or(1.0, |a| max_abs(&a.scale) + max_abs(&a.shift));
            bound += max_abs(&a.scale) * taps * reach + max_abs(&a.shift);
            let kernel = match (raw, b.pool) {
                (Some(bytes), _) => Kernel::Weights {
                    dtype: c.stored,
                    bytes,
                    side: (b.kernel, b.kernel_w),
                    dilation: b.dilation,
                    input: input.as_ref(),
                },
                (None, Some(side)) => Kernel::AvgPool { side },
                (None, None) => Kernel::Identity,
            };
            Term {
                kernel,
                scale: a.scale,
                shift: a.shift,
            }
        })
        .collect();
    let post_shift = post.as_ref().map(|p| p.shift.as_slice());
    let job = FuseJob {
        rows: &rows,
        grid,
        terms: &terms,
        post_shift,
        dtype: Dtype::F64,
        probe: Some(probe),
    };
    let out = fuse_rows(Vec::new(), &job).expect("finite values fuse");
    (
        decode(Dtype::F64, &out.weight),
        decode(Dtype::F64, &out.bias),
        out.deviation,
        bound,
    )
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The shipped pass ([`fuse_rows`], which reads the weights' raw bytes and probes as it
    /// fuses), fused in two chunks of rows as the converter does for large blocks: the fused
    /// conv equals the branches, and the probe it measured on the way is at rounding level.
    #[test]
    fn shipped_fuse_rows_equals_sum_of_branches(c in case()) {
        let s = &c.shape;
        // The converter's probe: one k×k image of every input channel.
        let probe = Input::random(1, s.cin(), s.k, s.k, 7, 0);
        let (mut weight, mut bias, dev_a, bound_a) = shipped_rows(&c, 0..c.split, &probe);
        let (w2, b2, dev_b, bound_b) = shipped_rows(&c, c.split..s.out(), &probe);
        weight.extend(w2);
        bias.extend(b2);
        prop_assert_eq!(weight.len(), s.out() * s.cpg * s.k * s.k);
        prop_assert_eq!(bias.len(), s.out());
        let fused = FusedConv { kernel: s.k, weight, bias };
        let got = apply_fused(s, &c.x, &fused);
        let (want, mag) = unfused(&c);
        for (i, ((g, w), m)) in got.iter().zip(&want).zip(&mag).enumerate() {
            prop_assert!(
                (g - w).abs() <= 1e-12 * m,
                "output {}: fused {} vs branches {} (term magnitude {})",
                i, g, w, m
            );
        }
        for (dev, bound) in [(dev_a, bound_a), (dev_b, bound_b)] {
            prop_assert!(
                dev.max_abs <= 1e-12 * bound,
                "probe deviation {:e} over 1e-12 × term bound {:e}",
                dev.max_abs, bound
            );
        }
    }

    /// Fusing output channels in chunks gives the same bytes as fusing the block whole: the
    /// identity's position depends on the absolute channel, not the chunk's.
    #[test]
    fn fusing_in_row_chunks_equals_fusing_whole(c in case()) {
        let s = &c.shape;
        let probe = Input::random(1, s.cin(), s.k, s.k, 7, 0);
        let (whole_w, whole_b, _, _) = shipped_rows(&c, 0..s.out(), &probe);
        let (mut w, mut b, _, _) = shipped_rows(&c, 0..c.split, &probe);
        let (w2, b2, _, _) = shipped_rows(&c, c.split..s.out(), &probe);
        w.extend(w2);
        b.extend(b2);
        prop_assert_eq!(w, whole_w);
        prop_assert_eq!(b, whole_b);
    }
}
