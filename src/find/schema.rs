//! The layout schema: how each framework names the branches of a re-parameterizable block,
//! as data (`layouts.json`, or a user's file of the same shape), and its validation.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::block::{BlockError, Role};

pub(super) const BUILTIN: &str = include_str!("layouts.json");

/// PyTorch's `BatchNorm2d` default ε, used where a layout does not settle it.
pub const DEFAULT_BN_EPS: f64 = 1e-5;

/// One op of a branch in a layout file. Names are relative to the branch's path; a name
/// starting with `/` is relative to the block (a tensor the block's branches share, like a
/// layer scale). In the file, an object with exactly one of `conv`, `bn`, `bn_in`, `scale`,
/// `scalar`, `identity`, `avgpool`, `then_conv`, `then_avgpool`, `affine`, `orepa` (see
/// [`OpKind`]), plus `optional`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawOpSpec", into = "RawOpSpec")]
pub struct OpSpec {
    /// What the op is.
    pub kind: OpKind,
    /// The op may be absent (FastViT's `layer_scale.gamma` when layer scale is off): a block
    /// without its tensors runs without the op. Without it, a missing tensor is an error.
    pub optional: bool,
}

/// The kinds of op a layout can name, each with what it needs.
#[derive(Debug, Clone, PartialEq)]
pub enum OpKind {
    /// A conv submodule: `{name}.weight` and optional `{name}.bias`.
    Conv {
        /// The submodule.
        name: String,
        /// Tap spacing (1 for a plain conv).
        dilation: usize,
        /// The kernel may be kh×kw with kh ≠ kw (ACNet's k×1 and 1×k).
        asymmetric: bool,
        /// The stored weight is its kernel minus the identity (DBB's `idconv1`).
        plus_identity: bool,
        /// The weight's axis of output channels: 0 for a conv `[out, in/groups, kh, kw]`, 1
        /// for a ConvTranspose `[in, out/groups, kh, kw]`.
        out_axis: usize,
    },
    /// A BN submodule (`""`: the branch path itself).
    Bn(String),
    /// A BN over the branch's input, before its conv (a NormLinear); goes before the source.
    BnIn(String),
    /// A per-channel scale tensor (its full name under the path, e.g. `layer_scale.gamma`).
    Scale(String),
    /// One scalar (a 1-element tensor) multiplying the branch (super-gradients' `alpha` on
    /// the 1×1 branch of its RepVGG and QARepVGG blocks).
    Scalar(String),
    /// The block's input itself.
    Identity,
    /// Average pooling with this window.
    AvgPool(usize),
    /// A second conv on what the ops before it made (DBB's 1×1 → k×k, its BNAndPad padding
    /// with what the BN makes of zero).
    ThenConv(String),
    /// A k×k average of what the ops before it made, padded likewise; 0: the block's kernel.
    ThenAvgPool(usize),
    /// A conv submodule `[groups, 1, k, k]` over each group's h×w patch, run as the FC it
    /// equals (RepMLP's `repconv{k}.conv`): `{name}.weight`.
    ConvFc(String),
    /// A BN submodule with one channel per group, shared by the group's outputs (RepMLP's
    /// `fc3_bn` and `repconv{k}.bn` over its sharesets).
    GroupBn(String),
    /// A per-channel affine submodule: `{name}.weight` (`[C]` or `[C, 1, 1, 1]`) and
    /// `{name}.bias`, `w·y + b` (a norm's affine, a depthwise 1×1 conv with bias).
    Affine(String),
    /// A source whose kernel OREPA computes from the module's stored tensors
    /// (`{name}.weight_orepa_*`, `.id_tensor`, `.vector`).
    Orepa(String),
}

impl OpSpec {
    /// A required op of `kind`.
    pub fn of(kind: OpKind) -> OpSpec {
        OpSpec {
            kind,
            optional: false,
        }
    }

    /// Whether the op goes before the source.
    fn is_input(&self) -> bool {
        matches!(self.kind, OpKind::BnIn(_))
    }

    /// Whether the op starts a branch.
    fn is_source(&self) -> bool {
        matches!(
            self.kind,
            OpKind::Conv { .. }
                | OpKind::ConvFc(_)
                | OpKind::Identity
                | OpKind::AvgPool(_)
                | OpKind::Orepa(_)
        )
    }

    /// Whether the op is the second stage of a sequence.
    fn is_second(&self) -> bool {
        matches!(self.kind, OpKind::ThenConv(_) | OpKind::ThenAvgPool(_))
    }

