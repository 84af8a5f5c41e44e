//! The block model: a re-parameterizable block is a weighted sum of branches, optionally
//! followed by per-channel post-ops; a branch is a chain of linear ops — a source (a conv, the
//! identity, an average pool) then per-channel ops (BN, a scale). This module holds the model
//! with the tensor names each op reads, and the shape checks that make fusion well defined.
//! The arithmetic on these ops lives in the `ops` module.

use std::ops::Range;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

mod check;
pub mod values;

use check::{
    Checker, channel_geometry, check_branches, check_channel_ops, main_conv, per_channel_main,
};

use crate::checkpoint::{Checkpoint, TensorInfo};

/// Largest kernel side a block may have: RepLKNet's 31×31, the largest in the
/// re-parameterization literature. Checking a block costs memory in the kernel side to the
/// fourth power (the probe input grows with the kernel), so a larger one is refused rather
/// than run out of memory.
pub const MAX_KERNEL: usize = 31;

/// A block whose shapes or tensors do not fit together.
#[derive(Debug, Clone, thiserror::Error)]
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

/// The part a branch plays in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A k×k conv (+ BN): the block's main branch; MobileOne has several.
    Kxk,
    /// A 1×1 conv (+ BN), padded to k×k at the centre (`"scale"` in layout files: MobileOne's
    /// name for it).
    #[serde(rename = "scale", alias = "pointwise")]
    Pointwise,
    /// The input itself (the skip connection), usually through a BN.
    Identity,
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
    /// The step counter, dropped with the BN.
    pub num_batches_tracked: Option<String>,
    /// The ε this BN normalizes with: not stored in a checkpoint (the layout's framework
    /// default, or `--bn-eps`); an ONNX `BatchNormalization` carries its own.
    pub eps: f64,
}

