//! The branch algebra: what each op of a [`Block`] does to a range of output channels, in f64.
//!
//! Every branch is a source op (conv, identity, average pool) followed by per-channel ops (the
//! conv's bias, BN, a scale) and a coefficient; the block's post-ops are per-channel too. So
//! per output channel o a branch computes `α[o]·source(x)[o] + β[o]`, and the block
//! `Σ α_b[o]·source_b(x)[o] + Σ β_b[o]`. [`ChannelValues`] loads the per-channel ops for some
//! rows and composes them into each branch's [`Affine`]; [`fuse_rows`] — the one fusion
//! routine — places every source's kernel on the block's k×k grid, scaled by α, sums, rounds
//! once to the output dtype, and probes the rows as written.
//!
//! For `--verify`, [`forward_unfused`] runs the same ops the other way: each source on a real
//! input (a GEMM), then each per-channel op on the outputs in order, the BN as a BN — never
//! through the composed α/β — so the check does not depend on this algebra.
//!
//! Flat slices in the hot loops ([`fuse_rows`]), `ndarray` for the forward pass.

use std::ops::Range;

use ndarray::{Array2, Zip, s};
use safetensors::Dtype;

use crate::block::{Block, BlockError, BnTensors, Branch, Op};
use crate::checkpoint::{Checkpoint, TensorInfo, decode_into, dtype_bytes, encode};
use crate::conv::{BlockInput, Input, conv_rows};
use crate::deviation::Deviation;

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
    /// use repvgg_fuse::ops::BatchNorm;
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

/// One per-channel op's values for a range of rows.
#[derive(Debug, Clone, PartialEq)]
pub enum ChannelOp {
    /// Add a bias (a conv's own).
    Bias(Vec<f64>),
    /// A BatchNorm.
    Bn(BatchNorm),
    /// Multiply by a per-channel scale.
    Scale(Vec<f64>),
}

/// A BN on a branch's input as `(scale, shift)` per input channel.
pub type InputAffine = (Vec<f64>, Vec<f64>);

/// A composed sequence branch: kernel rows, the bias they carry (`through`), kernel side.
pub type Composed = (Vec<f64>, Vec<f64>, usize);

/// A branch's conv weights for some rows, with the kernel `(kh, kw)`.
pub type SourceWeights = (Vec<f64>, (usize, usize));

/// A branch's output per channel: `scale·source(x) + shift`.
#[derive(Debug, Clone, PartialEq)]
pub struct Affine {
    /// α per row.
    pub scale: Vec<f64>,
    /// β per row.
    pub shift: Vec<f64>,
}

impl Affine {
    /// `coef · ops(y)` for `rows` channels: the per-channel ops applied in order, then the
    /// coefficient.
    pub fn chain(rows: usize, ops: &[ChannelOp], coef: f64, eps: f64) -> Affine {
        let mut a = Affine {
            scale: vec![1.0; rows],
            shift: vec![0.0; rows],
        };
        ops.iter().for_each(|op| a.then(op, eps));
        if coef != 1.0 {
            a.times(&vec![coef; rows]);
        }
        a
    }

    /// This affine followed by `post` (the block's post-ops): `post(α·y + β)`, without
    /// `post`'s own shift, which belongs to the block once, not to every branch.
    pub fn then_scaled(&mut self, post: &Affine) {
        self.times(&post.scale);
    }

    /// This affine followed by `op`: `op(α·y + β)`. A BN is `t·y + s` with
    /// `t = γ/√(σ² + ε)`, `s = β − t·μ`, so a conv bias c becomes `t·c + s`.
    fn then(&mut self, op: &ChannelOp, eps: f64) {
        match op {
            ChannelOp::Bias(c) => self.shift.iter_mut().zip(c).for_each(|(b, c)| *b += c),
            ChannelOp::Bn(bn) => {
                let (t, s) = bn.affine(eps);
                self.times(&t);
                self.shift.iter_mut().zip(&s).for_each(|(b, s)| *b += s);
            }
            ChannelOp::Scale(g) => self.times(g),
        }
    }

    fn times(&mut self, t: &[f64]) {
        self.scale.iter_mut().zip(t).for_each(|(a, t)| *a *= t);
        self.shift.iter_mut().zip(t).for_each(|(b, t)| *b *= t);
    }
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
}

