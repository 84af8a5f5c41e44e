//! A block's values: the per-channel ops of some output channels read from the tensor
//! source and checked (finite, σ² ≥ 0), and the first stage of a sequence branch read whole.
//! What the values *mean* — composed into an affine for fusion, or run as a forward pass for
//! verification — is the business of `fuse` and `verify`; both start from these.

use std::ops::Range;

use crate::block::{Block, BlockError, BnTensors, Branch, Op, OrepaTensors, kernel_hw};
use crate::checkpoint::{Checkpoint, TensorInfo};

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
    /// ε.
    pub eps: f64,
}

impl BatchNorm {
    /// `(t, s)` such that `bn(y) = t·y + s`, per channel.
    ///
    /// The seed document's BN (μ = 5, σ² = 100, γ = 5, β = 20) maps 50 to
    /// (50 − 5)·5/10 + 20 = 42.5:
    ///
    /// ```
    /// use repvgg_fuse::block::values::BatchNorm;
    ///
    /// let bn = BatchNorm {
    ///     gamma: vec![5.0], beta: vec![20.0], mean: vec![5.0], var: vec![100.0], eps: 0.0,
    /// };
    /// let (t, s) = bn.affine();
    /// assert_eq!(t[0] * 50.0 + s[0], 42.5);
    /// ```
    pub fn affine(&self) -> (Vec<f64>, Vec<f64>) {
        let t: Vec<f64> = (0..self.var.len()).map(|r| self.scale(r)).collect();
        let s = t
            .iter()
            .zip(self.beta.iter().zip(&self.mean))
            .map(|(t, (b, m))| b - t * m)
            .collect();
        (t, s)
    }

    /// Channel `r`'s `γ/√(σ² + ε)`.
    pub fn scale(&self, r: usize) -> f64 {
        self.gamma[r] / (self.var[r] + self.eps).sqrt()
    }
}

/// One per-channel op's values for a range of rows.
#[derive(Debug, Clone, PartialEq)]
pub enum ChannelOp {
    /// Add a bias (a conv's own).
    Bias(Vec<f64>),
    /// A BatchNorm.
    Bn(BatchNorm),
    /// Multiply by a per-channel scale.
    Scale(Vec<f64>),
    /// `w·y + b` per channel (a norm's affine, a depthwise 1×1 conv with bias).
    ScaleShift {
        /// w.
        scale: Vec<f64>,
        /// b.
        shift: Vec<f64>,
    },
}

/// The per-channel values of a block for output channels `rows`: each branch's ops after its
/// source, and the post-ops.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelValues {
    /// The output channels covered.
    pub rows: Range<usize>,
    /// Per branch: its coefficient and its per-channel ops, in order.
    pub branches: Vec<(f64, Vec<ChannelOp>)>,
    /// Ops on the sum of the branches.
    pub post: Vec<ChannelOp>,
    /// Per branch: the BN on its input (every input channel), if it has one.
    pub inputs: Vec<Option<BatchNorm>>,
    /// Per branch: the first stage of a sequence (DBB's 1×1 → k×k), if it is one.
    pub sequences: Vec<Option<Sequence>>,
    /// Per branch: the kernel of a conv run as an FC (`Op::ConvFc`), whole, with its side.
    pub conv_fc: Vec<Option<(Vec<f64>, usize)>>,
    /// Per branch: the stored tensors of a computed kernel (OREPA), if it has one.
    pub generated: Vec<Option<OrepaValues>>,
}

/// OREPA's stored tensors for output channels `rows` (whole where they are not per output
/// channel), as [`OrepaTensors`] names them; each flat, in its stored order.
#[derive(Debug, Clone, PartialEq)]
pub struct OrepaValues {
    /// Kernel side k.
    pub k: usize,
    /// Groups G.
    pub groups: usize,
    /// `origin` rows `[rows, I/G, k, k]`.
    pub origin: Vec<f64>,
    /// `avg_conv` rows `[rows, I/G]`.
    pub avg_conv: Vec<f64>,
    /// `avg_avg` `[k, k]`.
    pub avg_avg: Vec<f64>,
    /// `pfir_conv` rows `[rows, I/G]`.
    pub pfir_conv: Vec<f64>,
    /// `prior` rows `[rows, k, k]`.
    pub prior: Vec<f64>,
    /// The 1×1 rows `[rows, I/G]`.
    pub one: Vec<f64>,
    /// `idconv1 + id_tensor`, whole: `[T, I/G]`.
    pub first: Vec<f64>,
    /// `conv2` rows `[rows, T/G, k, k]`.
    pub conv2: Vec<f64>,
    /// `dw`, whole: `[E·I, k, k]`.
    pub dw: Vec<f64>,
    /// `pw`, whole: `[O, E·I/G]` (rows are interleaved across groups).
    pub pw: Vec<f64>,
    /// `vector[j, rows]` for j = 0..6: `[6, rows]`.
    pub vector: Vec<Vec<f64>>,
}