/// One linear op of a branch, with the tensors it reads.
///
/// A branch is a *source* op ([`Op::Conv`], [`Op::Identity`], [`Op::AvgPool`]) followed by
/// per-output-channel ops ([`Op::Bn`], [`Op::Scale`], [`Op::Scalar`]). Every such chain is, per output
/// channel o, `α[o]·source(x)[o] + β[o]`, which is what makes it fusable row by row.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A conv `[out, in/groups, kh, kw]`, stride 1, same padding, with its own bias if any;
    /// or a Linear `[out, in]` (a 1×1 conv on every position).
    Conv {
        /// The kernel.
        weight: String,
        /// The conv's own bias.
        bias: Option<String>,
        /// Spacing between kernel taps (UniRepLKNet's dilated branches); 1 for a plain conv.
        dilation: usize,
        /// Whether the kernel may be kh×kw with kh ≠ kw (ACNet's k×1 and 1×k); both odd.
        asymmetric: bool,
        /// The stored weight is the kernel minus the identity (DBB's IdentityBasedConv1x1).
        plus_identity: bool,
        /// The weight's axis of output channels: 0 for a conv, 1 for a ConvTranspose
        /// `[in, out/groups, kh, kw]` (folded alone) or a Linear stored `[in, out]` (see
        /// [`Block::out_axis`]).
        out_axis: usize,
    },
    /// A second conv `[out, mid/groups, kh, kw]` on what the ops before it made (`mid`
    /// channels: a first conv, then per-channel ops over its outputs), with that map padded by
    /// what the ops make of zero (DBB's BNAndPad; zero where there are no ops): so it is the
    /// composition of the two on the zero-padded input, exactly, when along each axis one of
    /// the two convs is 1 wide (DBB's 1×1 → k×k, RepNeXt's 1×k → k×1, an outer product).
    ThenConv {
        /// The second kernel.
        weight: String,
    },
    /// A `kernel`×`kernel` average of each channel of what the ops before it made (mid ==
    /// out), padded like [`Op::ThenConv`]; 0 stands for the block's kernel.
    ThenAvgPool {
        /// The window side.
        kernel: usize,
    },
    /// A BatchNorm over the *input* channels, before a Linear or 1×1 conv (a NormLinear:
    /// LeViT's and RepViT's classifiers): folds into the weights, scaled per input channel,
    /// and into the bias, through the weights.
    InputBn(BnTensors),
    /// A k×k conv `[groups, 1, k, k]` over each group's h×w patch (h = w = √(in/groups)),
    /// zero-padded at the patch border, as the Linear it equals over the group's h·w inputs
    /// (RepMLP's `repconv{k}` beside its FC `fc3`): output `g·hw + y·w + x` reads input
    /// `g·hw + yy·w + xx` with weight `K[g, 0, yy − y + k/2, xx − x + k/2]`.
    ConvFc {
        /// The conv kernel.
        weight: String,
    },
    /// A BatchNorm with one channel per group, which every output channel of the group
    /// shares (RepMLP's BNs over its sharesets, applied at every position of the patch).
    GroupBn(BnTensors),
    /// The block's input itself: output channel o reads input channel o (in == out).
    Identity,
    /// Average pooling `kernel`×`kernel`, stride 1, zero padding counted in the mean
    /// (PyTorch's `count_include_pad=True`), channel by channel.
    AvgPool {
        /// The pooling window side.
        kernel: usize,
    },
    /// A BatchNorm over the output channels (eval mode: running statistics).
    Bn(BnTensors),
    /// A per-output-channel multiply (a layer scale γ), one value per channel.
    Scale {
        /// The scale tensor, `[out]` or `[out, 1, 1]`.
        weight: String,
    },
    /// One value multiplying every output channel (super-gradients' `alpha`): [`Op::Scale`]
    /// with a 1-element tensor broadcast.
    Scalar {
        /// The tensor, `[1]` (or `[]`).
        weight: String,
    },
    /// A per-output-channel `w·y + b`: a norm's affine (GroupNorm, LayerNorm) or, the same
    /// thing, a depthwise 1×1 conv with bias (RIFormer's `norm1` and `token_mixer.affine`).
    Affine {
        /// w, `[out]` or `[out, 1, 1, 1]`.
        weight: String,
        /// b, `[out]`.
        bias: String,
    },
    /// A per-output-channel constant added or subtracted: `y + b` (`y − b` when `subtract`),
    /// an ONNX `Add`/`Sub` by a constant; `b` is `[out]` (or with ones around it) or one value
    /// for every channel.
    Shift {
        /// b.
        bias: String,
        /// Whether b is subtracted.
        subtract: bool,
    },
    /// A per-output-channel divide by a constant: `y / d`, an ONNX `Div`; `d` is `[out]` (or
    /// with ones around it) or one value for every channel, never zero. Its values are the
    /// scale `1/d`, computed in f64.
    Divide {
        /// d.
        divisor: String,
    },
    /// A kernel computed from stored tensors: OREPA's `weight_gen()` (JUGGHM/OREPA_CVPR2022),
    /// the per-channel weighted sum of six kernels, each made from stored tensors.
    Orepa(Box<OrepaTensors>),
}