/// The first stage of a sequence branch, whole: its 1×1 conv and the per-channel ops on its
/// `mid` outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// The first conv `[mid, in/groups]`, the identity added where stored without it.
    pub first: Vec<f64>,
    /// Its output channels.
    pub mid: usize,
    /// The per-channel ops on them (the conv's bias, a BN), every mid channel.
    pub ops: Vec<ChannelOp>,
}

impl Sequence {
    /// The first stage's ops as `(scale, shift)` per mid channel; the shift is also what
    /// they make of zero, the value DBB's BNAndPad pads with.
    pub fn affine(&self, eps: f64) -> Affine {
        Affine::chain(self.mid, &self.ops, 1.0, eps)
    }
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
        Ok(ChannelValues {
            branches,
            post: load(&block.post)?,
            rows,
            inputs,
            sequences,
        })
    }

    /// Per branch, its input BN as `(scale, shift)` per input channel; refused where not
    /// finite (σ² + ε = 0).
    pub fn input_affines(
        &self,
        eps: f64,
        block: &Block,
    ) -> Result<Vec<Option<InputAffine>>, BlockError> {
        let mut out = Vec::with_capacity(self.inputs.len());
        for (bn, branch) in self.inputs.iter().zip(&block.branches) {
            let Some(bn) = bn else {
                out.push(None);
                continue;
            };
            let (t, s) = bn.affine(eps);
            if let Some(i) = t.iter().chain(&s).position(|v| !v.is_finite()) {
                let name = branch.input_bn().map_or("", |n| n.running_var.as_str());
                return Err(BlockError::new(
                    &block.name,
                    format!(
                        "`{name}` is {:e} at channel {} and BN ε is {eps:e}: the input BN of branch `{}` is not finite; expected σ² + ε > 0 (pass a larger --bn-eps)",
                        bn.var[i % t.len()],
                        i % t.len(),
                        branch.label
                    ),
                ));
            }
            out.push(Some((t, s)));
        }
        Ok(out)
    }

    /// Each branch's [`Affine`] with the post-ops folded in, and the post-ops' own shift
    /// (`None` without post-ops); values that are not finite are refused, naming the tensor:
    /// a BN with σ² + ε = 0 (ε 0 and a zero running variance) scales by γ/√0.
    pub fn affines(
        &self,
        eps: f64,
        block: &Block,
    ) -> Result<(Vec<Affine>, Option<Vec<f64>>), BlockError> {
        let n = self.rows.len();
        let post = (!self.post.is_empty()).then(|| Affine::chain(n, &self.post, 1.0, eps));
        if let Some(p) = &post {
            self.refuse_non_finite(p, &self.post, &block.post, eps, block, "the post-ops")?;
        }
        let mut out = Vec::with_capacity(self.branches.len());
        for ((coef, ops), branch) in self.branches.iter().zip(&block.branches) {
            let mut a = Affine::chain(n, ops, *coef, eps);
            if let Some(p) = &post {
                a.then_scaled(p);
            }
            self.refuse_non_finite(&a, ops, &branch.ops, eps, block, &branch.label)?;
            out.push(a);
        }
        Ok((out, post.map(|p| p.shift)))
    }

    fn refuse_non_finite(
        &self,
        a: &Affine,
        values: &[ChannelOp],
        ops: &[Op],
        eps: f64,
        block: &Block,
        label: &str,
    ) -> Result<(), BlockError> {
        let err = |what: String| Err(BlockError::new(&block.name, what));
        if let Some(r) = a.scale.iter().position(|t| !t.is_finite()) {
            let bn = values.iter().find_map(|v| match v {
                ChannelOp::Bn(bn) => Some(bn),
                _ => None,
            });
            let names = ops.iter().find_map(|op| match op {
                Op::Bn(bn) => Some(bn),
                _ => None,
            });
            if let (Some(bn), Some(names)) = (bn, names) {
                return err(format!(
                    "`{}` is {:e} at channel {} and BN ε is {eps:e}, so γ/√(σ² + ε) = {}; expected σ² + ε > 0 (pass a larger --bn-eps)",
                    names.running_var,
                    bn.var[r],
                    self.rows.start + r,
                    a.scale[r]
                ));
            }
            return err(format!(
                "branch `{label}`: its scale is {} at channel {}: the values overflow f64",
                a.scale[r],
                self.rows.start + r
            ));
        }
        if let Some(r) = a.shift.iter().position(|s| !s.is_finite()) {
            return err(format!(
                "branch `{label}`: its bias after BN is {} at channel {}: the values overflow f64",
                a.shift[r],
                self.rows.start + r
            ));
        }
        Ok(())
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
        Op::Conv { .. }
        | Op::Identity
        | Op::AvgPool { .. }
        | Op::InputBn(_)
        | Op::ThenConv { .. }
        | Op::ThenAvgPool { .. } => None,
        Op::Scale { weight } => Some(ChannelOp::Scale(read(weight)?)),
        Op::Bn(bn) => Some(ChannelOp::Bn(load_bn(ckpt, block, bn, rows)?)),
    })
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
    let mut first = read_finite(ckpt, block, weight, 0..mid * ipg)?;
    if *plus_identity {
        for m in 0..mid {
            first[m * ipg + m % ipg] += 1.0;
        }
    }
    let mut ops = Vec::new();
    for op in &branch.ops[..branch.split() - 1] {
        ops.extend(load_channel_op(ckpt, block, op, 0..mid)?);
    }
    Ok(Some(Sequence { first, mid, ops }))
}

