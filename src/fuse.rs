//! The fusion itself, in f64: each branch "conv W (bias c) then BN (γ, β, μ, σ², ε)" becomes
//! `t·W` and `β + t·(c − μ)` with `t = γ / sqrt(σ² + ε)`; smaller kernels are zero-padded to the
//! block's k×k at the centre; the identity is the kernel `I[o, o mod (in/groups), k/2, k/2] = 1`;
//! the fused conv is the sum over branches.
//!
//! Work is done per range of output channels, so a block is never in memory whole.

use std::ops::Range;

use crate::block::{Block, BlockError, Branch};
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::layout::Role;

/// A BatchNorm's parameters for a range of channels.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm {
    /// γ.
    pub gamma: Vec<f64>,
    /// β.
    pub beta: Vec<f64>,
    /// μ (running mean).
    pub mean: Vec<f64>,
    /// σ² (running variance).
    pub var: Vec<f64>,
}

impl BatchNorm {
    /// `(t, s)` such that `bn(y) = t·y + s`, per channel.
    pub fn affine(&self, eps: f64) -> (Vec<f64>, Vec<f64>) {
        let t: Vec<f64> = self
            .gamma
            .iter()
            .zip(&self.var)
            .map(|(g, v)| g / (v + eps).sqrt())
            .collect();
        let s = t
            .iter()
            .zip(self.beta.iter().zip(&self.mean))
            .map(|(t, (b, m))| b - t * m)
            .collect();
        (t, s)
    }
}

/// One branch's values for a range of output channels.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchValues {
    /// The part the branch plays.
    pub role: Role,
    /// Kernel size of this branch's conv (1 for the identity).
    pub kernel: usize,
    /// `[rows, in/groups, kernel, kernel]`, absent for the identity.
    pub weight: Option<Vec<f64>>,
    /// The conv's own bias.
    pub conv_bias: Option<Vec<f64>>,
    /// The BN after the conv.
    pub bn: Option<BatchNorm>,
}

impl BranchValues {
    /// `(t, b')` such that the branch output is `t·conv(x) + b'` (`t·x + b'` for the identity):
    /// `b' = β + t·(c − μ)`, which keeps the conv's own bias `c`.
    pub fn affine(&self, rows: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
        let (t, s) = match &self.bn {
            Some(bn) => bn.affine(eps),
            None => (vec![1.0; rows], vec![0.0; rows]),
        };
        let shift = match &self.conv_bias {
            Some(c) => t.iter().zip(c).zip(&s).map(|((t, c), s)| t * c + s).collect(),
            None => s,
        };
        (t, shift)
    }
}

/// A block's values for output channels `rows`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockValues {
    /// The output channels covered.
    pub rows: Range<usize>,
    /// Input channels per group.
    pub in_per_group: usize,
    /// The block's (fused) kernel size.
    pub kernel: usize,
    /// Branches, as in the block.
    pub branches: Vec<BranchValues>,
}

/// A fused conv for a range of output channels.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedConv {
    /// The output channels covered.
    pub rows: Range<usize>,
    /// Input channels per group.
    pub in_per_group: usize,
    /// Kernel size.
    pub kernel: usize,
    /// `[rows, in/groups, kernel, kernel]`.
    pub weight: Vec<f64>,
    /// `[rows]`.
    pub bias: Vec<f64>,
}

impl BlockValues {
    /// Reads the values of `block` for output channels `rows` from `ckpt`, refusing NaN, ±∞
    /// and negative variances.
    pub fn load(ckpt: &Checkpoint, block: &Block, rows: Range<usize>) -> Result<Self, BlockError> {
        let branches = block
            .branches
            .iter()
            .map(|b| load_branch(ckpt, block, b, rows.clone()))
            .collect::<Result<_, _>>()?;
        Ok(BlockValues {
            rows,
            in_per_group: block.in_per_group,
            kernel: block.kernel,
            branches,
        })
    }