/// The stored tensors OREPA's kernel is computed from (`blocks.py`, class `OREPA`), with
/// `O` outputs, `I` inputs, `G` groups, `T` internal channels, `E` depthwise expansion:
/// `K = Σ_j vector[j, o]·K_j` over `origin`, `avg_conv ⊗ avg_avg`, `pfir_conv ⊗ prior`,
/// `conv2 ∘ (idconv1 + id_tensor)` per group, the 1×1 padded, and `dwsc2full(dw, pw)`.
#[derive(Debug, Clone, Serialize)]
pub struct OrepaTensors {
    /// `weight_orepa_origin` `[O, I/G, k, k]`: the main kernel, which settles the block's shape.
    pub origin: String,
    /// `weight_orepa_avg_conv` `[O, I/G, 1, 1]`.
    pub avg_conv: String,
    /// `weight_orepa_avg_avg` `[k, k]` (a buffer: 1/k² when built).
    pub avg_avg: String,
    /// `weight_orepa_pfir_conv` `[O, I/G, 1, 1]`.
    pub pfir_conv: String,
    /// `weight_orepa_prior` `[O, k, k]` (a buffer, read as stored: upstream leaves it partly
    /// uninitialised for k > 3).
    pub prior: String,
    /// `weight_orepa_1x1` `[O, I/G, 1, 1]`.
    pub one: String,
    /// `weight_orepa_1x1_kxk_idconv1` `[T, I/G, 1, 1]`, the kernel minus `id_tensor`.
    pub idconv1: String,
    /// `id_tensor` `[T, I/G, 1, 1]` (a buffer, read as stored).
    pub id_tensor: String,
    /// `weight_orepa_1x1_kxk_conv2` `[O, T/G, k, k]`.
    pub conv2: String,
    /// `weight_orepa_gconv_dw` `[E·I, 1, k, k]`: channel m filters input m / E.
    pub dw: String,
    /// `weight_orepa_gconv_pw` `[O, E·I/G, 1, 1]`: output `c·(O/G) + o'` reads row `o'·G + c`.
    pub pw: String,
    /// `vector` `[6, O]`: the six kernels' weights per output channel.
    pub vector: String,
}

impl OrepaTensors {
    /// The tensors in the order of [`OrepaTensors::LEAVES`].
    pub fn names(&self) -> [&String; 12] {
        [
            &self.origin,
            &self.avg_conv,
            &self.avg_avg,
            &self.pfir_conv,
            &self.prior,
            &self.one,
            &self.idconv1,
            &self.id_tensor,
            &self.conv2,
            &self.dw,
            &self.pw,
            &self.vector,
        ]
    }

    /// The tensors' names under the OREPA module, as upstream registers them.
    pub const LEAVES: [&'static str; 12] = [
        "weight_orepa_origin",
        "weight_orepa_avg_conv",
        "weight_orepa_avg_avg",
        "weight_orepa_pfir_conv",
        "weight_orepa_prior",
        "weight_orepa_1x1",
        "weight_orepa_1x1_kxk_idconv1",
        "id_tensor",
        "weight_orepa_1x1_kxk_conv2",
        "weight_orepa_gconv_dw",
        "weight_orepa_gconv_pw",
        "vector",
    ];

    /// Tensors from the names in [`OrepaTensors::LEAVES`] order.
    pub fn from_names(n: [String; 12]) -> OrepaTensors {
        let [
            origin,
            avg_conv,
            avg_avg,
            pfir_conv,
            prior,
            one,
            idconv1,
            id_tensor,
            conv2,
            dw,
            pw,
            vector,
        ] = n;
        OrepaTensors {
            origin,
            avg_conv,
            avg_avg,
            pfir_conv,
            prior,
            one,
            idconv1,
            id_tensor,
            conv2,
            dw,
            pw,
            vector,
        }
    }
}

impl Op {
    /// Whether the op goes before the source (acts on the block's input).
    pub fn is_input_op(&self) -> bool {
        matches!(self, Op::InputBn(_))
    }

    /// Whether the op is the second stage of a sequence.
    pub fn is_second(&self) -> bool {
        matches!(self, Op::ThenConv { .. } | Op::ThenAvgPool { .. })
    }

    /// Whether the op starts a branch (reads the block's input).
    pub fn is_source(&self) -> bool {
        matches!(
            self,
            Op::Conv { .. } | Op::ConvFc { .. } | Op::Identity | Op::AvgPool { .. } | Op::Orepa(_)
        )
    }

