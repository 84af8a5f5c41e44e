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
    ///
    /// The seed document's BN (μ = 5, σ² = 100, γ = 5, β = 20) maps 50 to
    /// (50 − 5)·5/10 + 20 = 42.5:
    ///
    /// ```
    /// use repvgg_fuse::fuse::BatchNorm;
    ///
    /// let bn = BatchNorm { gamma: vec![5.0], beta: vec![20.0], mean: vec![5.0], var: vec![100.0] };
    /// let (t, s) = bn.affine(0.0);
    /// assert_eq!(t[0] * 50.0 + s[0], 42.5);
    /// ```
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
            Some(c) => t
                .iter()
                .zip(c)
                .zip(&s)
                .map(|((t, c), s)| t * c + s)
                .collect(),
            None => s,
        };
        (t, shift)
    }
}

/// A branch's per-channel `(t, b')`: its output is `t·conv(x) + b'` (see
/// [`BranchValues::affine`]).
pub type Affine = (Vec<f64>, Vec<f64>);

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
        Self::load_parts(ckpt, block, rows, true)
    }

    /// Like [`BlockValues::load`] but without the conv weights (`weight` is `None` in every
    /// branch): BN and bias only, for callers that stream the weights themselves.
    pub fn load_affine(
        ckpt: &Checkpoint,
        block: &Block,
        rows: Range<usize>,
    ) -> Result<Self, BlockError> {
        Self::load_parts(ckpt, block, rows, false)
    }

    fn load_parts(
        ckpt: &Checkpoint,
        block: &Block,
        rows: Range<usize>,
        with_weight: bool,
    ) -> Result<Self, BlockError> {
        let branches = block
            .branches
            .iter()
            .map(|b| load_branch(ckpt, block, b, rows.clone(), with_weight))
            .collect::<Result<_, _>>()?;
        Ok(BlockValues {
            rows,
            in_per_group: block.in_per_group,
            kernel: block.kernel,
            branches,
        })
    }

    /// Each branch's `(t, b')` as [`BranchValues::affine`] gives them, refusing values that
    /// are not finite: a BN with σ² + ε = 0 (ε 0 and a zero running variance) scales by γ/√0.
    /// `block` is the block these values were loaded from, for the tensor names in the error.
    pub fn affines(&self, eps: f64, block: &Block) -> Result<Vec<Affine>, BlockError> {
        let rows = self.rows.len();
        let mut out = Vec::with_capacity(self.branches.len());
        for (branch, tensors) in self.branches.iter().zip(&block.branches) {
            let (t, shift) = branch.affine(rows, eps);
            let bad = t.iter().position(|t| !t.is_finite());
            if let (Some(r), Some(bn), Some(names)) = (bad, &branch.bn, &tensors.bn) {
                return Err(BlockError::new(
                    &block.name,
                    format!(
                        "`{}` is {:e} at channel {} and BN ε is {eps:e}, so γ/√(σ² + ε) = {}; expected σ² + ε > 0 (pass a larger --bn-eps)",
                        names.running_var,
                        bn.var[r],
                        self.rows.start + r,
                        t[r]
                    ),
                ));
            }
            if let Some(r) = shift.iter().position(|s| !s.is_finite()) {
                return Err(BlockError::new(
                    &block.name,
                    format!(
                        "branch `{}`: its bias after BN is {} at channel {}: the values overflow f64",
                        tensors.label,
                        shift[r],
                        self.rows.start + r
                    ),
                ));
            }
            out.push((t, shift));
        }
        Ok(out)
    }

    /// Fuses the branches into one conv like [`BlockValues::fuse`], and refuses a result that
    /// is not finite: σ² + ε = 0 (see [`BlockValues::affines`]), or values near f64's limits
    /// that overflow when scaled or summed.
    pub fn fuse_finite(&self, eps: f64, block: &Block) -> Result<FusedConv, BlockError> {
        self.affines(eps, block)?;
        let fused = self.fuse(eps);
        let per_row = self.in_per_group * self.kernel * self.kernel;
        let bad = |values: &[f64], tensor: &str, per_row: usize| {
            values.iter().position(|v| !v.is_finite()).map(|i| {
                BlockError::new(
                    &block.name,
                    format!(
                        "fused tensor `{tensor}` element {} is {}: the branches' values overflow f64",
                        self.rows.start * per_row + i,
                        values[i]
                    ),
                )
            })
        };
        if let Some(e) = bad(&fused.weight, &block.deploy_weight, per_row)
            .or_else(|| bad(&fused.bias, &block.deploy_bias, 1))
        {
            return Err(e);
        }
        Ok(fused)
    }

    /// Fuses the branches into one conv, with BN ε `eps`.
    pub fn fuse(&self, eps: f64) -> FusedConv {
        let (rows, cpg, k) = (self.rows.len(), self.in_per_group, self.kernel);
        let per_row = cpg * k * k;
        let mut weight = vec![0.0; rows * per_row];
        let mut bias = vec![0.0; rows];
        for branch in &self.branches {
            let (t, shift) = branch.affine(rows, eps);
            for (b, s) in bias.iter_mut().zip(&shift) {
                *b += s;
            }
            let kb = branch.kernel;
            for (r, fused) in weight.chunks_exact_mut(per_row).enumerate() {
                let w = branch
                    .weight
                    .as_ref()
                    .map(|w| &w[r * cpg * kb * kb..(r + 1) * cpg * kb * kb]);
                add_branch_row(fused, self.rows.start + r, cpg, k, kb, t[r], w);
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

/// Adds one branch's share `t·W` to output channel `o`'s fused kernel `fused`
/// (`[in/groups, k, k]`): a `kb`×`kb` kernel `w` lands zero-padded at the centre; `w = None` is
/// the identity, which for output channel o reads input channel `o mod (in/groups)` of its own
/// group at the centre tap.
#[inline(always)]
pub fn add_branch_row(
    fused: &mut [f64],
    o: usize,
    cpg: usize,
    k: usize,
    kb: usize,
    t: f64,
    w: Option<&[f64]>,
) {
    let c = k / 2;
    match w {
        // Same size: a straight, vectorizable pass.
        Some(w) if kb == k => {
            for (f, w) in fused.iter_mut().zip(w) {
                *f += t * w;
            }
        }
        // A 1×1 kernel: one tap per input channel, at the centre.
        Some(w) if kb == 1 => {
            for (i, w) in w.iter().enumerate() {
                fused[(i * k + c) * k + c] += t * w;
            }
        }
        Some(w) => {
            let pad = (k - kb) / 2;
            for i in 0..cpg {
                for y in 0..kb {
                    let src = &w[(i * kb + y) * kb..(i * kb + y + 1) * kb];
                    let dst = &mut fused[(i * k + y + pad) * k + pad..][..kb];
                    for (f, w) in dst.iter_mut().zip(src) {
                        *f += t * w;
                    }
                }
            }
        }
        None => fused[((o % cpg) * k + c) * k + c] += t,
    }
}

/// Loads a branch's BN and conv bias for `rows`, and its weight too when `with_weight`.
fn load_branch(
    ckpt: &Checkpoint,
    block: &Block,
    branch: &Branch,
    rows: Range<usize>,
    with_weight: bool,
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
            // Block::new checked that the weight is [out, in/groups, k, k].
            let kb = ckpt
                .get(&conv.weight)
                .and_then(|t| t.shape.get(2).copied())
                .unwrap_or(1);
            let w = if with_weight {
                Some(read(&conv.weight, block.in_per_group * kb * kb)?)
            } else {
                None
            };
            let c = conv.bias.as_deref().map(|b| read(b, 1)).transpose()?;
            (w, c, kb)
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
                format!(
                    "tensor `{}` is {:?}, not floating point",
                    info.name, info.dtype
                ),
            )
        })?;
    // A branchless pass decides (it vectorizes); the scan for the culprit runs on failure.
    let mut finite = true;
    for v in &values {
        finite &= v.is_finite();
    }
    if let Some(i) = (!finite)
        .then(|| values.iter().position(|v| !v.is_finite()))
        .flatten()
    {
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

        let w: Vec<f64> = (0..2 * 2 * 9)
            .map(|i| (i as f64 * 0.37).sin() * 0.2)
            .collect();
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

    /// The block a [`BlockValues`] of `branches` would come from, for the names in errors.
    fn named_block(branches: &[BranchValues], rows: usize, cpg: usize, k: usize) -> Block {
        let branches = branches
            .iter()
            .enumerate()
            .map(|(i, b)| crate::block::Branch {
                label: format!("b{i}"),
                role: b.role,
                conv: None,
                bn: b.bn.as_ref().map(|_| crate::block::BnTensors {
                    weight: format!("blk.b{i}.bn.weight"),
                    bias: format!("blk.b{i}.bn.bias"),
                    running_mean: format!("blk.b{i}.bn.running_mean"),
                    running_var: format!("blk.b{i}.bn.running_var"),
                }),
                num_batches_tracked: None,
            })
            .collect();
        Block {
            name: "blk".into(),
            branches,
            out_channels: rows,
            in_per_group: cpg,
            kernel: k,
            groups: None,
            dtype: safetensors::Dtype::F32,
            deploy_weight: "blk.reparam.weight".into(),
            deploy_bias: "blk.reparam.bias".into(),
            consumed: Vec::new(),
        }
    }

    /// σ² = 0 with ε = 0 scales by γ/√0: refused, naming the variance and the channel,
    /// while ε > 0 fuses the same values.
    #[test]
    fn zero_variance_with_zero_eps_is_refused() {
        let mut bn = unit_bn(2);
        bn.var[1] = 0.0;
        let values = block(
            vec![BranchValues {
                bn: Some(bn),
                ..plain(1, vec![1.0, 2.0, 3.0, 4.0], None)
            }],
            2,
            2,
            1,
        );
        let names = named_block(&values.branches, 2, 2, 1);
        let err = values.fuse_finite(0.0, &names).unwrap_err().to_string();
        assert!(err.contains("block `blk`"), "{err}");
        assert!(
            err.contains("`blk.b0.bn.running_var` is 0e0 at channel 1"),
            "{err}"
        );
        assert!(err.contains("--bn-eps"), "{err}");
        let fused = values.fuse_finite(1e-5, &names).expect("finite with ε > 0");
        assert_eq!(fused, values.fuse(1e-5));
    }

    /// Finite f64 inputs whose scaled sum overflows f64 are refused, naming the fused tensor.
    #[test]
    fn fused_overflow_of_f64_is_refused() {
        let values = block(
            vec![
                plain(1, vec![1e308, 1.0], None),
                plain(1, vec![1e308, 1.0], Some(vec![1e308])),
                plain(1, vec![1.0, 1.0], Some(vec![1e308])),
            ],
            1,
            2,
            1,
        );
        let names = named_block(&values.branches, 1, 2, 1);
        let err = values.fuse_finite(1e-5, &names).unwrap_err().to_string();
        assert!(
            err.contains("`blk.reparam.weight` element 0 is inf"),
            "{err}"
        );
        let bias_only = block(values.branches[2..].to_vec(), 1, 2, 1);
        let mut twice = bias_only.clone();
        twice.branches.extend(bias_only.branches.clone());
        let names = named_block(&twice.branches, 1, 2, 1);
        let err = twice.fuse_finite(1e-5, &names).unwrap_err().to_string();
        assert!(err.contains("`blk.reparam.bias` element 0 is inf"), "{err}");
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
