//! Property: for any block — output channels, input channels per group, groups (in == out when
//! there is an identity), kernel 1/3/5/7 with a 1×1 branch, several k×k branches, conv biases
//! or not, any BN statistics with σ² ≥ 0 — the fused conv applied to a random input equals the
//! sum of the branches applied separately, to f64 rounding.
//!
//! The reference is an independent direct convolution written here (loops over every tap,
//! each branch with its own kernel and padding, then its BN), not the crate's fusion or conv.

use proptest::prelude::*;
use proptest::sample::select;
use repvgg_fuse::checkpoint::decode;
use repvgg_fuse::conv::Input;
use repvgg_fuse::fuse::{BatchNorm, BlockValues, BranchValues, FusedConv};
use repvgg_fuse::layout::Role;
use repvgg_fuse::probe::{BranchRows, fuse_rows};
use safetensors::Dtype;

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
    /// Kernel of each k×k branch: one is `k`; MobileOne-style extra branches may be smaller
    /// odd sizes (zero-padded like the 1×1), and the largest need not come first.
    kxk: Vec<usize>,
    scale: bool,
    identity: bool,
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

    /// (role, kernel) of every conv branch.
    fn conv_branches(&self) -> Vec<(Role, usize)> {
        let mut v: Vec<_> = self.kxk.iter().map(|&k| (Role::Kxk, k)).collect();
        if self.scale {
            v.push((Role::Scale, 1));
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
            let extra = proptest::collection::vec(select(odd), 0..=2);
            (
                Just((groups, cpg, opg, k, scale, identity, h, w)),
                extra,
                0..3usize,
            )
        })
        .prop_map(
            |((groups, cpg, opg, k, scale, identity, h, w), extra, at)| {
                let mut kxk = extra;
                kxk.insert(at.min(kxk.len()), k);
                Shape {
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

fn case() -> impl Strategy<Value = Case> {
    shape().prop_flat_map(|s| {
        let (out, cpg) = (s.out(), s.cpg);
        let convs: Vec<BoxedStrategy<BranchValues>> = s
            .conv_branches()
            .into_iter()
            .map(|(role, kb)| {
                (
                    values(out * cpg * kb * kb, -1.0..1.0),
                    proptest::option::of(values(out, -1.0..1.0)),
                    proptest::option::weighted(0.9, batch_norm(out)),
                )
                    .prop_map(move |(weight, conv_bias, bn)| BranchValues {
                        role,
                        kernel: kb,
                        weight: Some(weight),
                        conv_bias,
                        bn,
                    })
                    .boxed()
            })
            .collect();
        let identity = if s.identity {
            batch_norm(out)
                .prop_map(|bn| {
                    Some(BranchValues {
                        role: Role::Identity,
                        kernel: 1,
                        weight: None,
                        conv_bias: None,
                        bn: Some(bn),
                    })
                })
                .boxed()
        } else {
            Just(None).boxed()
        };
        (
            Just(s.clone()),
            convs,
            identity,
            values(s.cin() * s.h * s.w, -1.0..1.0),
            select(vec![1e-5, 1e-3]),
            0..=out,
            select(vec![Dtype::F32, Dtype::F64]),
        )
            .prop_map(|(shape, mut branches, identity, x, eps, split, stored)| {
                if stored == Dtype::F32 {
                    for b in &mut branches {
                        for v in b.weight.iter_mut().flatten() {
                            *v = f64::from(*v as f32);
                        }
                    }
                }
                branches.extend(identity);
                let block = BlockValues {
                    rows: 0..shape.out(),
                    in_per_group: shape.cpg,
                    kernel: shape.k,
                    branches,
                };
                Case {
                    shape,
                    block,
                    x,
                    eps,
                    split,
                    stored,
                }
            })
    })
}

/// Direct grouped convolution of `x` (`[cin, h, w]`), stride 1, padding kb/2, no bias, with
/// `weight` `[out, cpg, kb, kb]`; also returns Σ|w·x| per output for the rounding bound.
fn direct_conv(s: &Shape, x: &[f64], weight: &[f64], kb: usize) -> (Vec<f64>, Vec<f64>) {
    let (out, cpg, h, w) = (s.out(), s.cpg, s.h, s.w);
    let opg = out / s.groups;
    let pad = (kb / 2) as isize;
    let mut y = vec![0.0; out * h * w];
    let mut mag = vec![0.0; out * h * w];
    for o in 0..out {
        let g = o / opg;
        for oy in 0..h {
            for ox in 0..w {
                let (mut acc, mut m) = (0.0, 0.0);
                for i in 0..cpg {
                    for ky in 0..kb {
                        for kx in 0..kb {
                            let iy = oy as isize + ky as isize - pad;
                            let ix = ox as isize + kx as isize - pad;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let v = x[((g * cpg + i) * h + iy as usize) * w + ix as usize];
                            let wt = weight[((o * cpg + i) * kb + ky) * kb + kx];
                            acc += wt * v;
                            m += (wt * v).abs();
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

/// The unfused block: Σ over branches of BN(conv(x) + c), each branch on its own, straight
/// from the BN formula γ·(y − μ)/√(σ² + ε) + β. Returns the output and, per element, the
/// sum of the magnitudes of every term (the scale f64 rounding is relative to).
fn unfused(c: &Case) -> (Vec<f64>, Vec<f64>) {
    let s = &c.shape;
    let hw = s.h * s.w;
    let mut y = vec![0.0; s.out() * hw];
    let mut mag = vec![0.0; s.out() * hw];
    for b in &c.block.branches {
        let (conv, conv_mag) = match &b.weight {
            Some(w) => direct_conv(s, &c.x, w, b.kernel),
            // Identity: output channel o is input channel o.
            None => (c.x.clone(), c.x.iter().map(|v: &f64| v.abs()).collect()),
        };
        for o in 0..s.out() {
            let bias = b.conv_bias.as_ref().map_or(0.0, |c| c[o]);
            for p in 0..hw {
                let i = o * hw + p;
                let pre = conv[i] + bias;
                let pre_mag = conv_mag[i] + bias.abs();
                let (v, m) = match &b.bn {
                    Some(bn) => {
                        let d = (bn.var[o] + c.eps).sqrt();
                        let v = bn.gamma[o] * (pre - bn.mean[o]) / d + bn.beta[o];
                        let m =
                            bn.gamma[o].abs() * (pre_mag + bn.mean[o].abs()) / d + bn.beta[o].abs();
                        (v, m)
                    }
                    None => (pre, pre_mag),
                };
                y[i] += v;
                mag[i] += m;
            }
        }
    }
    (y, mag)
}

/// The fused conv applied with the same direct convolution, plus its bias.
fn apply_fused(s: &Shape, x: &[f64], f: &FusedConv) -> Vec<f64> {
    let (mut y, _) = direct_conv(s, x, &f.weight, f.kernel);
    let hw = s.h * s.w;
    for (o, b) in f.bias.iter().enumerate() {
        for v in &mut y[o * hw..(o + 1) * hw] {
            *v += b;
        }
    }
    y
}

/// The block's values for output channels `rows` only, as a chunked read would give them.
fn rows_of(block: &BlockValues, rows: std::ops::Range<usize>) -> BlockValues {
    let cut = |v: &Vec<f64>, per_row: usize| v[rows.start * per_row..rows.end * per_row].to_vec();
    let branches = block
        .branches
        .iter()
        .map(|b| BranchValues {
            role: b.role,
            kernel: b.kernel,
            weight: b
                .weight
                .as_ref()
                .map(|w| cut(w, block.in_per_group * b.kernel * b.kernel)),
            conv_bias: b.conv_bias.as_ref().map(|c| cut(c, 1)),
            bn: b.bn.as_ref().map(|bn| BatchNorm {
                gamma: cut(&bn.gamma, 1),
                beta: cut(&bn.beta, 1),
                mean: cut(&bn.mean, 1),
                var: cut(&bn.var, 1),
            }),
        })
        .collect();
    BlockValues {
        rows,
        in_per_group: block.in_per_group,
        kernel: block.kernel,
        branches,
    }
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

/// The converter's own pass ([`fuse_rows`]: raw weight bytes in, encoded rows out, with the
/// probe measured alongside) for output channels `rows`, written as F64.
fn shipped_rows(
    c: &Case,
    rows: std::ops::Range<usize>,
    probe: &Input,
) -> (Vec<f64>, Vec<f64>, repvgg_fuse::verify::Deviation, f64) {
    let part = rows_of(&c.block, rows.clone());
    let raw: Vec<Option<Vec<u8>>> = part
        .branches
        .iter()
        .map(|b| b.weight.as_ref().map(|w| raw_bytes(c.stored, w)))
        .collect();
    let mut bound = 0.0;
    let branches: Vec<BranchRows> = part
        .branches
        .iter()
        .zip(&raw)
        .map(|(b, raw)| {
            let (t, shift) = b.affine(rows.len(), c.eps);
            // |x| < 1 and |w| ≤ 1: a bound on every term the probe sums, per branch.
            let taps = (c.shape.cpg * b.kernel * b.kernel) as f64;
            let tmax = t.iter().fold(0.0f64, |m, t| m.max(t.abs()));
            let smax = shift.iter().fold(0.0f64, |m, s| m.max(s.abs()));
            bound += tmax * taps + smax;
            BranchRows {
                role: b.role,
                kernel: b.kernel,
                weight: raw.as_deref().map(|r| (c.stored, r)),
                t,
                shift,
            }
        })
        .collect();
    let s = &c.shape;
    let out = fuse_rows(
        Vec::new(),
        rows,
        s.cpg,
        s.k,
        s.opg,
        &branches,
        Dtype::F64,
        Some(probe),
    )
    .expect("finite values fuse");
    (
        decode(Dtype::F64, &out.weight),
        decode(Dtype::F64, &out.bias),
        out.deviation,
        bound,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn fused_conv_equals_sum_of_branches(c in case()) {
        let fused = c.block.fuse(c.eps);
        let s = &c.shape;
        prop_assert_eq!(fused.weight.len(), s.out() * s.cpg * s.k * s.k);
        prop_assert_eq!(fused.bias.len(), s.out());
        let got = apply_fused(s, &c.x, &fused);
        let (want, mag) = unfused(&c);
        for (i, ((g, w), m)) in got.iter().zip(&want).zip(&mag).enumerate() {
            prop_assert!(
                (g - w).abs() <= 1e-12 * m,
                "output {}: fused {} vs branches {} (term magnitude {}, off by {:e} relative)",
                i, g, w, m, (g - w).abs() / m
            );
        }
    }

    /// Fusing output channels in chunks, as the converter does for large blocks, gives the
    /// same values bit for bit as fusing the block whole: the identity's position depends on
    /// the absolute channel, not the chunk's.
    #[test]
    fn fusing_in_row_chunks_equals_fusing_whole(c in case()) {
        let out = c.shape.out();
        let whole = c.block.fuse(c.eps);
        let head = rows_of(&c.block, 0..c.split).fuse(c.eps);
        let tail = rows_of(&c.block, c.split..out).fuse(c.eps);
        let mut weight = head.weight;
        weight.extend(tail.weight);
        let mut bias = head.bias;
        bias.extend(tail.bias);
        prop_assert_eq!(weight, whole.weight);
        prop_assert_eq!(bias, whole.bias);
    }

    /// The same property for the pass the converter ships ([`fuse_rows`], which reads the
    /// weights' raw bytes and probes as it fuses), fused in two chunks of rows: the fused
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
        let fused = FusedConv {
            rows: 0..s.out(),
            in_per_group: s.cpg,
            kernel: s.k,
            weight,
            bias,
        };
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
}