    /// The tensor name (or module) the op names, if it names one.
    pub fn name(&self) -> Option<&str> {
        match &self.kind {
            OpKind::Conv { name, .. }
            | OpKind::Bn(name)
            | OpKind::BnIn(name)
            | OpKind::Scale(name)
            | OpKind::Scalar(name)
            | OpKind::ThenConv(name)
            | OpKind::ConvFc(name)
            | OpKind::GroupBn(name)
            | OpKind::Affine(name)
            | OpKind::Orepa(name) => Some(name),
            OpKind::Identity | OpKind::AvgPool(_) | OpKind::ThenAvgPool(_) => None,
        }
    }
}

impl TryFrom<RawOpSpec> for OpSpec {
    type Error = String;

    fn try_from(r: RawOpSpec) -> Result<OpSpec, String> {
        let conv_only =
            r.dilation.is_some() || r.asymmetric || r.plus_identity || r.out_axis.is_some();
        let mut kinds = Vec::new();
        if let Some(name) = r.conv {
            let out_axis = r.out_axis.unwrap_or(0);
            if out_axis > 1 {
                return Err(format!(
                    "\"out_axis\" is 0 (a conv) or 1 (a ConvTranspose), not {out_axis}"
                ));
            }
            kinds.push(OpKind::Conv {
                name,
                dilation: r.dilation.unwrap_or(1),
                asymmetric: r.asymmetric,
                plus_identity: r.plus_identity,
                out_axis,
            });
        } else if conv_only {
            return Err(
                "\"dilation\", \"asymmetric\", \"plus_identity\" and \"out_axis\" go with \"conv\" only".into(),
            );
        }
        kinds.extend(r.bn.map(OpKind::Bn));
        kinds.extend(r.bn_in.map(OpKind::BnIn));
        kinds.extend(r.scale.map(OpKind::Scale));
        kinds.extend(r.scalar.map(OpKind::Scalar));
        kinds.extend(r.identity.then_some(OpKind::Identity));
        kinds.extend(r.avgpool.map(OpKind::AvgPool));
        kinds.extend(r.then_conv.map(OpKind::ThenConv));
        kinds.extend(r.then_avgpool.map(OpKind::ThenAvgPool));
        kinds.extend(r.conv_as_fc.map(OpKind::ConvFc));
        kinds.extend(r.bn_per_group.map(OpKind::GroupBn));
        kinds.extend(r.affine.map(OpKind::Affine));
        kinds.extend(r.orepa.map(OpKind::Orepa));
        match <[OpKind; 1]>::try_from(kinds) {
            Ok([kind]) => Ok(OpSpec {
                kind,
                optional: r.optional,
            }),
            Err(_) => Err(
                "each op has exactly one of conv, bn, bn_in, scale, scalar, identity, avgpool, then_conv, then_avgpool, conv_as_fc, bn_per_group, affine, orepa"
                    .into(),
            ),
        }
    }
}

impl From<OpSpec> for RawOpSpec {
    fn from(op: OpSpec) -> RawOpSpec {
        let mut r = RawOpSpec {
            optional: op.optional,
            ..RawOpSpec::default()
        };
        match op.kind {
            OpKind::Conv {
                name,
                dilation,
                asymmetric,
                plus_identity,
                out_axis,
            } => {
                r.conv = Some(name);
                r.dilation = (dilation != 1).then_some(dilation);
                r.asymmetric = asymmetric;
                r.plus_identity = plus_identity;
                r.out_axis = (out_axis != 0).then_some(out_axis);
            }
            OpKind::Bn(name) => r.bn = Some(name),
            OpKind::BnIn(name) => r.bn_in = Some(name),
            OpKind::Scale(name) => r.scale = Some(name),
            OpKind::Scalar(name) => r.scalar = Some(name),
            OpKind::Identity => r.identity = true,
            OpKind::AvgPool(k) => r.avgpool = Some(k),
            OpKind::ThenConv(name) => r.then_conv = Some(name),
            OpKind::ThenAvgPool(k) => r.then_avgpool = Some(k),
            OpKind::ConvFc(name) => r.conv_as_fc = Some(name),
            OpKind::GroupBn(name) => r.bn_per_group = Some(name),
            OpKind::Affine(name) => r.affine = Some(name),
            OpKind::Orepa(name) => r.orepa = Some(name),
        }
        r
    }
}

