//! Checking a block's tensors against each other before anything is read: shapes, kernel
//! extents, groups, per-channel lengths, the ConvTranspose geometry, sequences and OREPA's
//! tensors. `Block::new` calls these; every error names the block and the tensor at fault.

use super::{
    BlockError, BnTensors, Branch, MAX_KERNEL, Op, OrepaTensors, Role, dilated, fused_kernel,
    kernel_hw,
};
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::dtype::float_width;

/// What the checks need of a checkpoint while a block is being built.
pub(super) struct Checker<'a> {
    pub(super) ckpt: &'a Checkpoint,
    pub(super) name: &'a str,
    /// The block has one branch (a Conv→BN fold): its kernel is never placed beside another's,
    /// so it may be even (ultralytics' HGStem 2×2).
    pub(super) single: bool,
}

impl<'a> Checker<'a> {
    pub(super) fn err(&self, what: String) -> BlockError {
        BlockError::new(self.name, what)
    }

    pub(super) fn get(&self, tensor: &str) -> Result<&'a TensorInfo, BlockError> {
        self.ckpt
            .get(tensor)
            .ok_or_else(|| self.err(format!("tensor `{tensor}` is missing")))
    }

    pub(super) fn float(&self, tensor: &str) -> Result<&'a TensorInfo, BlockError> {
        let t = self.get(tensor)?;
        match float_width(t.dtype) {
            Some(_) => Ok(t),
            None => Err(self.err(format!(
                "tensor `{}` is {:?}; expected a floating-point dtype (F16, BF16, F32 or F64)",
                t.name, t.dtype
            ))),
        }
    }

    /// A per-channel tensor: `[len]`, or `[len, 1, …]` where `allow_trailing_ones`.
    pub(super) fn vector(
        &self,
        tensor: &str,
        len: usize,
        allow_trailing_ones: bool,
    ) -> Result<(), BlockError> {
        let t = self.float(tensor)?;
        // `[len]`, or with ones around it where allowed (`[len, 1, 1]`, an ONNX `[1, len, 1, 1]`).
        let squeezed: Vec<usize> = t.shape.iter().copied().filter(|&d| d != 1).collect();
        let ok = t.shape == [len]
            || allow_trailing_ones
                && t.shape.iter().product::<usize>() == len
                && squeezed.len() <= 1;
        if ok {
            Ok(())
        } else {
            Err(self.err(format!(
                "tensor `{}` has shape {:?}; expected [{len}], one value per output channel",
                t.name, t.shape
            )))
        }
    }

    /// Checks that `tensor` holds one value per output channel (ones around it allowed) or
    /// one value for every channel.
    pub(super) fn vector_or_one(&self, tensor: &str, len: usize) -> Result<(), BlockError> {
        if self.float(tensor)?.numel() == 1 {
            return Ok(());
        }
        self.vector(tensor, len, true)
    }

    /// Checks a conv weight on its own; returns it and its extent `(height, width)` (the
    /// dilated kernel).
    pub(super) fn conv(
        &self,
        branch: &Branch,
        weight: &str,
        (dilation, asymmetric): (usize, bool),
    ) -> Result<(&'a TensorInfo, (usize, usize)), BlockError> {
        let w = self.float(weight)?;
        if w.shape.len() != 4 && w.shape.len() != 2 {
            return Err(self.err(format!(
                "conv weight `{}` has shape {:?}; expected 4 dimensions [out, in/groups, k, k] (or a Linear's 2, [out, in])",
                w.name, w.shape
            )));
        }
        let (kh, kw) = kernel_hw(w);
        // Odd once dilated: RepNeXt's 2×2 conv at dilation 2 covers a 3×3 (its corners).
        let odd = |k: usize| k > 0 && ((k - 1) * dilation.max(1)).is_multiple_of(2);
        let even = (!odd(kh) || !odd(kw)) && !self.single;
        if even || (kh != kw && !asymmetric) {
            let shape = if asymmetric { "kh×kw" } else { "a square" };
            return Err(self.err(format!(
                "conv weight `{}` has a {kh}×{kw} kernel; expected {shape} kernel of odd size",
                w.name
            )));
        }
        let extent = dilated((kh, kw), dilation);
        if extent.0 > MAX_KERNEL || extent.1 > MAX_KERNEL {
            return Err(self.err(format!(
                "conv weight `{}` has a {}×{} kernel; expected at most {MAX_KERNEL}×{MAX_KERNEL}",
                w.name, extent.0, extent.1
            )));
        }
        if branch.role == Role::Pointwise && (kh, kw) != (1, 1) {
            return Err(self.err(format!(
                "1×1 branch `{}` has weight `{}` of shape {:?}; expected a 1×1 kernel",
                branch.label, w.name, w.shape
            )));
        }
        Ok((w, extent))
    }
}

