//! A re-parameterizable block: its branches, the tensors each one reads, and the shape checks
//! that make fusion well defined.

use safetensors::Dtype;
use serde::Serialize;

use crate::checkpoint::{Checkpoint, TensorInfo, float_width};
use crate::layout::Role;

/// Largest kernel side a block may have: RepLKNet's 31×31, the largest in the
/// re-parameterization literature. Checking a block costs memory in the kernel side to the
/// fourth power (the probe input grows with the kernel), so a larger one is refused rather
/// than run out of memory.
pub const MAX_KERNEL: usize = 31;

/// A block whose shapes or tensors do not fit together.
#[derive(Debug, thiserror::Error)]
#[error("block `{block}`: {what}")]
pub struct BlockError {
    /// The block prefix.
    pub block: String,
    /// What is wrong, naming the tensor.
    pub what: String,
}

impl BlockError {
    /// An error about block `block`.
    pub fn new(block: &str, what: impl Into<String>) -> Self {
        Self {
            block: block.to_string(),
            what: what.into(),
        }
    }
}

/// The tensors of a branch's conv.
#[derive(Debug, Clone, Serialize)]
pub struct ConvTensors {
    /// `[out, in/groups, k, k]` kernel.
    pub weight: String,
    /// The conv's own bias, where it has one.
    pub bias: Option<String>,
}

/// The tensors of a BatchNorm.
#[derive(Debug, Clone, Serialize)]
pub struct BnTensors {
    /// γ.
    pub weight: String,
    /// β.
    pub bias: String,
    /// μ.
    pub running_mean: String,
    /// σ².
    pub running_var: String,
}

/// One branch of a block: conv (+ bias) (+ BN), or BN alone for the identity.
#[derive(Debug, Clone, Serialize)]
pub struct Branch {
    /// The branch's path under the block, e.g. `rbr_dense` or `conv_kxk.1`.
    pub label: String,
    /// The part it plays.
    pub role: Role,
    /// Its conv, absent for the identity branch.
    pub conv: Option<ConvTensors>,
    /// Its BN, absent for a conv that carries its own bias instead.
    pub bn: Option<BnTensors>,
    /// The BN's step counter, dropped with the branch.
    pub num_batches_tracked: Option<String>,
}

impl Branch {
    /// Name of the conv weight, or of the BN weight for the identity branch.
    pub fn conv_weight_name(&self) -> String {
        match (&self.conv, &self.bn) {
            (Some(c), _) => c.weight.clone(),
            (None, Some(bn)) => bn.weight.clone(),
            (None, None) => String::new(),
        }
    }

    /// Every tensor of the branch.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(c) = &self.conv {
            v.push(c.weight.clone());
            v.extend(c.bias.clone());
        }
        if let Some(bn) = &self.bn {
            v.extend([
                bn.weight.clone(),
                bn.bias.clone(),
                bn.running_mean.clone(),
                bn.running_var.clone(),
            ]);
        }
        v.extend(self.num_batches_tracked.clone());
        v
    }
}

/// A checked block: every branch agrees on output channels and input channels per group, every
/// kernel is odd, square and no larger than the block's.
#[derive(Debug, Clone)]
pub struct Block {
    /// The block prefix exactly as in the checkpoint, e.g. `stages.2.13`.
    pub name: String,
    /// Branches, k×k first.
    pub branches: Vec<Branch>,
    /// Output channels.
    pub out_channels: usize,
    /// Input channels per group (the kernel's second dimension).
    pub in_per_group: usize,
    /// The fused kernel size (the largest branch kernel).
    pub kernel: usize,
    /// Groups, when the weights settle it (an identity branch means in == out).
    pub groups: Option<usize>,
    /// dtype of the main conv weight, which the fused conv keeps by default.
    pub dtype: Dtype,
    /// Name of the fused weight in the deploy file.
    pub deploy_weight: String,
    /// Name of the fused bias in the deploy file.
    pub deploy_bias: String,
    /// Every tensor the block consumes, which the deploy file drops.
    pub consumed: Vec<String>,
}