    /// Every tensor the op reads.
    pub fn tensor_names(&self) -> Vec<String> {
        match self {
            Op::Conv { weight, bias, .. } => std::iter::once(weight.clone())
                .chain(bias.clone())
                .collect(),
            Op::Identity | Op::AvgPool { .. } | Op::ThenAvgPool { .. } => Vec::new(),
            Op::ThenConv { weight } | Op::ConvFc { weight } => vec![weight.clone()],
            Op::Bn(bn) | Op::InputBn(bn) | Op::GroupBn(bn) => {
                [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var]
                    .into_iter()
                    .cloned()
                    .chain(bn.num_batches_tracked.clone())
                    .collect()
            }
            Op::Scale { weight } | Op::Scalar { weight } => vec![weight.clone()],
            Op::Affine { weight, bias } => vec![weight.clone(), bias.clone()],
            Op::Shift { bias, .. } => vec![bias.clone()],
            Op::Divide { divisor } => vec![divisor.clone()],
            Op::Orepa(t) => t.names().into_iter().cloned().collect(),
        }
    }

    /// A short name for reports: `conv3x3`, `bn`, `identity`, …
    pub fn describe(&self, ckpt: &Checkpoint) -> String {
        match self {
            Op::Conv {
                weight,
                dilation,
                out_axis,
                ..
            } => {
                if ckpt.get(weight).is_some_and(|t| t.shape.len() == 2) {
                    return "linear".into();
                }
                let (kh, kw) = ckpt.get(weight).map_or((0, 0), kernel_hw);
                let conv = if *out_axis == 1 {
                    "conv_transpose"
                } else {
                    "conv"
                };
                if *dilation > 1 {
                    format!("{conv}{kh}x{kw}d{dilation}")
                } else {
                    format!("{conv}{kh}x{kw}")
                }
            }
            Op::Identity => "identity".into(),
            Op::AvgPool { kernel } => format!("avgpool{kernel}x{kernel}"),
            Op::ThenConv { weight } => {
                let (kh, kw) = ckpt.get(weight).map_or((0, 0), kernel_hw);
                format!("conv{kh}x{kw}")
            }
            Op::ThenAvgPool { kernel } => format!("avgpool{kernel}x{kernel}"),
            Op::ConvFc { weight } => {
                let (kh, kw) = ckpt.get(weight).map_or((0, 0), kernel_hw);
                format!("conv{kh}x{kw}_as_fc")
            }
            Op::GroupBn(_) => "bn_per_group".into(),
            Op::Bn(_) => "bn".into(),
            Op::InputBn(_) => "bn_in".into(),
            Op::Scale { .. } => "scale".into(),
            Op::Scalar { .. } => "scalar".into(),
            Op::Affine { .. } => "affine".into(),
            Op::Shift {
                subtract: false, ..
            } => "add".into(),
            Op::Shift { subtract: true, .. } => "sub".into(),
            Op::Divide { .. } => "div".into(),
            Op::Orepa(t) => {
                let (kh, kw) = ckpt.get(&t.origin).map_or((0, 0), kernel_hw);
                format!("orepa{kh}x{kw}")
            }
        }
    }
}

/// One branch of a block: `coef · chain(x)`.
#[derive(Debug, Clone, Serialize)]
pub struct Branch {
    /// The branch's path under the block, e.g. `rbr_dense` or `conv_kxk.1`.
    pub label: String,
    /// The part it plays.
    pub role: Role,
    /// Its weight in the block's sum (−1 for a subtracted branch).
    pub coef: f64,
    /// The chain: a source op, then per-channel ops.
    pub ops: Vec<Op>,
}

impl Branch {
    /// The branch's source op (after any input ops).
    pub fn source(&self) -> &Op {
        self.ops
            .iter()
            .find(|op| op.is_source())
            .unwrap_or(&self.ops[0])
    }

    /// The BN on the branch's input, if any.
    pub fn input_bn(&self) -> Option<&BnTensors> {
        self.ops.iter().find_map(|op| match op {
            Op::InputBn(bn) => Some(bn),
            _ => None,
        })
    }