/// The main conv and the block's fused kernel `(kh, kw)`: the largest extent in each
/// direction of every conv and pool of the branches ([`fused_kernel`]).
pub(super) fn main_conv<'a>(
    c: &Checker<'a>,
    branches: &[Branch],
) -> Result<(&'a TensorInfo, (usize, usize)), BlockError> {
    let mut main: Option<&TensorInfo> = None;
    // Each source's extent, and what it is (for the message).
    let mut extents: Vec<((usize, usize), String)> = Vec::new();
    for b in branches {
        if let Some(Op::ThenConv { weight }) = b.second() {
            let side = sequence_extent(c, b, weight)?;
            extents.push(((side, side), weight.clone()));
            continue;
        }
        match b.source() {
            Op::Conv {
                weight,
                dilation,
                asymmetric,
                ..
            } => {
                let (w, extent) = c.conv(b, weight, (*dilation, *asymmetric))?;
                main.get_or_insert(w);
                extents.push((extent, weight.clone()));
            }
            // 0 is "the block's kernel" (DBB's average): it takes the others' extent.
            Op::AvgPool { kernel: k } if *k > 0 => {
                extents.push(((*k, *k), format!("the average of branch `{}`", b.label)));
            }
            // OREPA's kernel is as large as its main (origin) kernel.
            Op::Orepa(t) => {
                let (w, extent) = c.conv(b, &t.origin, (1, false))?;
                main.get_or_insert(w);
                extents.push((extent, t.origin.clone()));
            }
            _ => {}
        }
    }
    let Some(main) = main else {
        return Err(c.err("it has no conv branch".to_string()));
    };
    let sizes: Vec<(usize, usize)> = extents.iter().map(|(e, _)| *e).collect();
    let Some(kernel) = fused_kernel(&sizes, c.single) else {
        let (e, what) = extents
            .iter()
            .find(|(e, _)| e.0 % 2 == 0 || e.1 % 2 == 0)
            .cloned()
            .unwrap_or_default();
        return Err(c.err(format!(
            "{what} spans {}×{}; a branch is centred in the fused kernel, so every extent must be odd in each direction",
            e.0, e.1
        )));
    };
    if main.shape[0] == 0 || main.shape[1] == 0 {
        return Err(c.err(format!(
            "conv weight `{}` has shape {:?}, with no channels",
            main.name, main.shape
        )));
    }
    Ok((main, kernel))
}

/// What [`channel_geometry`] finds: the main weight's output axis, the block's
/// `(out, in/groups)`, the groups the axis settles.
pub(super) type Geometry = (usize, (usize, usize), Option<usize>);