/// A sequence branch's rows as one kernel `[rows, in/groups, side, side]` and the bias its
/// first stage's shift makes through the second (`through`), for output channels `rows`:
/// `K[o, i] = Σ_m K2[o, m]·s[m]·W1[m, i]` over the mid channels m of o's group,
/// `through[o] = Σ_m Σ_taps K2[o, m]·t[m]`. `second` holds the second conv's rows (`[rows, mid/groups, side,
/// side]`), or is `None` for an average (mid == out) of side `side`.
pub fn compose_rows(
    seq: &Sequence,
    mid_affine: &Affine,
    second: Option<&[f64]>,
    side: usize,
    rows: Range<usize>,
    grid: Grid,
) -> (Vec<f64>, Vec<f64>) {
    let (ipg, taps) = (grid.in_per_group, side * side);
    let mpg = match second {
        Some(k2) => k2.len() / (rows.len() * taps).max(1),
        None => grid.out_per_group,
    };
    let mut values = vec![0.0; rows.len() * ipg * taps];
    let mut through = vec![0.0; rows.len()];
    let avg = vec![1.0 / taps as f64; taps];
    for (r, o) in rows.enumerate() {
        let g = o / grid.out_per_group;
        let out = &mut values[r * ipg * taps..(r + 1) * ipg * taps];
        for ml in 0..mpg {
            let k2 = match second {
                Some(k2) => &k2[(r * mpg + ml) * taps..(r * mpg + ml + 1) * taps],
                None if ml == o % mpg => &avg[..],
                None => continue,
            };
            let m = g * mpg + ml;
            let (s, t) = (mid_affine.scale[m], mid_affine.shift[m]);
            through[r] += t * k2.iter().sum::<f64>();
            for i in 0..ipg {
                let w = s * seq.first[m * ipg + i];
                let dst = &mut out[i * taps..(i + 1) * taps];
                dst.iter_mut().zip(k2).for_each(|(d, k)| *d += k * w);
            }
        }
    }
    (values, through)
}