    /// The weight whose rows are the branch's output channels: its second conv's in a
    /// sequence, else its source conv's.
    pub fn conv_weight(&self) -> Option<&str> {
        if let Some(second) = self.second() {
            return match second {
                Op::ThenConv { weight } => Some(weight),
                _ => None,
            };
        }
        match self.source() {
            Op::Conv { weight, .. } => Some(weight),
            _ => None,
        }
    }

    /// The second stage of a sequence branch (DBB's 1×1 → k×k), if any.
    pub fn second(&self) -> Option<&Op> {
        self.ops.iter().find(|op| op.is_second())
    }

    /// Where the per-output-channel ops start: after the second stage in a sequence.
    pub fn split(&self) -> usize {
        self.ops.iter().position(Op::is_second).map_or(0, |i| i + 1)
    }

    /// Every tensor of the branch.
    pub fn tensor_names(&self) -> Vec<String> {
        self.ops.iter().flat_map(Op::tensor_names).collect()
    }
}

/// A checked block: every conv agrees on output channels and input channels per group, every
/// kernel is odd in each direction (square unless its layout allows kh×kw) and is centred in
/// the block's kh×kw, every per-channel tensor has one value per output channel.
#[derive(Debug, Clone)]
pub struct Block {
    /// The block prefix exactly as in the checkpoint, e.g. `stages.2.13`.
    pub name: String,
    /// Branches, main (k×k) first.
    pub branches: Vec<Branch>,
    /// Per-channel ops applied to the sum of the branches (RepViT's BN after the sum).
    pub post: Vec<Op>,
    /// Output channels.
    pub out_channels: usize,
    /// Input channels per group (the kernel's second dimension).
    pub in_per_group: usize,
    /// The fused kernel `(kh, kw)`: the largest extent of any branch in each direction
    /// ([`fused_kernel`]); every branch's kernel is centred in it.
    pub kernel: (usize, usize),
    /// Whether the main weight is a Linear's `[out, in]` (the deploy weight is too).
    pub linear: bool,
    /// Groups, when the weights settle it (an identity branch means in == out).
    pub groups: Option<usize>,
    /// dtype of the main conv weight, which the fused conv keeps by default.
    pub dtype: Dtype,
    /// The axis of the main (and the deploy) weight that holds the output channels: 0 for a
    /// conv `[out, in/groups, kh, kw]`; 1 for a ConvTranspose `[in, out/groups, kh, kw]`
    /// (ultralytics' `ConvTranspose` + BN fold), which is folded alone, or for a Linear
    /// stored `[in, out]` (ONNX's `MatMul`, `Gemm` with `transB` 0; beside other such
    /// Linears, one group: the whole weight is one chunk). Everything between
    /// reading and writing sees its rows in conv order ([`Block::rows_from_stored`]).
    pub out_axis: usize,
    /// Name of the fused weight in the deploy file.
    pub deploy_weight: String,
    /// Name of the fused bias in the deploy file.
    pub deploy_bias: String,
    /// Every tensor the block consumes, which the deploy file drops.
    pub consumed: Vec<String>,
    /// The op chain of each branch, e.g. `conv3x3+bn`, `-(identity+bn+scale)`, then
    /// `post:bn` for post-ops: what the report and `inspect` show (display text, not the
    /// ops themselves, which are in `branches` and `post`).
    pub described: Vec<String>,
    /// The framework's name for this kind of block (`RepMixer`), when the layout gives one.
    pub kind: String,
    /// The deploy form keeps the branch tensors beside the fused conv (RT-DETR): `consumed`
    /// is read but passed through (see [`Block::dropped`]).
    pub keeps_branches: bool,
    /// What the block's form rests on that no tensor shows, and what decided it (QARepVGG's
    /// identity: `identity: yes (rule in == out: 8 == 8)`, `identity: no (--identity)`).
    pub assumed: Vec<String>,
}

/// The extent `(height, width)` of a `kh`×`kw` kernel with taps `dilation` apart.
pub fn dilated((kh, kw): (usize, usize), dilation: usize) -> (usize, usize) {
    let d = dilation.max(1);
    ((kh.max(1) - 1) * d + 1, (kw.max(1) - 1) * d + 1)
}