/// An op as a layout file spells it: one key per kind of op, of which exactly one may be
/// given. Read once into an [`OpSpec`], so that nothing after parsing counts keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpSpec {
    /// A conv submodule: `{name}.weight` and optional `{name}.bias`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conv: Option<String>,
    /// Tap spacing of that conv (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dilation: Option<usize>,
    /// A BN submodule (`""`: the branch path itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bn: Option<String>,
    /// A per-channel scale tensor (its full name under the path, e.g. `layer_scale.gamma`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scale: Option<String>,
    /// A 1-element tensor multiplying the branch (super-gradients' `alpha`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scalar: Option<String>,
    /// The block's input itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    identity: bool,
    /// Average pooling with this window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    avgpool: Option<usize>,
    /// A BN over the branch's input, before its conv (a NormLinear); goes before the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bn_in: Option<String>,
    /// The conv's kernel may be kh×kw with kh ≠ kw (ACNet's k×1 and 1×k).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    asymmetric: bool,
    /// The conv's stored weight is its kernel minus the identity (DBB's `idconv1`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    plus_identity: bool,
    /// The conv weight's axis of output channels (default 0; 1: a ConvTranspose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    out_axis: Option<usize>,
    /// A second conv on what the ops before it made (DBB's 1×1 → k×k, its BNAndPad padding
    /// with what the BN makes of zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    then_conv: Option<String>,
    /// A k×k average of what the ops before it made, padded likewise; 0: the block's kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    then_avgpool: Option<usize>,
    /// A conv submodule over each group's patch, run as the FC it equals (RepMLP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conv_as_fc: Option<String>,
    /// A BN submodule with one channel per group (RepMLP's BNs over its sharesets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bn_per_group: Option<String>,
    /// A per-channel affine submodule (`.weight`, `.bias`): a norm's affine, a depthwise 1×1
    /// conv with bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    affine: Option<String>,
    /// OREPA's computed kernel, from the stored tensors under this module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    orepa: Option<String>,
    /// The op may be absent (FastViT's `layer_scale.gamma` when layer scale is off): a block
    /// without its tensors runs without the op. Without it, a missing tensor is an error.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    optional: bool,
}

/// One branch's names, relative to the block prefix.
///
/// The short form names a conv and a BN (`conv`, `bn`), or for the identity branch just a BN
/// (`path` itself, or `bn` under it); the long form lists the branch's `ops` in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchSpec {
    /// What the branch is.
    pub role: Role,
    /// Path of the branch module under the block; `{n}` stands for a branch index (0, 1, …).
    pub path: String,
    /// Name of the conv submodule under `path` (short form; absent for the identity branch).
    #[serde(default)]
    pub conv: Option<String>,
    /// Name of the BN submodule under `path`; absent means the BN is `path` itself (short
    /// form).
    #[serde(default)]
    pub bn: Option<String>,
    /// The branch's ops in order (long form, instead of `conv`/`bn`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<OpSpec>,
    /// The branch's weight in the block's sum (default 1; −1 subtracts it).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub coef: f64,
    /// Whether a block must have this branch to count as a block of this layout.
    #[serde(default)]
    pub required: bool,
    /// For a branch without tensors (QARepVGG's identity and average): the rule that says
    /// where a block has it, since no tensor does; absent, every block of the kind has it.
    /// `--identity PREFIX=on|off` overrides the rule for one block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_if: Option<Rule>,
}

/// Where a branch without tensors exists, decided from the shapes of the block's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Exactly where the block's input and output channels are equal, the input read as the
    /// main kernel's second dimension (groups are not stored: a grouped block counts as
    /// in ≠ out). How YOLOv6 and YOLO-NAS build their nets, except for an in == out block at
    /// stride 2 or with its residual turned off, which `--identity` corrects.
    InEqOut,
}