/// Branch `b` of `block` composed for output channels `rows`, if it is a sequence:
/// `(kernel rows, through, side)` (see [`compose_rows`]); `raw` holds the second conv's rows
/// as stored (`None` for an average).
pub fn compose_branch(
    values: &ChannelValues,
    block: &Block,
    b: usize,
    raw: Option<(Dtype, &[u8], usize)>,
    eps: f64,
) -> Result<Option<Composed>, BlockError> {
    let (Some(Some(seq)), Some(branch)) = (values.sequences.get(b), block.branches.get(b)) else {
        return Ok(None);
    };
    let mid_affine = seq.affine(eps);
    if let Some(i) = (mid_affine.scale.iter().chain(&mid_affine.shift)).position(|v| !v.is_finite())
    {
        return Err(BlockError::new(
            &block.name,
            format!(
                "branch `{}`: the ops after its first conv are not finite at channel {} (a BN with σ² + ε = 0?)",
                branch.label,
                i % seq.mid.max(1)
            ),
        ));
    }
    let (second, side) = match (branch.second(), raw) {
        (Some(Op::ThenAvgPool { kernel }), _) => (None, *kernel),
        (_, Some((dtype, bytes, side))) => {
            let w = crate::checkpoint::decode(dtype, bytes);
            if let Some(i) = first_non_finite(&w) {
                let name = branch.conv_weight().unwrap_or_default();
                return Err(BlockError::new(
                    &block.name,
                    format!(
                        "tensor `{name}` holds {} in the rows read; fusion needs finite values",
                        w[i]
                    ),
                ));
            }
            (Some(w), side)
        }
        _ => return Ok(None),
    };
    let rows = values.rows.clone();
    let (k, through) = compose_rows(
        seq,
        &mid_affine,
        second.as_deref(),
        side,
        rows,
        Grid::of(block),
    );
    Ok(Some((k, through, side)))
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
    Ok(BatchNorm {
        gamma: read(&bn.weight)?,
        beta: read(&bn.bias)?,
        mean: read(&bn.running_mean)?,
        var,
    })
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

// ---------------------------------------------------------------------------------------------
// Fusion

/// A branch's source as the fusion routine sees it, for a range of rows.
#[derive(Debug, Clone, Copy)]
pub enum Kernel<'a> {
    /// Conv weights `[rows, in/groups, kh, kw]` as raw bytes of `dtype`.
    Weights {
        /// Their dtype.
        dtype: Dtype,
        /// The rows' bytes.
        bytes: &'a [u8],
        /// Kernel `(kh, kw)`.
        side: (usize, usize),
        /// Spacing between taps.
        dilation: usize,
        /// A BN on the input, `(scale, shift)` per input channel: each input channel's taps
        /// are scaled, and the weights times the shifts go to the bias.
        input: Option<(&'a [f64], &'a [f64])>,
    },
    /// Kernels already in f64 (a composed sequence), `[rows, in/groups, side, side]`.
    Values {
        /// The rows' values.
        values: &'a [f64],
        /// Kernel side.
        side: usize,
    },
    /// Output channel o reads input channel `o mod (in/groups)` of its group at the centre.
    Identity,
    /// Output channel o averages input channel `o mod (in/groups)` over `side`×`side`.
    AvgPool {
        /// Window side.
        side: usize,
    },
}

/// One branch's share of a range of rows: `scale·kernel`, plus `shift` to the bias.
#[derive(Debug, Clone)]
pub struct Term<'a> {
    /// Where the kernel comes from.
    pub kernel: Kernel<'a>,
    /// α per row.
    pub scale: Vec<f64>,
    /// β per row.
    pub shift: Vec<f64>,
}

/// The block's kernel grid: `in/groups` channels of `k`×`k`, `out_per_group` rows a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    /// Input channels per group.
    pub in_per_group: usize,
    /// Kernel side.
    pub k: usize,
    /// Output channels per group.
    pub out_per_group: usize,
}

impl Grid {
    /// The grid of `block`.
    pub fn of(block: &Block) -> Grid {
        Grid {
            in_per_group: block.in_per_group,
            k: block.kernel,
            out_per_group: block.out_per_group(),
        }
    }

    /// Weights per row.
    pub fn row_len(&self) -> usize {
        self.in_per_group * self.k * self.k
    }

    /// Where tap (y, x) of a `kh`×`kw` kernel with `dilation` lands: its offset within one
    /// input channel of the grid, the kernel centred.
    #[inline(always)]
    fn tap(&self, (kh, kw): (usize, usize), dilation: usize, y: usize, x: usize) -> usize {
        let pad_y = (self.k - ((kh - 1) * dilation + 1)) / 2;
        let pad_x = (self.k - ((kw - 1) * dilation + 1)) / 2;
        (pad_y + y * dilation) * self.k + pad_x + x * dilation
    }

    /// `Σ` over the taps of row `w` (`[in/groups, kh, kw]`) of `f(tap in grid, weight)`.
    #[inline(always)]
    fn each_tap(
        &self,
        w: &[f64],
        (kh, kw): (usize, usize),
        dilation: usize,
        mut f: impl FnMut(usize, f64),
    ) {
        let kk = self.k * self.k;
        if kh == self.k && kw == self.k {
            w.iter().enumerate().for_each(|(i, &v)| f(i, v));
            return;
        }
        if (kh, kw) == (1, 1) {
            // One tap per input channel, at the centre: the common 1×1 branch, kept a
            // straight loop.
            let centre = (self.k / 2) * self.k + self.k / 2;
            w.iter()
                .enumerate()
                .for_each(|(i, &v)| f(i * kk + centre, v));
            return;
        }
        for i in 0..self.in_per_group {
            for y in 0..kh {
                for x in 0..kw {
                    let v = w[(i * kh + y) * kw + x];
                    f(i * kk + self.tap((kh, kw), dilation, y, x), v);
                }
            }
        }
    }