/// The first stage of a sequence branch, whole: its conv and the per-channel ops on its
/// `mid` outputs; and the kernels of both stages.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// The first conv `[mid, in/groups, kh, kw]`, the identity added where stored without it.
    pub first: Vec<f64>,
    /// Its output channels.
    pub mid: usize,
    /// The per-channel ops on them (the conv's bias, a BN), every mid channel.
    pub ops: Vec<ChannelOp>,
    /// The first conv's kernel `(kh, kw)`: `(1, 1)` in DBB, `(1, k)` in RepNeXt.
    pub first_hw: (usize, usize),
    /// The second stage's kernel `(kh, kw)` (an average's window).
    pub second_hw: (usize, usize),
}

impl ChannelValues {
    /// Reads the per-channel values of `block` for `rows`, refusing NaN, ±∞ and negative
    /// variances.
    pub fn load(ckpt: &Checkpoint, block: &Block, rows: Range<usize>) -> Result<Self, BlockError> {
        let load = |ops: &[Op]| -> Result<Vec<ChannelOp>, BlockError> {
            let mut out = Vec::new();
            for op in ops {
                out.extend(load_channel_op(ckpt, block, op, rows.clone())?);
            }
            Ok(out)
        };
        let branches = block
            .branches
            .iter()
            .map(|b| Ok((b.coef, load(&b.ops[b.split()..])?)))
            .collect::<Result<_, BlockError>>()?;
        let sequences = block
            .branches
            .iter()
            .map(|b| load_sequence(ckpt, block, b))
            .collect::<Result<_, BlockError>>()?;
        let inputs = block
            .branches
            .iter()
            .map(|b| {
                b.input_bn()
                    .map(|bn| load_bn(ckpt, block, bn, 0..block.in_per_group))
                    .transpose()
            })
            .collect::<Result<_, BlockError>>()?;
        let conv_fc = block
            .branches
            .iter()
            .map(|b| match b.source() {
                Op::ConvFc { weight } => {
                    let (n, k) = ckpt.get(weight).map_or((0, 0), |t| (t.numel(), t.shape[2]));
                    Ok(Some((read_finite(ckpt, block, weight, 0..n)?, k)))
                }
                _ => Ok(None),
            })
            .collect::<Result<_, BlockError>>()?;
        let generated = block
            .branches
            .iter()
            .map(|b| match b.source() {
                Op::Orepa(t) => load_orepa(ckpt, block, t, rows.clone()).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<_, BlockError>>()?;
        Ok(ChannelValues {
            conv_fc,
            branches,
            post: load(&block.post)?,
            rows,
            inputs,
            sequences,
            generated,
        })
    }
}

/// The per-channel values an op contributes for `rows` (a conv: its bias, if any).
fn load_channel_op(
    ckpt: &Checkpoint,
    block: &Block,
    op: &Op,
    rows: Range<usize>,
) -> Result<Option<ChannelOp>, BlockError> {
    let read = |name: &str| read_finite(ckpt, block, name, rows.clone());
    Ok(match op {
        Op::Conv {
            bias: Some(bias), ..
        } => Some(ChannelOp::Bias(read(bias)?)),
        Op::GroupBn(bn) => {
            // Channel o reads the BN channel of its group.
            let opg = block.out_per_group().max(1);
            let last = rows.end.saturating_sub(1).max(rows.start);
            let groups = rows.start / opg..last / opg + 1;
            let per_group = load_bn(ckpt, block, bn, groups.clone())?;
            let each = |v: &[f64]| -> Vec<f64> {
                rows.clone().map(|o| v[o / opg - groups.start]).collect()
            };
            Some(ChannelOp::Bn(BatchNorm {
                gamma: each(&per_group.gamma),
                beta: each(&per_group.beta),
                mean: each(&per_group.mean),
                var: each(&per_group.var),
                eps: per_group.eps,
            }))
        }
        Op::Conv { .. }
        | Op::ConvFc { .. }
        | Op::Identity
        | Op::AvgPool { .. }
        | Op::InputBn(_)
        | Op::ThenConv { .. }
        | Op::ThenAvgPool { .. } => None,
        Op::Scale { weight } => Some(ChannelOp::Scale(read(weight)?)),
        Op::Affine { weight, bias } => Some(ChannelOp::ScaleShift {
            scale: read(weight)?,
            shift: read(bias)?,
        }),
        Op::Shift { bias, subtract } => {
            let b = read_per_row(ckpt, block, bias, rows)?;
            let sign = if *subtract { -1.0 } else { 1.0 };
            Some(ChannelOp::Bias(b.into_iter().map(|b| sign * b).collect()))
        }
        // The scale 1/d, in f64; a d of 0 (or one so small that 1/d overflows) is refused.
        Op::Divide { divisor } => {
            let d = read_per_row(ckpt, block, divisor, rows.clone())?;
            let inv: Vec<f64> = d.iter().map(|d| 1.0 / d).collect();
            if let Some(i) = first_non_finite(&inv) {
                return Err(BlockError::new(
                    &block.name,
                    format!(
                        "tensor `{divisor}` holds {} at element {}: dividing by it has no finite scale",
                        d[i],
                        rows.start + i
                    ),
                ));
            }
            Some(ChannelOp::Scale(inv))
        }
        Op::Orepa(_) => None,
        // One value for every row: the per-channel scale, broadcast.
        Op::Scalar { weight } => {
            let one = read_finite(ckpt, block, weight, 0..1)?;
            Some(ChannelOp::Scale(vec![one[0]; rows.len()]))
        }
        Op::Bn(bn) => Some(ChannelOp::Bn(load_bn(ckpt, block, bn, rows)?)),
    })
}

/// A per-channel tensor's values for `rows`, or its one value repeated for each row.
fn read_per_row(
    ckpt: &Checkpoint,
    block: &Block,
    name: &str,
    rows: Range<usize>,
) -> Result<Vec<f64>, BlockError> {
    if ckpt.get(name).is_some_and(|t| t.numel() == 1) {
        let one = read_finite(ckpt, block, name, 0..1)?;
        return Ok(vec![one[0]; rows.len()]);
    }
    read_finite(ckpt, block, name, rows)
}

/// The first stage of `branch`, if it is a sequence: read whole (every mid channel).
fn load_sequence(
    ckpt: &Checkpoint,
    block: &Block,
    branch: &Branch,
) -> Result<Option<Sequence>, BlockError> {
    if branch.second().is_none() {
        return Ok(None);
    }
    let Op::Conv {
        weight,
        plus_identity,
        ..
    } = branch.source()
    else {
        return Ok(None);
    };
    let ipg = block.in_per_group;
    let mid = ckpt.get(weight).map_or(0, |t| t.shape[0]);
    let first_hw = ckpt.get(weight).map_or((1, 1), kernel_hw);
    let taps = first_hw.0 * first_hw.1;
    let mut first = read_finite(ckpt, block, weight, 0..mid * ipg * taps)?;
    if *plus_identity {
        // Checked 1×1 (`Block::new`): one tap per input channel.
        for m in 0..mid {
            first[m * ipg + m % ipg] += 1.0;
        }
    }
    let second_hw = match branch.second() {
        Some(Op::ThenConv { weight }) => ckpt.get(weight).map_or((1, 1), kernel_hw),
        Some(Op::ThenAvgPool { kernel }) => (*kernel, *kernel),
        _ => (1, 1),
    };
    let mut ops = Vec::new();
    for op in &branch.ops[..branch.split() - 1] {
        ops.extend(load_channel_op(ckpt, block, op, 0..mid)?);
    }
    Ok(Some(Sequence {
        first,
        mid,
        ops,
        first_hw,
        second_hw,
    }))
}

/// OREPA's tensors for output channels `rows` (block checked: shapes agree).
fn load_orepa(
    ckpt: &Checkpoint,
    block: &Block,
    t: &OrepaTensors,
    rows: Range<usize>,
) -> Result<OrepaValues, BlockError> {
    let numel = |name: &str| ckpt.get(name).map_or(0, TensorInfo::numel);
    let whole = |name: &str| read_finite(ckpt, block, name, 0..numel(name));
    let per_row = |name: &str| {
        let n = numel(name) / block.out_channels.max(1);
        read_rows(ckpt, block, name, rows.clone(), n)
    };
    let k = ckpt.get(&t.origin).map_or(1, |i| super::kernel_hw(i).0);
    let mut first = whole(&t.idconv1)?;
    let id = whole(&t.id_tensor)?;
    first.iter_mut().zip(&id).for_each(|(w, i)| *w += i);
    let out = block.out_channels;
    let vector = (0..6)
        .map(|j| {
            read_finite(
                ckpt,
                block,
                &t.vector,
                j * out + rows.start..j * out + rows.end,
            )
        })
        .collect::<Result<_, _>>()?;
    Ok(OrepaValues {
        k,
        groups: block.groups.unwrap_or(1).max(1),
        origin: per_row(&t.origin)?,
        avg_conv: per_row(&t.avg_conv)?,
        avg_avg: whole(&t.avg_avg)?,
        pfir_conv: per_row(&t.pfir_conv)?,
        prior: per_row(&t.prior)?,
        one: per_row(&t.one)?,
        first,
        conv2: per_row(&t.conv2)?,
        dw: whole(&t.dw)?,
        pw: whole(&t.pw)?,
        vector,
    })
}

/// A BN's values for channels `rows`, refusing NaN, ±∞ and negative variances.
fn load_bn(
    ckpt: &Checkpoint,
    block: &Block,
    bn: &BnTensors,
    rows: Range<usize>,
) -> Result<BatchNorm, BlockError> {
    let read = |name: &str| read_finite(ckpt, block, name, rows.clone());
    let var = read(&bn.running_var)?;
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
    let bn_values = BatchNorm {
        gamma: read(&bn.weight)?,
        beta: read(&bn.bias)?,
        mean: read(&bn.running_mean)?,
        var,
        eps: bn.eps,
    };
    // σ² + ε = 0 (ε 0 and a dead channel) scales by γ/√0: bad input, for fusion and
    // verification alike.
    if let Some(i) = (0..bn_values.var.len()).find(|&r| !bn_values.scale(r).is_finite()) {
        return Err(BlockError::new(
            &block.name,
            format!(
                "`{}` is {:e} at channel {} and BN ε is {:e}, so γ/√(σ² + ε) = {}; expected σ² + ε > 0 (pass a larger --bn-eps)",
                bn.running_var,
                bn_values.var[i],
                rows.start + i,
                bn.eps,
                bn_values.scale(i)
            ),
        ));
    }
    Ok(bn_values)
}

/// Elements `rows` of tensor `name` (`per_row` elements a row), refusing NaN and ±∞.
pub fn read_rows(
    ckpt: &Checkpoint,
    block: &Block,
    name: &str,
    rows: Range<usize>,
    per_row: usize,
) -> Result<Vec<f64>, BlockError> {
    read_finite(ckpt, block, name, rows.start * per_row..rows.end * per_row)
}

fn read_finite(
    ckpt: &Checkpoint,
    block: &Block,
    name: &str,
    range: Range<usize>,
) -> Result<Vec<f64>, BlockError> {
    let err = |what: String| BlockError::new(&block.name, what);
    let info: &TensorInfo = ckpt
        .get(name)
        .ok_or_else(|| err(format!("tensor `{name}` is missing")))?;
    let values = ckpt
        .read_f64(info, range.clone())
        .map_err(|e| err(format!("reading `{name}`: {e}")))?
        .ok_or_else(|| {
            err(format!(
                "tensor `{name}` is {:?}, not floating point",
                info.dtype
            ))
        })?;
    match first_non_finite(&values) {
        Some(i) => Err(err(format!(
            "tensor `{name}` holds {} at element {}; fusion needs finite values",
            values[i],
            range.start + i
        ))),
        None => Ok(values),
    }
}

/// The index of the first NaN or ±∞: a branchless pass decides (it vectorizes), the scan for
/// the culprit runs only on failure.
#[inline(always)]
pub fn first_non_finite(values: &[f64]) -> Option<usize> {
    let mut finite = true;
    for v in values {
        finite &= v.is_finite();
    }
    if finite {
        None
    } else {
        values.iter().position(|v| !v.is_finite())
    }
}