impl Kind {
    /// Checks that the kind can describe a block at all.
    pub(super) fn check(&self, layout: &str) -> Result<(), String> {
        if !self.branches.iter().any(|b| b.role == Role::Kxk) {
            return Err(format!("layout `{layout}` has no \"kxk\" branch"));
        }
        for b in &self.branches {
            let err = |what: &str| Err(format!("layout `{layout}`, branch `{}`: {what}", b.path));
            if b.ops.is_empty() {
                let has_conv = b.conv.is_some();
                if (b.role == Role::Identity) == has_conv {
                    return err(if has_conv {
                        "an identity branch has no conv"
                    } else {
                        "a conv branch needs \"conv\""
                    });
                }
                continue;
            }
            if b.conv.is_some() || b.bn.is_some() {
                return err("give either \"ops\" or \"conv\"/\"bn\", not both");
            }
            let first = b.ops.iter().take_while(|op| op.is_input()).count();
            for (i, op) in b.ops.iter().enumerate().skip(first) {
                match (i == first, op.is_source()) {
                    (true, true) | (false, false) => {}
                    (true, false) => {
                        return err(
                            "the first op must be conv, conv_as_fc, identity, avgpool or orepa",
                        );
                    }
                    (false, true) => {
                        return err(
                            "only the first op may be conv, conv_as_fc, identity, avgpool or orepa",
                        );
                    }
                }
            }
        }
        if let Some(b) = self
            .branches
            .iter()
            .find(|b| b.ops.iter().filter(|op| op.is_second()).count() > 1)
        {
            return Err(format!(
                "layout `{layout}`, branch `{}`: one then_conv or then_avgpool at most",
                b.path
            ));
        }
        if self
            .post
            .iter()
            .any(|op| op.is_input() || op.is_source() || op.is_second())
        {
            return Err(format!(
                "layout `{layout}`: \"post\" takes bn and scale ops only"
            ));
        }
        Ok(())
    }

    /// Whether a block at `prefix` can be of this kind.
    pub(super) fn applies_at(&self, prefix: &str) -> bool {
        let ends = |a: &String| prefix == a || prefix.ends_with(&format!(".{a}"));
        (self.at.is_empty() || self.at.iter().any(ends)) && !self.not_at.iter().any(ends)
    }
}

fn one() -> f64 {
    1.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

impl BranchSpec {
    /// The branch's label in a block: its path, or for a branch right under the block its
    /// first op's name (`input` for a plain skip).
    pub(super) fn label(&self) -> String {
        if !self.path.is_empty() {
            return self.path.clone();
        }
        let first = self.op_specs().into_iter().next();
        match first.as_ref().map(|op| &op.kind) {
            Some(OpKind::Conv { name, .. } | OpKind::Bn(name) | OpKind::Scale(name)) => {
                name.clone()
            }
            Some(OpKind::Orepa(_)) => "orepa".to_string(),
            _ => "input".to_string(),
        }
    }

    /// The branch's ops, the short form expanded.
    pub fn op_specs(&self) -> Vec<OpSpec> {
        if !self.ops.is_empty() {
            return self.ops.clone();
        }
        let mut ops = Vec::new();
        match &self.conv {
            Some(conv) => {
                ops.push(OpSpec::of(OpKind::Conv {
                    name: conv.clone(),
                    dilation: 1,
                    asymmetric: false,
                    plus_identity: false,
                    out_axis: 0,
                }));
                // A conv branch without a BN module name has no BN.
                ops.extend(self.bn.clone().map(|bn| OpSpec::of(OpKind::Bn(bn))));
            }
            None => {
                ops.push(OpSpec::of(OpKind::Identity));
                ops.push(OpSpec::of(OpKind::Bn(self.bn.clone().unwrap_or_default())));
            }
        }
        ops
    }
}

/// Names of the deploy conv's tensors, relative to the block prefix.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployNames {
    /// The fused kernel.
    pub weight: String,
    /// The fused bias.
    pub bias: String,
}

/// A framework's naming of re-parameterizable blocks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    /// Short id, as given to `--layout`.
    pub name: String,
    /// Which frameworks and models use it.
    #[serde(default)]
    pub description: String,
    /// BN ε this layout's framework trains with, when it is not PyTorch's default.
    #[serde(default)]
    pub bn_eps: Option<f64>,
    /// Why `bn_eps` is what it is.
    #[serde(default)]
    pub bn_eps_reason: Option<String>,
    /// The names also occur outside re-parameterizable blocks (ultralytics' `conv1`/`conv2`):
    /// a candidate whose shapes do not fit is left alone instead of refused.
    #[serde(default)]
    pub generic_names: bool,
    /// Only used when no other layout finds blocks: its names (a conv `conv` beside a BN
    /// `bn`) are common enough to occur in files of other layouts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallback: bool,
    /// Detected only in a file with a tensor whose name ends with this (LeViT's, TinyViT's
    /// and EfficientViT's `attention_biases`): their ConvNorm names alone would take any
    /// conv beside a BN, an unknown RepVGG fork's branches included. `--layout` forces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
    /// Layouts with the same tensor names whose fusions differ (YOLOv6's QARepVGGBlock and
    /// QARepVGGBlockV2): where both find blocks, detection refuses to choose and `--layout`
    /// decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub same_names_as: Vec<String>,
    /// The layout's blocks are single Conv→BN folds, used only with `--fold-bn`
    /// (`FindRules::fold_bn`), beside the blocks of the layout detected.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fold: bool,
    /// The fold layout (`fold: true`) whose pairs this framework's own fuse folds, for
    /// `--fold-bn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold_with: Option<String>,
    /// The branches a block can have (the layout's first kind of block; may be empty when
    /// `kinds` lists them all).
    #[serde(default)]
    pub branches: Vec<BranchSpec>,
    /// Per-channel ops on the sum of the branches (names relative to the block).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post: Vec<OpSpec>,
    /// Where the fused conv goes (with `branches`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeployNames>,
    /// Further kinds of block in the same models (FastViT: MobileOneBlock, RepMixer,
    /// ReparamLargeKernelConv, RepConditionalPosEnc). A block of one kind whose tensors all
    /// belong to a block of another (the mixer inside a RepMixer) is part of that block.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<Kind>,
}