    /// The taps of input channel `ch` that a `side`-wide window at the centre covers.
    fn window(&self, ch: usize, side: usize) -> impl Iterator<Item = usize> + '_ {
        let base = ch * self.k * self.k;
        (0..side * side).map(move |t| base + self.tap((side, side), 1, t / side, t % side))
    }
}

/// Fused rows, encoded as they will be written.
#[derive(Debug, Clone, Default)]
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
    /// A weight of term `term` is NaN or infinite at element `index` of the rows.
    NonFinite {
        /// Index into the terms.
        term: usize,
        /// Element index within the rows' weight.
        index: usize,
        /// The value.
        value: f64,
    },
    /// A fused value overflows f64 or the output dtype.
    Overflow {
        /// Whether it is the bias (else the weight).
        bias: bool,
        /// Element index within the rows.
        index: usize,
        /// The value.
        value: f64,
    },
}

/// Scratch space of one row, reused across rows.
#[derive(Default)]
struct RowScratch {
    fused: Vec<f64>,
    w: Vec<f64>,
    written: Vec<f64>,
    bias_written: Vec<f64>,
}

/// What [`fuse_rows`] fuses: output channels `rows` of a block on `grid`, `Σ term.scale·kernel`
/// placed on the grid, bias `Σ term.shift (+ post_shift)`, written in `dtype`, probed on
/// `probe` (a `1 × C × k × k` input; the deviation stays 0 without one).
#[derive(Clone, Copy)]
pub struct FuseJob<'a> {
    /// The output channels.
    pub rows: &'a Range<usize>,
    /// The block's kernel grid.
    pub grid: Grid,
    /// Each branch's share of the rows.
    pub terms: &'a [Term<'a>],
    /// The post-ops' own shift per row, if the block has post-ops.
    pub post_shift: Option<&'a [f64]>,
    /// The output dtype.
    pub dtype: Dtype,
    /// The probe input.
    pub probe: Option<&'a Input>,
}

/// Fuses `job`'s rows into `out` (cleared first; pass a reused buffer to save fresh pages),
/// encoded as they will be written, with the probe deviation of the rows as written. The one
/// fusion routine: the converter, the tests and the fuzzer all fuse through it.
pub fn fuse_rows(out: Vec<u8>, job: &FuseJob) -> Result<FusedRows, RowError> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { fuse_rows_avx2(out, job) };
    }
    fuse_rows_any(out, job)
}

/// [`fuse_rows`] compiled for AVX2: the same code, with 4-wide f64 vectors in the inner loops.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fuse_rows_avx2(out: Vec<u8>, job: &FuseJob) -> Result<FusedRows, RowError> {
    fuse_rows_any(out, job)
}

#[inline(always)]
fn fuse_rows_any(weight: Vec<u8>, job: &FuseJob) -> Result<FusedRows, RowError> {
    let FuseJob {
        rows,
        grid,
        terms,
        post_shift,
        dtype,
        probe,
    } = *job;
    let depth = grid.row_len();
    let mut out = FusedRows {
        weight,
        ..FusedRows::default()
    };
    out.weight.clear();
    out.weight.reserve(rows.len() * depth * dtype_bytes(dtype));
    let mut scratch = RowScratch {
        fused: vec![0.0; depth],
        ..RowScratch::default()
    };
    for (r, o) in rows.clone().enumerate() {
        // The input group this row reads, `[in/groups, k, k]`: at the centre output, grid
        // tap (i, y, x) meets exactly x[g·in/groups + i, y, x].
        let g = o / grid.out_per_group;
        let patch = probe.map(|x| &x.data[g * depth..(g + 1) * depth]);
        let (mut unfused, mut bias) = fuse_row(&mut scratch, (r, o), grid, terms, patch)?;
        if let Some(p) = post_shift {
            bias += p[r];
            unfused += p[r];
        }
        encode_row(&mut out, &scratch.fused, bias, r, dtype)?;
        if let Some(patch) = patch {
            out.deviation =
                out.deviation
                    .merge(probe_row(&mut scratch, &out, dtype, patch, unfused));
        }
    }
    Ok(out)
}