/// The main weight's output axis, the block's `(out, in/groups)`, and the groups it settles:
/// a conv's `[out, in/groups, …]` settles none; a ConvTranspose's `[in, out/groups, kh, kw]`
/// takes `out` from its first per-channel tensor (its BN), `groups = out / (out/groups)`.
pub(super) fn channel_geometry(
    c: &Checker,
    branches: &[Branch],
    post: &[Op],
    main: &TensorInfo,
) -> Result<Geometry, BlockError> {
    let transposed = branches
        .iter()
        .find(|b| matches!(b.source(), Op::Conv { out_axis: 1.., .. }));
    let Some(branch) = transposed else {
        return Ok((0, (main.shape[0], main.shape[1]), None));
    };
    if main.shape.len() == 2 {
        return linear_geometry(c, branches, main);
    }
    let alone = branches.len() == 1 && branch.second().is_none() && branch.input_bn().is_none();
    if !alone || main.shape.len() != 4 {
        return Err(c.err(format!(
            "`{}` is a ConvTranspose weight (output channels on dim 1): it folds alone, a 4-D weight with per-channel ops after it, not beside other branches",
            main.name
        )));
    }
    let (inputs, out_per_group) = (main.shape[0], main.shape[1]);
    let first_vector = (branch.ops.iter().chain(post))
        .flat_map(|op| match op {
            Op::Conv { bias, .. } => bias.iter().collect::<Vec<_>>(),
            Op::Bn(bn) => vec![&bn.weight],
            Op::Scale { weight } => vec![weight],
            _ => Vec::new(),
        })
        .next();
    let out = match first_vector {
        Some(t) => c.float(t)?.numel(),
        None => out_per_group,
    };
    let groups = out.checked_div(out_per_group).unwrap_or(0);
    if groups == 0 || groups * out_per_group != out || inputs % groups != 0 {
        return Err(c.err(format!(
            "ConvTranspose weight `{}` has shape {:?} ([in, out/groups, kh, kw]) but {out} output channels: expected {out} to be a multiple of {out_per_group}, in groups that divide its {inputs} inputs",
            main.name, main.shape
        )));
    }
    Ok((1, (out, inputs / groups), Some(groups)))
}

/// A Linear stored `[in, out]` (ONNX's `MatMul`, `Gemm` with `transB` 0): one group, and
/// every Linear of the block stored so, since every branch's rows are read through the
/// block's one output axis.
fn linear_geometry(
    c: &Checker,
    branches: &[Branch],
    main: &TensorInfo,
) -> Result<Geometry, BlockError> {
    let other = branches.iter().find_map(|b| match b.source() {
        Op::Conv {
            weight,
            out_axis: 0,
            ..
        } => Some(weight),
        _ => None,
    });
    if let Some(w) = other {
        return Err(c.err(format!(
            "`{w}` is stored [out, in] beside `{}` stored [in, out]: one block reads every weight along one output axis",
            main.name
        )));
    }
    Ok((1, (main.shape[1], main.shape[0]), Some(1)))
}

/// Checks every branch against the main conv's `(out, in/groups)`; returns the groups the
/// branches settle (an identity, an input BN, a sequence's second conv), if any.
pub(super) fn check_branches(
    c: &Checker,
    branches: &[Branch],
    main: &TensorInfo,
    (out_channels, in_per_group): (usize, usize),
) -> Result<Option<usize>, BlockError> {
    let mut groups: Option<usize> = None;
    let mut settle = |g: usize, b: &Branch| match groups.replace(g) {
        Some(before) if before != g => Err(c.err(format!(
            "branch `{}` needs {g} groups where the others need {before}",
            b.label
        ))),
        _ => Ok(()),
    };
    for b in branches {
        if b.second().is_some() {
            if let Some(g) = check_sequence(c, b, out_channels, in_per_group)? {
                settle(g, b)?;
            }
            continue;
        }
        // A ConvTranspose is the block's only conv: its geometry is the block's. A Linear
        // stored [in, out] is checked transposed.
        if let Op::Conv {
            weight, out_axis, ..
        } = b.source()
            && (*out_axis == 0 || c.get(weight)?.shape.len() == 2)
        {
            let w = c.get(weight)?;
            let (o, i) = match out_axis {
                0 => (w.shape[0], w.shape[1]),
                _ => (w.shape[1], w.shape[0]),
            };
            if o != out_channels || i != in_per_group {
                return Err(c.err(format!(
                        "branch `{}` weight `{}` has shape {:?}, but `{}` has {:?}: expected [{out_channels}, {in_per_group}, k, k] in every branch",
                        b.label, w.name, w.shape, main.name, main.shape
                    )));
            }
        }
        if let Op::ConvFc { weight } = b.source() {
            settle(check_conv_fc(c, weight, (out_channels, in_per_group))?, b)?;
        }
        for op in &b.ops {
            if let Op::GroupBn(bn) = op {
                settle(check_group_bn(c, bn, out_channels)?, b)?;
            }
        }
        if matches!(b.source(), Op::Identity | Op::AvgPool { .. }) {
            // The identity maps input channel o to output channel o: in == out.
            if out_channels % in_per_group != 0 {
                return Err(c.err(format!(
                        "identity branch `{}` needs in == out channels, but {out_channels} output channels are not a multiple of {in_per_group} input channels per group",
                        b.label
                    )));
            }
            settle(out_channels / in_per_group, b)?;
        }
        if let Op::Orepa(t) = b.source() {
            settle(check_orepa(c, t, out_channels, in_per_group)?, b)?;
        }
        check_channel_ops(c, &b.ops, out_channels)?;
        if let Some(bn) = b.input_bn() {
            check_input_bn(c, b, bn, in_per_group)?;
            // A BN over all `in_per_group` inputs of every output: one group.
            settle(1, b)?;
        }
    }
    Ok(groups)
}