/// The fused kernel of branches with these extents: the largest in each direction. Every
/// branch kernel is then centred in it, which is exact only when each extent is odd in each
/// direction (or the block has one branch, which is never placed beside another): `None`
/// otherwise.
///
/// ```
/// use repvgg_fuse::block::fused_kernel;
///
/// // docTR's (3, 5) layer: a 3×5 conv, its 3×1 and 1×5 siblings, the identity's 1×1.
/// assert_eq!(fused_kernel(&[(3, 5), (3, 1), (1, 5), (1, 1)], false), Some((3, 5)));
/// assert_eq!(fused_kernel(&[(1, 3), (1, 1)], false), Some((1, 3)));
/// assert_eq!(fused_kernel(&[(3, 3), (2, 1)], false), None);
/// assert_eq!(fused_kernel(&[(2, 2)], true), Some((2, 2)));
/// ```
pub fn fused_kernel(extents: &[(usize, usize)], single: bool) -> Option<(usize, usize)> {
    let odd = |e: &(usize, usize)| e.0 % 2 == 1 && e.1 % 2 == 1;
    if !single && !extents.iter().all(odd) {
        return None;
    }
    extents
        .iter()
        .copied()
        .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)))
}

impl Block {
    /// Checks the branches' tensors in `ckpt` against each other.
    pub fn new(
        ckpt: &Checkpoint,
        name: &str,
        branches: Vec<Branch>,
        post: Vec<Op>,
        deploy: [String; 2],
    ) -> Result<Block, BlockError> {
        let c = Checker {
            ckpt,
            name,
            single: branches.len() == 1,
        };
        let channel_main = per_channel_main(&c, &branches)?;
        let (main, kernel) = match channel_main {
            Some(t) => (t, (1, 1)),
            None => main_conv(&c, &branches)?,
        };
        let mut branches = branches;
        // An average over "the block's kernel" (0 in the layout: DBB's avg branch, whose
        // block is square).
        for op in branches.iter_mut().flat_map(|b| b.ops.iter_mut()) {
            if let Op::AvgPool { kernel: k } | Op::ThenAvgPool { kernel: k } = op
                && *k == 0
            {
                *k = kernel.0.min(kernel.1);
            }
        }
        let (out_axis, (out_channels, in_per_group), by_axis) = match channel_main {
            Some(t) => (0, (t.numel(), 1), None),
            None => channel_geometry(&c, &branches, &post, main)?,
        };
        let groups = check_branches(&c, &branches, main, (out_channels, in_per_group))?;
        let groups = groups.or(by_axis);
        check_channel_ops(&c, &post, out_channels)?;
        let consumed = branches
            .iter()
            .flat_map(Branch::tensor_names)
            .chain(post.iter().flat_map(Op::tensor_names))
            .collect();
        let [deploy_weight, deploy_bias] = deploy;
        let chain = |ops: &[Op]| {
            let names: Vec<String> = ops.iter().map(|op| op.describe(ckpt)).collect();
            names.join("+")
        };
        let mut described: Vec<String> = branches
            .iter()
            .map(|b| match b.coef {
                1.0 => chain(&b.ops),
                -1.0 => format!("-({})", chain(&b.ops)),
                c => format!("{c}*({})", chain(&b.ops)),
            })
            .collect();
        if !post.is_empty() {
            described.push(format!("post:{}", chain(&post)));
        }
        Ok(Block {
            described,
            kind: String::new(),
            keeps_branches: false,
            assumed: Vec::new(),
            name: name.to_string(),
            dtype: main.dtype,
            out_axis,
            branches,
            post,
            out_channels,
            in_per_group,
            kernel,
            linear: main.shape.len() == 2,
            groups,
            deploy_weight,
            deploy_bias,
            consumed,
        })
    }