/// Sums the terms' row `r` (output channel `o`) into `scratch.fused`; returns the unfused
/// output at the probe's centre (0 without a probe) and the bias before post-ops.
#[inline(always)]
fn fuse_row(
    scratch: &mut RowScratch,
    (r, o): (usize, usize),
    grid: Grid,
    terms: &[Term],
    patch: Option<&[f64]>,
) -> Result<(f64, f64), RowError> {
    // `fused` still holds the previous row: the first full-size term overwrites it (saving a
    // pass of zeros over every weight), anything else starts from zero.
    let mut fresh = true;
    let (mut unfused, mut bias) = (0.0, 0.0);
    for (ti, term) in terms.iter().enumerate() {
        let (a, b) = (term.scale[r], term.shift[r]);
        bias += b;
        let y = match term.kernel {
            Kernel::Weights {
                dtype,
                bytes,
                side,
                dilation,
                input,
            } => {
                let per_row = grid.in_per_group * side.0 * side.1;
                let row_bytes = per_row * dtype_bytes(dtype);
                let raw = &bytes[r * row_bytes..(r + 1) * row_bytes];
                decode_into(dtype, raw, &mut scratch.w);
                finite_row(&scratch.w, ti, r * per_row)?;
                // An input BN `s·x + t` (1×1 kernels only): w·s on the weights, w·t a bias.
                let through = input.map_or(0.0, |(s, t)| {
                    let through = dot(&scratch.w, t);
                    scratch.w.iter_mut().zip(s).for_each(|(w, s)| *w *= s);
                    through
                });
                bias += a * through;
                let first = std::mem::take(&mut fresh);
                let w = &scratch.w;
                add_weights(
                    grid,
                    &mut scratch.fused,
                    w,
                    (side, dilation),
                    a,
                    first,
                    patch,
                ) + through
            }
            Kernel::Values { values, side } => {
                let per_row = grid.in_per_group * side * side;
                let w = &values[r * per_row..(r + 1) * per_row];
                finite_row(w, ti, r * per_row)?;
                let first = std::mem::take(&mut fresh);
                add_weights(
                    grid,
                    &mut scratch.fused,
                    w,
                    ((side, side), 1),
                    a,
                    first,
                    patch,
                )
            }
            Kernel::Identity => {
                let first = std::mem::take(&mut fresh);
                add_window(grid, &mut scratch.fused, (o, 1), a, first, patch)
            }
            Kernel::AvgPool { side } => {
                let first = std::mem::take(&mut fresh);
                add_window(grid, &mut scratch.fused, (o, side), a, first, patch)
            }
        };
        if patch.is_some() {
            unfused += a * y + b;
        }
    }
    if fresh {
        scratch.fused.fill(0.0);
    }
    debug_assert_eq!(scratch.fused.len(), grid.row_len());
    Ok((unfused, bias))
}

/// Adds `a` times the identity (side 1) or a `side`×`side` average of input channel
/// `o mod (in/groups)` to `fused` (from zero if `first`); returns its own output at the centre
/// of `patch` (0 without one).
#[inline(always)]
fn add_window(
    grid: Grid,
    fused: &mut [f64],
    (o, side): (usize, usize),
    a: f64,
    first: bool,
    patch: Option<&[f64]>,
) -> f64 {
    if first {
        fused.fill(0.0);
    }
    let ch = o % grid.in_per_group;
    if side == 1 {
        // The identity: one tap at the centre.
        let at = ch * grid.k * grid.k + (grid.k / 2) * grid.k + grid.k / 2;
        fused[at] += a;
        return match patch {
            Some(p) => p[at],
            None => 0.0,
        };
    }
    let v = 1.0 / (side * side) as f64;
    grid.window(ch, side).for_each(|at| fused[at] += a * v);
    // A `match`, not `Option::map_or`: see `add_weights`.
    match patch {
        Some(p) => grid.window(ch, side).map(|at| p[at]).sum::<f64>() * v,
        None => 0.0,
    }
}

/// Refuses a row of term `term` holding NaN or ±∞ (its first element is element `start`).
#[inline(always)]
fn finite_row(w: &[f64], term: usize, start: usize) -> Result<(), RowError> {
    match first_non_finite(w) {
        Some(i) => Err(RowError::NonFinite {
            term,
            index: start + i,
            value: w[i],
        }),
        None => Ok(()),
    }
}