/// The side of a sequence branch's composed kernel: a first conv kh₁×kw₁ then a second
/// kh₂×kw₂ compose into one (kh₁ + kh₂ − 1)×(kw₁ + kw₂ − 1) conv, which must be square and
/// odd (RepNeXt's 1×k → k×1 is k×k; DBB's 1×1 → k×k is k×k).
pub(super) fn sequence_extent(c: &Checker, b: &Branch, second: &str) -> Result<usize, BlockError> {
    let (w2, _) = c.conv(b, second, (1, true))?;
    let first = match b.source() {
        Op::Conv { weight, .. } => c.conv(b, weight, (1, true))?.0,
        _ => {
            return Err(c.err(format!(
                "branch `{}`: a sequence starts with a conv",
                b.label
            )));
        }
    };
    let ((kh1, kw1), (kh2, kw2)) = (kernel_hw(first), kernel_hw(w2));
    let (h, w) = (kh1 + kh2 - 1, kw1 + kw2 - 1);
    if h != w || h % 2 == 0 || h > MAX_KERNEL {
        return Err(c.err(format!(
            "branch `{}`: `{}` ({kh1}×{kw1}) then `{second}` ({kh2}×{kw2}) compose into a {h}×{w} kernel; expected a square one of odd size",
            b.label, first.name
        )));
    }
    Ok(h)
}

/// A sequence branch (DBB's 1×1 → k×k): its first conv `[mid, in/groups, 1, 1]`, the
/// per-channel ops over `mid`, the second conv `[out, mid/groups, k, k]` (or an average, mid ==
/// out), the per-channel ops over `out`. Returns the groups the second conv settles.
pub(super) fn check_sequence(
    c: &Checker,
    b: &Branch,
    out: usize,
    in_per_group: usize,
) -> Result<Option<usize>, BlockError> {
    let err = |what: String| Err(c.err(format!("branch `{}`: {what}", b.label)));
    let Op::Conv {
        weight,
        plus_identity,
        ..
    } = b.source()
    else {
        return err("a sequence starts with a 1×1 conv".into());
    };
    let w1 = c.float(weight)?;
    if w1.shape.len() != 4 || w1.shape[1] != in_per_group {
        return err(format!(
            "`{weight}` has shape {:?}; expected [mid, {in_per_group}, kh, kw]",
            w1.shape
        ));
    }
    // One conv computes the two exactly when along each axis one of them has extent 1: the
    // other's padding then meets only what the ops make of zero (see `Op::ThenConv`).
    if let Some(Op::ThenConv { weight: w2 }) = b.second() {
        let ((kh1, kw1), (kh2, kw2)) = (kernel_hw(w1), kernel_hw(c.float(w2)?));
        if (kh1 > 1 && kh2 > 1) || (kw1 > 1 && kw2 > 1) || *plus_identity && (kh1, kw1) != (1, 1) {
            return err(format!(
                "`{weight}` ({kh1}×{kw1}) then `{w2}` ({kh2}×{kw2}): a sequence needs one of the two convs 1 wide along each axis"
            ));
        }
    } else if kernel_hw(w1) != (1, 1) {
        return err(format!("`{weight}` before an average must be 1×1"));
    }
    let mid = w1.shape[0];
    let split = b.split();
    check_channel_ops(c, &b.ops[..split - 1], mid)?;
    check_channel_ops(c, &b.ops[split..], out)?;
    let groups = match b.second() {
        Some(Op::ThenConv { weight }) => {
            let k2 = c.float(weight)?;
            let mpg = k2.shape.get(1).copied().unwrap_or(0);
            if k2.shape[0] != out || mpg == 0 || mid % mpg != 0 || !out.is_multiple_of(mid / mpg) {
                return err(format!(
                    "`{weight}` has shape {:?}; expected [{out}, mid/groups, k, k] after {mid} channels",
                    k2.shape
                ));
            }
            Some(mid / mpg)
        }
        _ if mid != out => return err(format!("an average needs mid == out, not {mid} → {out}")),
        _ => None,
    };
    if *plus_identity
        && (mid % in_per_group != 0 || groups.is_some_and(|g| g * in_per_group != mid))
    {
        return err(format!(
            "`{weight}` plus the identity needs its {mid} outputs to equal its inputs"
        ));
    }
    Ok(groups)
}