    /// Whether every branch reads the input as it is (identities, no kernel): the block is a
    /// per-channel affine, a depthwise 1×1 conv whose deploy weight is one value per channel
    /// (RIFormer's `norm_reparam`, a GroupNorm's affine).
    pub fn per_channel(&self) -> bool {
        self.branches
            .iter()
            .all(|b| matches!(b.source(), Op::Identity))
    }

    /// The deploy weight's shape: `[out, in/groups, kh, kw]`, a Linear's `[out, in]` (or
    /// `[in, out]`, out axis 1: ONNX's `MatMul`), a
    /// ConvTranspose's `[in, out/groups, kh, kw]`, or a per-channel block's `[out]`.
    pub fn deploy_shape(&self) -> Vec<usize> {
        let (kh, kw) = self.kernel;
        if self.per_channel() {
            vec![self.out_channels]
        } else if self.linear && self.out_axis == 1 {
            vec![self.in_per_group, self.out_channels]
        } else if self.linear {
            vec![self.out_channels, self.in_per_group]
        } else if self.out_axis == 1 {
            let groups = self.groups.unwrap_or(1);
            vec![groups * self.in_per_group, self.out_per_group(), kh, kw]
        } else {
            vec![self.out_channels, self.in_per_group, kh, kw]
        }
    }

    /// Rows `rows` of a weight stored with output axis [`Block::out_axis`], as read from the
    /// file (`unit` items per weight: 1 for values, the width for bytes), in conv order
    /// `[rows, in/groups, kh, kw]`. A ConvTranspose's rows are its weight's dim 1: a chunk of
    /// whole groups is contiguous in both orders, and any other chunk is refused.
    pub fn rows_from_stored<T: Copy>(
        &self,
        stored: Vec<T>,
        rows: &Range<usize>,
        unit: usize,
    ) -> Result<Vec<T>, BlockError> {
        let axes = (self.in_per_group, self.out_per_group());
        self.reorder(stored, rows, axes, unit)
    }

    /// Rows `rows` in conv order back in the stored order (the inverse of
    /// [`Block::rows_from_stored`]).
    pub fn rows_to_stored<T: Copy>(
        &self,
        rows_data: Vec<T>,
        rows: &Range<usize>,
        unit: usize,
    ) -> Result<Vec<T>, BlockError> {
        let axes = (self.out_per_group(), self.in_per_group);
        self.reorder(rows_data, rows, axes, unit)
    }

    /// Each group of `data` `[outer, inner, taps]` as `[inner, outer, taps]`.
    fn reorder<T: Copy>(
        &self,
        data: Vec<T>,
        rows: &Range<usize>,
        (outer, inner): (usize, usize),
        unit: usize,
    ) -> Result<Vec<T>, BlockError> {
        if self.out_axis == 0 {
            return Ok(data);
        }
        let run = self.kernel.0 * self.kernel.1 * unit;
        let group = outer * inner * run;
        let opg = self.out_per_group().max(1);
        let whole = rows.start.is_multiple_of(opg) && rows.end.is_multiple_of(opg);
        if !whole || group == 0 || data.len() != rows.len() / opg * group {
            return Err(BlockError::new(
                &self.name,
                format!(
                    "rows {rows:?} of its ConvTranspose weight are not whole groups of {opg} output channels ({} items); a bug in repvgg-fuse, nothing was written",
                    data.len()
                ),
            ));
        }
        Ok(swap_group_axes(&data, (outer, inner), run))
    }