impl Block {
    /// Checks the branches' tensors in `ckpt` against each other.
    pub fn new(
        ckpt: &Checkpoint,
        name: &str,
        branches: Vec<Branch>,
        deploy_weight: String,
        deploy_bias: String,
    ) -> Result<Block, BlockError> {
        let err = |what: String| BlockError::new(name, what);
        let get = |tensor: &str| -> Result<&TensorInfo, BlockError> {
            ckpt.get(tensor)
                .ok_or_else(|| err(format!("tensor `{tensor}` is missing")))
        };
        let float = |t: &TensorInfo| -> Result<(), BlockError> {
            match float_width(t.dtype) {
                Some(_) => Ok(()),
                None => Err(err(format!(
                    "tensor `{}` is {:?}; expected a floating-point dtype (F16, BF16, F32 or F64)",
                    t.name, t.dtype
                ))),
            }
        };

        // The main weight sets out channels and in-per-group; the largest kernel sets k.
        let mut main: Option<&TensorInfo> = None;
        let mut kernel = 0;
        for b in &branches {
            let Some(conv) = &b.conv else { continue };
            let w = get(&conv.weight)?;
            float(w)?;
            if w.shape.len() != 4 {
                return Err(err(format!(
                    "conv weight `{}` has shape {:?}; expected 4 dimensions [out, in/groups, k, k]",
                    w.name, w.shape
                )));
            }
            let (kh, kw) = (w.shape[2], w.shape[3]);
            if kh != kw || kh % 2 == 0 {
                return Err(err(format!(
                    "conv weight `{}` has a {kh}×{kw} kernel; expected a square kernel of odd size",
                    w.name
                )));
            }
            if kh > MAX_KERNEL {
                return Err(err(format!(
                    "conv weight `{}` has a {kh}×{kh} kernel; expected at most {MAX_KERNEL}×{MAX_KERNEL}",
                    w.name
                )));
            }
            if b.role == Role::Scale && kh != 1 {
                return Err(err(format!(
                    "1×1 branch `{}` has weight `{}` of shape {:?}; expected a 1×1 kernel",
                    b.label, w.name, w.shape
                )));
            }
            if main.is_none() {
                main = Some(w);
            }
            kernel = kernel.max(kh);
        }
        let Some(main) = main else {
            return Err(err("it has no conv branch".to_string()));
        };
        let (out_channels, in_per_group) = (main.shape[0], main.shape[1]);
        if out_channels == 0 || in_per_group == 0 {
            return Err(err(format!(
                "conv weight `{}` has shape {:?}, with no channels",
                main.name, main.shape
            )));
        }
        let mut groups = None;
        let mut consumed = Vec::new();
        for b in &branches {
            if let Some(conv) = &b.conv {
                let w = get(&conv.weight)?;
                if w.shape[0] != out_channels || w.shape[1] != in_per_group {
                    return Err(err(format!(
                        "branch `{}` weight `{}` has shape {:?}, but `{}` has {:?}: expected [{out_channels}, {in_per_group}, k, k] in every branch",
                        b.label, w.name, w.shape, main.name, main.shape
                    )));
                }
                if let Some(bias) = &conv.bias {
                    let t = get(bias)?;
                    float(t)?;
                    vector(t, out_channels).map_err(err)?;
                }
            }
            if let Some(bn) = &b.bn {
                for tensor in [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var] {
                    let t = get(tensor)?;
                    float(t)?;
                    vector(t, out_channels).map_err(err)?;
                }
            }
            if b.role == Role::Identity {
                // The identity maps input channel o to output channel o: in == out.
                if out_channels % in_per_group != 0 {
                    return Err(err(format!(
                        "identity branch `{}` needs in == out channels, but {out_channels} output channels are not a multiple of {in_per_group} input channels per group",
                        b.label
                    )));
                }
                groups = Some(out_channels / in_per_group);
            }
            consumed.extend(b.tensor_names());
        }
        Ok(Block {
            name: name.to_string(),
            dtype: main.dtype,
            branches,
            out_channels,
            in_per_group,
            kernel,
            groups,
            deploy_weight,
            deploy_bias,
            consumed,
        })
    }

    /// Input channels: known when groups are.
    pub fn in_channels(&self) -> Option<usize> {
        self.groups.map(|g| g * self.in_per_group)
    }

    /// Whether the block has an identity branch.
    pub fn has_identity(&self) -> bool {
        self.branches.iter().any(|b| b.role == Role::Identity)
    }

    /// Output channels per group, for splitting the work on group boundaries.
    pub fn out_per_group(&self) -> usize {
        self.out_channels / self.groups.unwrap_or(1)
    }
}

fn vector(t: &TensorInfo, len: usize) -> Result<(), String> {
    if t.shape.len() != 1 || t.shape[0] != len {
        return Err(format!(
            "tensor `{}` has shape {:?}; expected [{len}], one value per output channel",
            t.name, t.shape
        ));
    }
    Ok(())
}