/// A conv-as-FC kernel `[groups, 1, k, k]` (k odd) over patches of `in/groups` = h·w
/// positions, h = w, for `groups`·h·w outputs; returns the groups.
pub(super) fn check_conv_fc(
    c: &Checker,
    weight: &str,
    (out, ipg): (usize, usize),
) -> Result<usize, BlockError> {
    let w = c.float(weight)?;
    let side = (1..=ipg).find(|s| s * s >= ipg).unwrap_or(0);
    match w.shape[..] {
        [g, 1, k, kw] if k == kw && k % 2 == 1 && g * ipg == out && side * side == ipg => Ok(g),
        _ => Err(c.err(format!(
            "conv `{weight}` has shape {:?}; expected [groups, 1, k, k] (k odd) with groups·{ipg} = {out} outputs, over square patches of {ipg} positions",
            w.shape
        ))),
    }
}

/// A BN with one channel per group (`[groups]`, dividing the `out` channels); returns the
/// groups.
pub(super) fn check_group_bn(c: &Checker, bn: &BnTensors, out: usize) -> Result<usize, BlockError> {
    let groups = c.float(&bn.weight)?.shape.first().copied().unwrap_or(0);
    if groups == 0 || !out.is_multiple_of(groups) {
        return Err(c.err(format!(
            "BN `{}` has {groups} channels; expected one per group, dividing {out} output channels",
            bn.weight
        )));
    }
    for t in [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var] {
        c.vector(t, groups, false)?;
    }
    Ok(groups)
}

/// An input BN: one value per input channel, before a 1×1 kernel (it cannot fold exactly
/// into a larger one: the zero padding is not normalized).
pub(super) fn check_input_bn(
    c: &Checker,
    b: &Branch,
    bn: &BnTensors,
    inputs: usize,
) -> Result<(), BlockError> {
    for t in [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var] {
        let info = c.float(t)?;
        if info.shape != [inputs] {
            return Err(c.err(format!(
                "tensor `{t}` has shape {:?}; expected [{inputs}], one value per input channel of branch `{}`",
                info.shape, b.label
            )));
        }
    }
    match b.source() {
        Op::Conv { weight, .. } if c.get(weight).map(kernel_hw)? == (1, 1) => Ok(()),
        _ => Err(c.err(format!(
            "branch `{}` has a BN on its input but no 1×1 conv or Linear after it",
            b.label
        ))),
    }
}