    /// Fuses the branches into one conv, with BN ε `eps`.
    pub fn fuse(&self, eps: f64) -> FusedConv {
        let (rows, cpg, k) = (self.rows.len(), self.in_per_group, self.kernel);
        let mut weight = vec![0.0; rows * cpg * k * k];
        let mut bias = vec![0.0; rows];
        for branch in &self.branches {
            let (t, shift) = branch.affine(rows, eps);
            for (b, s) in bias.iter_mut().zip(&shift) {
                *b += s;
            }
            let kb = branch.kernel;
            let pad = (k - kb) / 2;
            for r in 0..rows {
                let out = &mut weight[r * cpg * k * k..(r + 1) * cpg * k * k];
                match &branch.weight {
                    Some(w) => {
                        let src = &w[r * cpg * kb * kb..(r + 1) * cpg * kb * kb];
                        for i in 0..cpg {
                            for y in 0..kb {
                                for x in 0..kb {
                                    out[(i * k + y + pad) * k + x + pad] +=
                                        t[r] * src[(i * kb + y) * kb + x];
                                }
                            }
                        }
                    }
                    None => {
                        // Identity: output channel o reads input channel o mod (in/groups)
                        // of its own group, at the kernel's centre.
                        let o = self.rows.start + r;
                        let c = k / 2;
                        out[((o % cpg) * k + c) * k + c] += t[r];
                    }
                }
            }
        }
        FusedConv {
            rows: self.rows.clone(),
            in_per_group: cpg,
            kernel: k,
            weight,
            bias,
        }
    }
}

fn load_branch(
    ckpt: &Checkpoint,
    block: &Block,
    branch: &Branch,
    rows: Range<usize>,
) -> Result<BranchValues, BlockError> {
    let read = |name: &str, per_row: usize| -> Result<Vec<f64>, BlockError> {
        let info = ckpt
            .get(name)
            .ok_or_else(|| BlockError::new(&block.name, format!("tensor `{name}` is missing")))?;
        let values = read_finite(ckpt, block, info, rows.start * per_row..rows.end * per_row)?;
        Ok(values)
    };
    let (weight, conv_bias, kernel) = match &branch.conv {
        Some(conv) => {
            let kb = ckpt.get(&conv.weight).map_or(1, |t| t.shape[2]);
            let w = read(&conv.weight, block.in_per_group * kb * kb)?;
            let c = conv.bias.as_deref().map(|b| read(b, 1)).transpose()?;
            (Some(w), c, kb)
        }
        None => (None, None, 1),
    };
    let bn = match &branch.bn {
        Some(bn) => {
            let var = read(&bn.running_var, 1)?;
            if let Some(i) = var.iter().position(|v| *v < 0.0) {
                return Err(BlockError::new(
                    &block.name,
                    format!(
                        "tensor `{}` has a negative variance {} at channel {}; a running variance must be ≥ 0",
                        bn.running_var,
                        var[i],
                        rows.start + i
                    ),
                ));
            }
            Some(BatchNorm {
                gamma: read(&bn.weight, 1)?,
                beta: read(&bn.bias, 1)?,
                mean: read(&bn.running_mean, 1)?,
                var,
            })
        }
        None => None,
    };
    Ok(BranchValues {
        role: branch.role,
        kernel,
        weight,
        conv_bias,
        bn,
    })
}