/// Adds `a·w` (one row of a `side`×`side` kernel, taps `dilation` apart) to `fused`, centred
/// (over whatever it holds unless `first`); returns the kernel's own conv at the centre of
/// `patch` (0 without one).
#[inline(always)]
fn add_weights(
    grid: Grid,
    fused: &mut [f64],
    w: &[f64],
    (side, dilation): ((usize, usize), usize),
    a: f64,
    first: bool,
    patch: Option<&[f64]>,
) -> f64 {
    // Plain loops and `match`, not closures through `Option::map_or`: those are compiled
    // outside the AVX2 build of the caller, and the probe's dot product ran scalar.
    if side == (grid.k, grid.k) {
        if first {
            fused.iter_mut().zip(w).for_each(|(f, w)| *f = a * w);
        } else {
            fused.iter_mut().zip(w).for_each(|(f, w)| *f += a * w);
        }
        return match patch {
            Some(p) => dot(w, p),
            None => 0.0,
        };
    }
    if first {
        fused.fill(0.0);
    }
    grid.each_tap(w, side, dilation, |at, v| fused[at] += a * v);
    match patch {
        Some(p) => {
            let mut y = 0.0;
            grid.each_tap(w, side, dilation, |at, v| y += v * p[at]);
            y
        }
        None => 0.0,
    }
}

/// Checks row `r`'s fused values and appends them, encoded in `dtype`, to `out`.
#[inline(always)]
fn encode_row(
    out: &mut FusedRows,
    fused: &[f64],
    bias: f64,
    r: usize,
    dtype: Dtype,
) -> Result<(), RowError> {
    let depth = fused.len();
    // A sum of finite terms can still overflow f64 itself; encode only sees inf then.
    if let Some(i) = first_non_finite(fused) {
        return Err(RowError::Overflow {
            bias: false,
            index: r * depth + i,
            value: fused[i],
        });
    }
    let bias_overflow = RowError::Overflow {
        bias: true,
        index: r,
        value: bias,
    };
    if !bias.is_finite() {
        return Err(bias_overflow);
    }
    encode(dtype, fused, &mut out.weight).map_err(|i| RowError::Overflow {
        bias: false,
        index: r * depth + i,
        value: fused[i],
    })?;
    encode(dtype, &[bias], &mut out.bias).map_err(|_| bias_overflow)
}

/// The last row of `out` as written, run on `patch` at the centre, against `unfused`.
#[inline(always)]
fn probe_row(
    scratch: &mut RowScratch,
    out: &FusedRows,
    dtype: Dtype,
    patch: &[f64],
    unfused: f64,
) -> Deviation {
    let width = dtype_bytes(dtype);
    let row_bytes = scratch.fused.len() * width;
    let weight = &out.weight[out.weight.len() - row_bytes..];
    decode_into(dtype, weight, &mut scratch.written);
    decode_into(
        dtype,
        &out.bias[out.bias.len() - width..],
        &mut scratch.bias_written,
    );
    let fused_out = dot(&scratch.written, patch) + scratch.bias_written[0];
    Deviation::of((fused_out - unfused).abs(), unfused.abs())
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

// ---------------------------------------------------------------------------------------------
// Forward

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
    eps: f64,
) -> Array2<f64> {
    let rows = values.rows.clone();
    let mut out = Array2::<f64>::zeros((rows.len(), x.input.positions()));
    let branches = block
        .branches
        .iter()
        .zip(&values.branches)
        .zip(&values.inputs);
    for ((((branch, (coef, ops)), input), w), seq) in branches.zip(sources).zip(&values.sequences) {
        let w = w.as_ref().map(|(w, hw)| (w.as_slice(), *hw));
        let mut y = match (input, seq) {
            (_, Some(seq)) => forward_sequence(block, branch, seq, w, x, (rows.clone(), eps)),
            (Some(bn), None) => forward_input_bn(block, bn, w, x, rows.clone(), eps),
            (None, None) => forward_source(block, branch, w, x, rows.clone()),
        };
        for op in ops {
            forward_channel_op(op, eps, &mut y);
        }
        out.scaled_add(*coef, &y);
    }
    for op in &values.post {
        forward_channel_op(op, eps, &mut out);
    }
    out
}