/// Checks the per-channel tensors of `ops` (the source op's bias included).
pub(super) fn check_channel_ops(c: &Checker, ops: &[Op], out: usize) -> Result<(), BlockError> {
    for op in ops {
        match op {
            Op::Conv {
                bias: Some(bias), ..
            } => c.vector(bias, out, false)?,
            Op::Bn(bn) => {
                for t in [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var] {
                    c.vector(t, out, false)?;
                }
            }
            Op::Scale { weight } => c.vector(weight, out, true)?,
            Op::Affine { weight, bias } => {
                c.vector(weight, out, true)?;
                c.vector(bias, out, false)?;
            }
            Op::Shift { bias: t, .. } | Op::Divide { divisor: t } => c.vector_or_one(t, out)?,
            Op::Scalar { weight } => {
                let t = c.float(weight)?;
                if t.shape.iter().product::<usize>() != 1 || t.shape.len() > 1 {
                    return Err(c.err(format!(
                        "tensor `{weight}` has shape {:?}; expected [1], one value for the branch",
                        t.shape
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The tensor that settles a per-channel block's channels (its first per-channel op's), when
/// every branch reads the input as it is; `None` for a block with a kernel.
pub(super) fn per_channel_main<'a>(
    c: &Checker<'a>,
    branches: &[Branch],
) -> Result<Option<&'a TensorInfo>, BlockError> {
    if branches.is_empty() || !branches.iter().all(|b| matches!(b.source(), Op::Identity)) {
        return Ok(None);
    }
    let first = branches
        .iter()
        .flat_map(|b| &b.ops)
        .find_map(|op| match op {
            Op::Affine { weight, .. } | Op::Scale { weight } => Some(weight),
            Op::Bn(bn) => Some(&bn.weight),
            _ => None,
        });
    match first {
        Some(weight) => c.float(weight).map(Some),
        None => Err(c.err(
            "it has no conv branch, and no per-channel tensor that would give its channels"
                .to_string(),
        )),
    }
}

/// Checks OREPA's tensors against its main kernel `[out, in/groups, k, k]`; returns the
/// groups they settle (`T / conv2`'s second dimension).
pub(super) fn check_orepa(
    c: &Checker,
    t: &OrepaTensors,
    out: usize,
    ipg: usize,
) -> Result<usize, BlockError> {
    let k = c.get(&t.origin).map(kernel_hw)?.0;
    let shape = |name: &str, want: &[usize]| -> Result<(), BlockError> {
        let info = c.float(name)?;
        if info.shape == want {
            return Ok(());
        }
        Err(c.err(format!(
            "OREPA tensor `{name}` has shape {:?}; expected {want:?} beside `{}`",
            info.shape, t.origin
        )))
    };
    for name in [&t.avg_conv, &t.pfir_conv, &t.one] {
        shape(name, &[out, ipg, 1, 1])?;
    }
    shape(&t.avg_avg, &[k, k])?;
    shape(&t.prior, &[out, k, k])?;
    shape(&t.vector, &[6, out])?;
    let mid = c.float(&t.idconv1)?.shape.first().copied().unwrap_or(0);
    shape(&t.idconv1, &[mid, ipg, 1, 1])?;
    shape(&t.id_tensor, &[mid, ipg, 1, 1])?;
    let mpg = c.float(&t.conv2)?.shape.get(1).copied().unwrap_or(0);
    shape(&t.conv2, &[out, mpg, k, k])?;
    if mpg == 0 || mid % mpg != 0 || !out.is_multiple_of(mid / mpg) {
        return Err(c.err(format!(
            "OREPA tensor `{}` has {mpg} channels per group after {mid} internal channels; expected a divisor giving groups that divide {out}",
            t.conv2
        )));
    }
    let groups = mid / mpg;
    let dw = c.float(&t.dw)?.shape.first().copied().unwrap_or(0);
    let inputs = ipg * groups;
    if dw == 0 || dw % inputs != 0 {
        return Err(c.err(format!(
            "OREPA tensor `{}` has {dw} channels; expected a multiple of the {inputs} inputs",
            t.dw
        )));
    }
    shape(&t.dw, &[dw, 1, k, k])?;
    shape(&t.pw, &[out, dw / groups, 1, 1])?;
    Ok(groups)
}