fn read_finite(
    ckpt: &Checkpoint,
    block: &Block,
    info: &TensorInfo,
    range: Range<usize>,
) -> Result<Vec<f64>, BlockError> {
    let values = ckpt
        .read_f64(info, range.clone())
        .map_err(|e| BlockError::new(&block.name, format!("reading `{}`: {e}", info.name)))?
        .ok_or_else(|| {
            BlockError::new(
                &block.name,
                format!("tensor `{}` is {:?}, not floating point", info.name, info.dtype),
            )
        })?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(BlockError::new(
            &block.name,
            format!(
                "tensor `{}` holds {} at element {}; fusion needs finite values",
                info.name,
                values[i],
                range.start + i
            ),
        ));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    //! The seed document's examples, with the values PyTorch printed there.
    use super::*;

    /// Direct convolution, padding k/2, stride 1, one image: the plainest possible reference.
    fn conv(x: &[f64], c: usize, h: usize, w: usize, f: &FusedConv, groups: usize) -> Vec<f64> {
        let (k, cpg) = (f.kernel, f.in_per_group);
        let rows = f.rows.len();
        let opg = rows / groups;
        let mut out = vec![0.0; rows * h * w];
        assert_eq!(c, cpg * groups);
        for o in 0..rows {
            let g = o / opg;
            for y in 0..h {
                for xx in 0..w {
                    let mut acc = f.bias[o];
                    for i in 0..cpg {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (y + ky, xx + kx);
                                if iy < k / 2 || ix < k / 2 || iy - k / 2 >= h || ix - k / 2 >= w {
                                    continue;
                                }
                                let v = x[((g * cpg + i) * h + iy - k / 2) * w + ix - k / 2];
                                acc += f.weight[((o * cpg + i) * k + ky) * k + kx] * v;
                            }
                        }
                    }
                    out[(o * h + y) * w + xx] = acc;
                }
            }
        }
        out
    }

    fn plain(kernel: usize, weight: Vec<f64>, bias: Option<Vec<f64>>) -> BranchValues {
        BranchValues {
            role: Role::Kxk,
            kernel,
            weight: Some(weight),
            conv_bias: bias,
            bn: None,
        }
    }

    fn block(branches: Vec<BranchValues>, rows: usize, cpg: usize, k: usize) -> BlockValues {
        BlockValues {
            rows: 0..rows,
            in_per_group: cpg,
            kernel: k,
            branches,
        }
    }

    /// Seed step 1: two 3×3 convs (weights 1 and 2, biases 10 and 20) on a 2-channel 7×7
    /// input of ones and twos sum to one conv of weight 3 and bias 30; PyTorch printed 66 in
    /// the corners, 84 on the edges and 111 inside.
    #[test]
    fn seed_two_convs_sum_to_one() {
        let b = block(
            vec![
                plain(3, vec![1.0; 2 * 2 * 9], Some(vec![10.0; 2])),
                plain(3, vec![2.0; 2 * 2 * 9], Some(vec![20.0; 2])),
            ],
            2,
            2,
            3,
        );
        let f = b.fuse(1e-5);
        assert!(f.weight.iter().all(|&v| v == 3.0));
        assert_eq!(f.bias, vec![30.0, 30.0]);
        let mut x = vec![1.0; 49];
        x.extend(vec![2.0; 49]);
        let y = conv(&x, 2, 7, 7, &f, 1);
        for ch in 0..2 {
            let at = |r: usize, c: usize| y[ch * 49 + r * 7 + c];
            assert_eq!(at(0, 0), 66.0);
            assert_eq!(at(0, 3), 84.0);
            assert_eq!(at(3, 0), 84.0);
            assert_eq!(at(3, 3), 111.0);
            assert_eq!(at(6, 6), 66.0);
        }
    }

    /// Seed step 2: BN with μ=5, σ²=100, γ=5, β=20 maps 50 to (50−5)·5/10+20 = 42.5
    /// (the seed's own comment), and a conv *with a bias* followed by that BN fuses with no
    /// error at all — the seed dropped the conv bias and printed a visible offset.
    #[test]
    fn seed_conv_with_bias_then_bn_fuses_exactly() {
        let bn = BatchNorm {
            gamma: vec![5.0; 2],
            beta: vec![20.0; 2],
            mean: vec![5.0; 2],
            var: vec![100.0; 2],
        };
        let (t, s) = bn.affine(0.0);
        assert_eq!(t[0] * 50.0 + s[0], 42.5);

        let w: Vec<f64> = (0..2 * 2 * 9).map(|i| (i as f64 * 0.37).sin() * 0.2).collect();
        let c = vec![0.15, -0.08];
        let branch = BranchValues {
            bn: Some(bn.clone()),
            ..plain(3, w.clone(), Some(c.clone()))
        };
        let eps = 1e-5;
        let fused = block(vec![branch], 2, 2, 3).fuse(eps);
        // Unfused: conv with its bias, then the BN, evaluated separately.
        let conv_only = FusedConv {
            rows: 0..2,
            in_per_group: 2,
            kernel: 3,
            weight: w,
            bias: c,
        };
        let mut x = vec![50.0; 49];
        x.extend((50..99).map(f64::from));
        let y_conv = conv(&x, 2, 7, 7, &conv_only, 1);
        let (t, s) = bn.affine(eps);
        let y_fused = conv(&x, 2, 7, 7, &fused, 1);
        for (i, (yc, yf)) in y_conv.iter().zip(&y_fused).enumerate() {
            let o = i / 49;
            let unfused = t[o] * yc + s[o];
            assert!(
                (unfused - yf).abs() <= 1e-12 * unfused.abs().max(1.0),
                "at {i}: bn(conv(x)) = {unfused}, fused = {yf}"
            );
        }
    }

    /// Seed step 3: a 1×1 kernel lands at the centre of the 3×3, the other eight taps zero.
    #[test]
    fn seed_one_by_one_pads_to_centre() {
        let f = block(
            vec![BranchValues {
                kernel: 1,
                role: Role::Scale,
                ..plain(1, vec![2.0, 3.0, 5.0, 7.0], None)
            }],
            2,
            2,
            3,
        )
        .fuse(1e-5);
        let mut expected = vec![0.0; 2 * 2 * 9];
        for (o, i, v) in [(0, 0, 2.0), (0, 1, 3.0), (1, 0, 5.0), (1, 1, 7.0)] {
            expected[(o * 2 + i) * 9 + 4] = v;
        }
        assert_eq!(f.weight, expected);
    }

    fn unit_bn(n: usize) -> BatchNorm {
        BatchNorm {
            gamma: vec![1.0; n],
            beta: vec![0.0; n],
            mean: vec![0.0; n],
            var: vec![1.0; n],
        }
    }

    /// Seed step 4: the 3×3 identity conv leaves a 2-channel input of ones and twos as it is.
    #[test]
    fn seed_identity_kernel_is_identity() {
        let identity = BranchValues {
            role: Role::Identity,
            kernel: 1,
            weight: None,
            conv_bias: None,
            bn: Some(unit_bn(2)),
        };
        let f = block(vec![identity], 2, 2, 3).fuse(0.0);
        let mut expected = vec![0.0; 2 * 2 * 9];
        expected[4] = 1.0; // [0, 0, 1, 1]
        expected[(2 + 1) * 9 + 4] = 1.0; // [1, 1, 1, 1]
        assert_eq!(f.weight, expected);
        let mut x = vec![1.0; 49];
        x.extend(vec![2.0; 49]);
        assert_eq!(conv(&x, 2, 7, 7, &f, 1), x);
    }

    /// With groups > 1 the identity must read channel `o mod (in/groups)` of its own group; a
    /// plain diagonal (YOLOv7's mistake) would index past the kernel's second dimension.
    #[test]
    fn grouped_identity_is_identity() {
        for groups in [2, 4, 8] {
            let c = 8;
            let cpg = c / groups;
            let identity = BranchValues {
                role: Role::Identity,
                kernel: 1,
                weight: None,
                conv_bias: None,
                bn: Some(unit_bn(c)),
            };
            let f = block(vec![identity], c, cpg, 3).fuse(0.0);
            let x: Vec<f64> = (0..c * 25).map(|i| (i as f64).cos()).collect();
            assert_eq!(conv(&x, c, 5, 5, &f, groups), x, "groups = {groups}");
        }
    }
}