/// One kind of block of a layout: its branches, post-ops and deploy names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kind {
    /// The framework's class name, for reports.
    #[serde(default)]
    pub name: String,
    /// Block prefixes must end with one of these names (LeViT's `head`, whose BN comes before
    /// its Linear, where every other `linear` + `bn` has it after); empty: any prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub at: Vec<String>,
    /// Block prefixes must not end with any of these names (where another kind has them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_at: Vec<String>,
    /// The branches a block can have.
    pub branches: Vec<BranchSpec>,
    /// Per-channel ops on the sum of the branches (names relative to the block).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post: Vec<OpSpec>,
    /// Where the fused conv goes.
    pub deploy: DeployNames,
    /// The main kernel's side, when blocks of this kind have only one (RT-DETR's RepVggBlock
    /// is 3×3; its `conv1`/`conv2` names also belong to the 1×1 convs of a CSPRepLayer): a
    /// candidate with another is not a block of this kind, and is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<usize>,
    /// Tensors under the block the framework's conversion overwrites without reading
    /// (super-gradients' QARepVGG train file holds a placeholder `rbr_reparam`): consumed
    /// when present, never read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overwrites: Vec<String>,
    /// The framework's deploy form keeps the branch tensors beside the fused conv (RT-DETR's
    /// `convert_to_deploy` adds `conv` and keeps `conv1`/`conv2`): they are read, and passed
    /// through.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keeps_branches: bool,
}

/// Errors in finding blocks or in a layout file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LayoutError {
    /// No layout found any block.
    #[error("no re-parameterizable block found{hint}")]
    NoBlocks {
        /// More on why, when we can tell.
        hint: String,
    },
    /// Blocks of more than one layout were found.
    #[error("the checkpoint mixes layouts: {found}; pass --layout NAME to convert one of them")]
    Mixed {
        /// Each layout with a count and an example block.
        found: String,
    },
    /// `--layout` named no layout.
    #[error("unknown layout `{0}`; known layouts: {1}")]
    Unknown(String, String),
    /// Layouts with the same tensor names but different fusions both found blocks.
    #[error(
        "the checkpoint's names fit layouts {found} alike, whose fusions differ (the names do not tell them apart); pass --layout with one of them"
    )]
    Ambiguous {
        /// The layouts, comma-separated.
        found: String,
    },
    /// BatchNorms still at the statistics `nn.BatchNorm2d()` starts with.
    #[error(
        "{count} of the {total} BN layers of the blocks are at their initial statistics (running_mean 0, running_var 1: eval mode or BN calibration forgotten?), so their fold would be wrong: {names}"
    )]
    InitialStatistics {
        /// How many.
        count: usize,
        /// Of how many BNs in the blocks.
        total: usize,
        /// Their module names.
        names: String,
    },
    /// Blocks of one layout in both fused and unfused form.
    #[error(
        "the file mixes fused and unfused {layout} blocks: {forms}; convert the original train checkpoint"
    )]
    MixedForms {
        /// The layout.
        layout: String,
        /// Counts and examples of blocks in deploy and in train form, and a block with both.
        forms: String,
    },
    /// `--identity` named a block that has no branch decided by a rule.
    #[error(
        "--identity {prefix}: no block `{prefix}` with an identity decided by a rule (blocks where the layout's rule decides: {known})"
    )]
    UnusedIdentity {
        /// The block prefix given.
        prefix: String,
        /// Some blocks where it would apply.
        known: String,
    },
    /// The built-in layout table does not parse or check: a bug in this build.
    #[error(
        "the built-in layout table is broken (a bug in repvgg-fuse; nothing was written): {what}"
    )]
    Builtin {
        /// What is wrong.
        what: String,
    },
    /// A user layout file could not be read or parsed.
    #[error("layout file {path}: {what}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// Tensors that look like part of a block whose main branch is missing.
    #[error(
        "`{tensor}` looks like part of a {layout} block at `{block}`, but that block has no {missing}"
    )]
    HalfBlock {
        /// The layout.
        layout: String,
        /// The block prefix.
        block: String,
        /// The first orphaned tensor.
        tensor: String,
        /// What the block lacks.
        missing: String,
    },
    /// A block exists but is malformed.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The deploy name of a block is already taken by a tensor in the file.
    #[error(
        "block `{block}`: its deploy tensor `{tensor}` already exists in the file; is it partly converted already?"
    )]
    DeployNameTaken {
        /// The block prefix.
        block: String,
        /// The clashing name.
        tensor: String,
    },
}