/// A sequence branch, as DBB runs it: the 1×1 conv on the input, its per-channel ops (a BN),
/// the map padded by what those ops make of zero (BNAndPad), then the second conv (or the
/// average) without padding; for output channels `rows`.
fn forward_sequence(
    block: &Block,
    branch: &Branch,
    seq: &Sequence,
    second: Option<(&[f64], (usize, usize))>,
    x: &BlockInput,
    (rows, eps): (Range<usize>, f64),
) -> Array2<f64> {
    let groups = block.groups.unwrap_or(1).max(1);
    let ipg = block.in_per_group;
    let cols1 = x.cols(1, 1);
    let mut mid = conv_rows(&cols1, &seq.first, 0..seq.mid, ipg, 1, seq.mid / groups);
    let mut pad = Array2::<f64>::zeros((seq.mid, 1));
    for op in &seq.ops {
        forward_channel_op(op, eps, &mut mid);
        forward_channel_op(op, eps, &mut pad);
    }
    let side = match (branch.second(), second) {
        (Some(Op::ThenAvgPool { kernel }), _) => *kernel,
        (_, Some((_, (kh, _)))) => kh,
        _ => 1,
    };
    let pad: Vec<f64> = pad.column(0).to_vec();
    let padded = pad_with(&mid, &pad, &x.input, side / 2);
    let cols = crate::conv::im2col(&padded, side, 1);
    let full = match second {
        Some((k2, _)) => {
            let mpg = k2.len() / (rows.len() * side * side).max(1);
            conv_rows(&cols, k2, rows.clone(), mpg, side, block.out_per_group())
        }
        None => {
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
    eps: f64,
) -> Array2<f64> {
    let mut cols = x.cols(1, 1).into_owned();
    for (c, mut row) in cols.rows_mut().into_iter().enumerate() {
        let (t, s) = bn_row(bn, eps, c % bn.var.len().max(1));
        Zip::from(&mut row).for_each(|v| *v = t * *v + s);
    }
    let w = weight.map_or(&[][..], |(w, _)| w);
    conv_rows(&cols, w, rows, block.in_per_group, 1, block.out_per_group())
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
        (Op::Conv { dilation, .. }, Some((w, (kh, kw)))) => {
            // A kh×kw kernel runs as the square one it is centred in (zero taps elsewhere):
            // the same convolution with the same padding.
            let side = kh.max(kw);
            let square = (kh != kw).then(|| centred(w, block.in_per_group, (kh, kw)));
            conv_rows(
                &x.cols(side, *dilation),
                square.as_deref().unwrap_or(w),
                rows,
                block.in_per_group,
                side,
                block.out_per_group(),
            )
        }
        (Op::AvgPool { kernel }, _) => {
            // Channel o's window: rows o·k²..(o+1)·k² of the k×k im2col, averaged.
            let cols = x.cols(*kernel, 1);
            let kk = kernel * kernel;
            let mut y = Array2::<f64>::zeros((rows.len(), cols.ncols()));
            for (r, o) in rows.enumerate() {
                let window = cols.slice(s![o * kk..(o + 1) * kk, ..]);
                y.row_mut(r).assign(&window.sum_axis(ndarray::Axis(0)));
            }
            y / kk as f64
        }
        // The identity reads input channel o for output channel o.
        _ => x.cols(1, 1).slice(s![rows, ..]).to_owned(),
    }
}

/// Kernels `[rows, cpg, kh, kw]` zero-padded to `[rows, cpg, side, side]`, centred.
fn centred(w: &[f64], cpg: usize, (kh, kw): (usize, usize)) -> Vec<f64> {
    let side = kh.max(kw);
    let (py, px) = ((side - kh) / 2, (side - kw) / 2);
    let channels = w.len() / (kh * kw).max(1);
    let mut out = vec![0.0; channels * side * side];
    for c in 0..channels {
        for y in 0..kh {
            for x in 0..kw {
                out[(c * side + py + y) * side + px + x] = w[(c * kh + y) * kw + x];
            }
        }
    }
    debug_assert_eq!(channels % cpg.max(1), 0);
    out
}

/// A per-channel op applied to outputs `y` (`[rows, positions]`).
fn forward_channel_op(op: &ChannelOp, eps: f64, y: &mut Array2<f64>) {
    for (r, mut row) in y.rows_mut().into_iter().enumerate() {
        match op {
            ChannelOp::Bias(c) => row += c[r],
            ChannelOp::Scale(g) => row *= g[r],
            ChannelOp::Bn(bn) => {
                let (t, s) = bn_row(bn, eps, r);
                Zip::from(&mut row).for_each(|v| *v = t * *v + s);
            }
        }
    }
}

/// BN `r`'s `(γ/√(σ² + ε), β − μ·γ/√(σ² + ε))`.
fn bn_row(bn: &BatchNorm, eps: f64, r: usize) -> (f64, f64) {
    let t = bn.gamma[r] / (bn.var[r] + eps).sqrt();
    (t, bn.beta[r] - t * bn.mean[r])
}