    /// The fused kernel's larger side: what an input must at least span for every tap to
    /// meet it.
    pub fn side(&self) -> usize {
        self.kernel.0.max(self.kernel.1)
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

    /// Weights per output channel of the fused kernel: `in/groups · kh · kw`.
    pub fn row_len(&self) -> usize {
        self.in_per_group * self.kernel.0 * self.kernel.1
    }

    /// Ranges of output channels of about `elements` fused weights each: the unit of work
    /// when fusing or checking a block, so that a block is never in memory whole.
    pub fn row_chunks(&self, elements: usize) -> Vec<std::ops::Range<usize>> {
        let step = self.whole_groups((elements / self.row_len().max(1)).max(1));
        (0..self.out_channels)
            .step_by(step)
            .map(|s| s..(s + step).min(self.out_channels))
            .collect()
    }

    /// Like [`Block::row_chunks`], but every chunk the same size to within one row (768 rows
    /// of at most 151 are 6 × 128, not 5 × 151 + 13): a GEMM runs best on even shapes.
    pub fn even_row_chunks(&self, elements: usize) -> Vec<std::ops::Range<usize>> {
        let most = (elements / self.row_len().max(1)).max(1);
        let n = self.out_channels.div_ceil(most).max(1);
        let step = self.whole_groups(self.out_channels.div_ceil(n).max(1));
        (0..self.out_channels)
            .step_by(step)
            .map(|s| s..(s + step).min(self.out_channels))
            .collect()
    }

    /// `step` rows, rounded up to whole groups where the stored rows are not contiguous (a
    /// ConvTranspose: [`Block::rows_from_stored`]).
    fn whole_groups(&self, step: usize) -> usize {
        match self.out_axis {
            0 => step,
            _ => step.next_multiple_of(self.out_per_group().max(1)),
        }
    }

    /// The tensors the deploy file drops: every one the block consumes, or none where the
    /// framework keeps the branches.
    pub fn dropped(&self) -> &[String] {
        if self.keeps_branches {
            &[]
        } else {
            &self.consumed
        }
    }

    /// The tensor whose position in the file orders the block: its main conv weight.
    pub fn main_weight(&self) -> &str {
        self.branches
            .iter()
            .find_map(Branch::conv_weight)
            // A kernel computed from tensors (OREPA), or none (a per-channel block): its first.
            .or_else(|| self.consumed.first().map(String::as_str))
            .unwrap_or_default()
    }
}

/// `data`, groups of `[outer, inner, run]` items, with each group's first two axes swapped:
/// `[inner, outer, run]` (a whole trailing group only; a ragged tail is dropped).
fn swap_group_axes<T: Copy>(data: &[T], (outer, inner): (usize, usize), run: usize) -> Vec<T> {
    let group = (outer * inner * run).max(1);
    let mut out = Vec::with_capacity(data.len());
    for g in data.chunks_exact(group) {
        for j in 0..inner {
            for i in 0..outer {
                out.extend_from_slice(&g[(i * inner + j) * run..(i * inner + j + 1) * run]);
            }
        }
    }
    out
}

/// A conv or Linear weight's kernel `(kh, kw)`: `(1, 1)` for a Linear.
pub fn kernel_hw(t: &TensorInfo) -> (usize, usize) {
    match t.shape[..] {
        [_, _, kh, kw] => (kh, kw),
        _ => (1, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ConvTranspose weight `[in 4, out/groups 3, 1, 2]` in 2 groups: output channel
    /// o = g·3 + j reads inputs g·2 + i as `w[g·2 + i, j]`, so its conv-order row is
    /// `w[g·2 + 0, j], w[g·2 + 1, j]` (2 taps each); and back.
    #[test]
    fn conv_transpose_rows_are_dim_1_within_each_group() {
        // Each item names itself: 100·input + 10·j + tap.
        let stored: Vec<u32> = (0..4)
            .flat_map(|i| (0..3).flat_map(move |j| (0..2).map(move |t| 100 * i + 10 * j + t)))
            .collect();
        let rows = swap_group_axes(&stored, (2, 3), 2);
        let row = |o: usize| rows[o * 4..(o + 1) * 4].to_vec();
        assert_eq!(row(0), [0, 1, 100, 101]);
        assert_eq!(row(2), [20, 21, 120, 121]);
        assert_eq!(row(3), [200, 201, 300, 301]);
        assert_eq!(row(5), [220, 221, 320, 321]);
        assert_eq!(swap_group_axes(&rows, (3, 2), 2), stored);
    }
}