impl Layout {
    /// The layouts this build knows. The table is compiled in and tested: a table that does
    /// not parse or check is a bug, refused loudly rather than read as "no layout".
    pub fn builtin() -> Result<Vec<Layout>, LayoutError> {
        let broken = |what: String| LayoutError::Builtin { what };
        let layouts: Vec<Layout> =
            serde_json::from_str(BUILTIN).map_err(|e| broken(e.to_string()))?;
        for l in &layouts {
            l.check().map_err(broken)?;
        }
        Ok(layouts)
    }

    /// Reads a user layout file: one layout object, or an array of them.
    pub fn from_file(path: &Path) -> Result<Vec<Layout>, LayoutError> {
        let err = |what: String| LayoutError::File {
            path: path.display().to_string(),
            what,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(Box<Layout>),
            Many(Vec<Layout>),
        }
        let layouts = match serde_json::from_str(&text).map_err(|e| err(e.to_string()))? {
            OneOrMany::One(l) => vec![*l],
            OneOrMany::Many(v) => v,
        };
        for l in &layouts {
            l.check().map_err(err)?;
        }
        Ok(layouts)
    }

    /// Every kind of block of the layout: the top-level one (if it has branches), then `kinds`.
    pub fn all_kinds(&self) -> Vec<Kind> {
        let top = (!self.branches.is_empty()).then(|| Kind {
            name: String::new(),
            at: Vec::new(),
            not_at: Vec::new(),
            branches: self.branches.clone(),
            post: self.post.clone(),
            deploy: self.deploy.clone().unwrap_or(DeployNames {
                weight: String::new(),
                bias: String::new(),
            }),
            kernel: None,
            overwrites: Vec::new(),
            keeps_branches: false,
        });
        top.into_iter().chain(self.kinds.iter().cloned()).collect()
    }

    /// Checks that the layout can describe a block at all.
    pub(super) fn check(&self) -> Result<(), String> {
        if self.branches.is_empty() && self.kinds.is_empty() {
            return Err(format!("layout `{}` has no \"branches\"", self.name));
        }
        if !self.branches.is_empty() && self.deploy.is_none() {
            return Err(format!("layout `{}` has no \"deploy\" names", self.name));
        }
        self.all_kinds()
            .iter()
            .try_for_each(|k| k.check(&self.name))
    }
    /// The BN ε to use and why: `--bn-eps` wins, then the layout's own, then PyTorch's default.
    pub fn eps_info(&self, overridden: Option<f64>) -> crate::report::EpsInfo {
        let (value, source) = self.bn_eps(overridden);
        crate::report::EpsInfo { value, source }
    }

    /// [`Layout::eps_info`] as `(value, source)`.
    pub fn bn_eps(&self, overridden: Option<f64>) -> (f64, String) {
        match (overridden, self.bn_eps) {
            (Some(eps), _) => (eps, "--bn-eps".to_string()),
            (None, Some(eps)) => (
                eps,
                self.bn_eps_reason
                    .clone()
                    .unwrap_or_else(|| format!("{} layout default", self.name)),
            ),
            (None, None) => (
                DEFAULT_BN_EPS,
                "PyTorch BatchNorm2d default, used by this layout's framework".to_string(),
            ),
        }
    }
}
