//! Layouts: how each framework names the branches of a re-parameterizable block.
//!
//! A layout is data — a table of name patterns — not a code path. The built-in table lives in
//! `layouts.json`; a user can pass their own file of the same shape for an in-house fork.
//! Detection matches every tensor name against every pattern, groups the matches by block
//! prefix, and keeps the prefixes that carry a k×k conv branch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::block::{Block, BlockError, BnTensors, Branch, Op, Role};
use crate::checkpoint::Checkpoint;

const BUILTIN: &str = include_str!("layouts.json");

/// PyTorch's `BatchNorm2d` default ε, used where a layout does not settle it.
pub const DEFAULT_BN_EPS: f64 = 1e-5;

/// One op of a branch in a layout file: exactly one of `conv`, `bn`, `scale`, `identity`,
/// `avgpool`. Names are relative to the branch's path; a name starting with `/` is relative
/// to the block (a tensor the block's branches share, like a layer scale).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpSpec {
    /// A conv submodule: `{name}.weight` and optional `{name}.bias`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv: Option<String>,
    /// Tap spacing of that conv (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dilation: Option<usize>,
    /// A BN submodule (`""`: the branch path itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bn: Option<String>,
    /// A per-channel scale tensor (its full name under the path, e.g. `layer_scale.gamma`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<String>,
    /// The block's input itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub identity: bool,
    /// Average pooling with this window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avgpool: Option<usize>,
    /// A BN over the branch's input, before its conv (a NormLinear); goes before the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bn_in: Option<String>,
    /// The conv's kernel may be kh×kw with kh ≠ kw (ACNet's k×1 and 1×k).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub asymmetric: bool,
    /// The conv's stored weight is its kernel minus the identity (DBB's `idconv1`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plus_identity: bool,
    /// A second conv on what the ops before it made (DBB's 1×1 → k×k, its BNAndPad padding
    /// with what the BN makes of zero).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then_conv: Option<String>,
    /// A k×k average of what the ops before it made, padded likewise; 0: the block's kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then_avgpool: Option<usize>,
    /// The op may be absent (FastViT's `layer_scale.gamma` when layer scale is off): a block
    /// without its tensors runs without the op. Without it, a missing tensor is an error.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
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
}

impl OpSpec {
    /// How many kinds of op the entry names (a valid one names exactly one).
    fn kinds(&self) -> usize {
        [
            self.conv.is_some(),
            self.bn.is_some(),
            self.bn_in.is_some(),
            self.then_conv.is_some(),
            self.then_avgpool.is_some(),
            self.scale.is_some(),
            self.identity,
            self.avgpool.is_some(),
        ]
        .into_iter()
        .filter(|k| *k)
        .count()
    }

    /// Whether the op goes before the source.
    fn is_input(&self) -> bool {
        self.bn_in.is_some()
    }

    /// Whether the op starts a branch.
    fn is_source(&self) -> bool {
        self.conv.is_some() || self.identity || self.avgpool.is_some()
    }
}

impl Kind {
    /// Checks that the kind can describe a block at all.
    fn check(&self, layout: &str) -> Result<(), String> {
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
                match (op.kinds(), i == first, op.is_source()) {
                    (1, true, true) | (1, false, false) => {}
                    (1, true, false) => {
                        return err("the first op must be conv, identity or avgpool");
                    }
                    (1, false, true) => {
                        return err("only the first op may be conv, identity or avgpool");
                    }
                    _ => {
                        return err(
                            "each op has exactly one of conv, bn, bn_in, scale, identity, avgpool",
                        );
                    }
                }
            }
        }
        let second = |op: &OpSpec| op.then_conv.is_some() || op.then_avgpool.is_some();
        if let Some(b) = self
            .branches
            .iter()
            .find(|b| b.ops.iter().filter(|op| second(op)).count() > 1)
        {
            return Err(format!(
                "layout `{layout}`, branch `{}`: one then_conv or then_avgpool at most",
                b.path
            ));
        }
        if self
            .post
            .iter()
            .any(|op| op.kinds() != 1 || op.is_source() || second(op))
        {
            return Err(format!(
                "layout `{layout}`: \"post\" takes bn and scale ops only"
            ));
        }
        Ok(())
    }

    /// Whether a block at `prefix` can be of this kind.
    fn applies_at(&self, prefix: &str) -> bool {
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
    fn label(&self) -> String {
        if !self.path.is_empty() {
            return self.path.clone();
        }
        let first = self.op_specs().into_iter().next().unwrap_or_default();
        [first.conv, first.bn, first.scale]
            .into_iter()
            .flatten()
            .next()
            .unwrap_or_else(|| "input".to_string())
    }

    /// The branch's ops, the short form expanded.
    pub fn op_specs(&self) -> Vec<OpSpec> {
        if !self.ops.is_empty() {
            return self.ops.clone();
        }
        let mut ops = Vec::new();
        match &self.conv {
            Some(conv) => {
                ops.push(OpSpec {
                    conv: Some(conv.clone()),
                    ..OpSpec::default()
                });
                // A conv branch without a BN module name has no BN.
                ops.extend(self.bn.clone().map(|bn| OpSpec {
                    bn: Some(bn),
                    ..OpSpec::default()
                }));
            }
            None => {
                ops.push(OpSpec {
                    identity: true,
                    ..OpSpec::default()
                });
                ops.push(OpSpec {
                    bn: Some(self.bn.clone().unwrap_or_default()),
                    ..OpSpec::default()
                });
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

/// Errors in finding blocks or in a layout file.
#[derive(Debug, thiserror::Error)]
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
    /// The layouts this build knows.
    pub fn builtin() -> Vec<Layout> {
        // The table is compiled in and tested; a parse failure is a build defect.
        serde_json::from_str(BUILTIN).unwrap_or_default()
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
        });
        top.into_iter().chain(self.kinds.iter().cloned()).collect()
    }

    /// Checks that the layout can describe a block at all.
    fn check(&self) -> Result<(), String> {
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

/// The blocks of one layout found in a checkpoint, and what happens to every other tensor.
#[derive(Debug)]
pub struct Detection {
    /// The layout the blocks follow.
    pub layout: Layout,
    /// How the layout was chosen (`detected`, `--layout`, `--layout-file`).
    pub chosen_by: String,
    /// The blocks, in the order their main weight appears in the file.
    pub blocks: Vec<Block>,
    /// Candidates left alone because their shapes do not fit (generic layouts only).
    pub skipped: Vec<(String, String)>,
}

impl Detection {
    /// Finds the blocks in `ckpt`.
    ///
    /// With `forced`, only that layout is tried; otherwise every layout in `layouts` is, and
    /// exactly one of them must find blocks.
    pub fn find(
        ckpt: &Checkpoint,
        layouts: &[Layout],
        forced: Option<&str>,
        chosen_by: &str,
    ) -> Result<Detection, LayoutError> {
        let names = split_names(ckpt);
        if let Some(name) = forced {
            let Some(layout) = layouts.iter().find(|l| l.name == name) else {
                let known: Vec<_> = layouts.iter().map(|l| l.name.as_str()).collect();
                return Err(LayoutError::Unknown(name.to_string(), known.join(", ")));
            };
            let found = find_blocks(ckpt, &names, layout, true)?;
            if found.blocks.is_empty() {
                return Err(LayoutError::NoBlocks {
                    hint: format!(" of layout {}{}", layout.name, deployed_hint(ckpt, layouts)),
                });
            }
            return Ok(Detection {
                layout: layout.clone(),
                chosen_by: chosen_by.to_string(),
                blocks: found.blocks,
                skipped: found.skipped,
            });
        }
        let mut hits = Vec::new();
        for layout in layouts {
            if let Some(marker) = &layout.marker {
                let leaf = format!(".{marker}");
                if !ckpt.tensors().iter().any(|t| t.name.ends_with(&leaf)) {
                    continue;
                }
            }
            let found = match find_blocks(ckpt, &names, layout, false) {
                // A fallback's common names may meet tensors they do not describe.
                Err(_) if layout.fallback => continue,
                found => found?,
            };
            if !found.blocks.is_empty() {
                hits.push((layout, found));
            }
        }
        let hits = settle(hits);
        match hits.len() {
            0 => Err(LayoutError::NoBlocks {
                hint: deployed_hint(ckpt, layouts),
            }),
            1 => {
                let (layout, _) = hits
                    .into_iter()
                    .next()
                    .ok_or_else(|| LayoutError::NoBlocks {
                        hint: String::new(),
                    })?;
                // Again, now refusing half blocks: the layout is settled.
                let found = find_blocks(ckpt, &names, layout, true)?;
                Ok(Detection {
                    layout: layout.clone(),
                    chosen_by: chosen_by.to_string(),
                    blocks: found.blocks,
                    skipped: found.skipped,
                })
            }
            _ => Err(LayoutError::Mixed {
                found: hits
                    .iter()
                    .map(|(l, f)| {
                        format!(
                            "{} ({} blocks, e.g. `{}`)",
                            l.name,
                            f.blocks.len(),
                            f.blocks[0].name
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Every tensor consumed by a fused block (its branches, `num_batches_tracked` included).
    pub fn consumed(&self) -> BTreeSet<&str> {
        self.blocks
            .iter()
            .flat_map(|b| b.consumed.iter().map(String::as_str))
            .collect()
    }
}

/// Of the layouts that found blocks, the ones left to choose from: fallbacks only when
/// nothing else found blocks, and not a layout whose blocks take only tensors that another
/// layout's take too (a FastViT file holds timm MobileOne blocks). Of layouts that take the
/// same tensors, the one whose blocks are outer modules (iFormer's RepCPE around what RepViT
/// would fuse as a ConvNorm), then the earlier in the table (a pure MobileOne file matches
/// FastViT's MobileOne kind as well).
fn settle(mut hits: Vec<(&Layout, BlocksFound)>) -> Vec<(&Layout, BlocksFound)> {
    if hits.iter().any(|(l, _)| !l.fallback) {
        hits.retain(|(l, _)| !l.fallback);
    }
    let sets: Vec<BTreeSet<&str>> = hits
        .iter()
        .map(|(_, f)| {
            f.blocks
                .iter()
                .flat_map(|b| b.consumed.iter().map(String::as_str))
                .collect()
        })
        .collect();
    let depths: Vec<usize> = hits
        .iter()
        .map(|(_, f)| f.blocks.iter().map(|b| depth(&b.name)).sum())
        .collect();
    let subsumed: Vec<bool> = (0..sets.len())
        .map(|i| {
            (0..sets.len()).any(|j| {
                let outer = depths[j] < depths[i] || depths[j] == depths[i] && j < i;
                j != i && sets[i].is_subset(&sets[j]) && (sets[j].len() > sets[i].len() || outer)
            })
        })
        .collect();
    let mut keep = subsumed.into_iter().map(|s| !s);
    hits.retain(|_| keep.next().unwrap_or(true));
    hits
}

/// Says so when the file looks like it is in deploy form already.
fn deployed_hint(ckpt: &Checkpoint, layouts: &[Layout]) -> String {
    for layout in layouts {
        if layout.generic_names || layout.fallback {
            continue;
        }
        for kind in layout.all_kinds() {
            let weight = &kind.deploy.weight;
            if !weight.contains('.') {
                continue;
            }
            let suffix = format!(".{weight}");
            let n = ckpt
                .tensors()
                .iter()
                .filter(|t| t.name.ends_with(&suffix) || &t.name == weight)
                .count();
            if n > 0 {
                return format!(
                    "; it has {n} `{weight}` tensors, so it looks like a deploy file already"
                );
            }
        }
    }
    "; expected tensors named like `<block>.rbr_dense.conv.weight` (see --layout for the known layouts)".to_string()
}

/// Which tensor of an op a name fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Leaf {
    ConvWeight,
    ConvWeight2,
    ConvBias,
    BnWeight,
    BnBias,
    BnMean,
    BnVar,
    BnCount,
    Scale,
}

const BN_LEAVES: [(Leaf, &str); 5] = [
    (Leaf::BnWeight, "weight"),
    (Leaf::BnBias, "bias"),
    (Leaf::BnMean, "running_mean"),
    (Leaf::BnVar, "running_var"),
    (Leaf::BnCount, "num_batches_tracked"),
];

/// A tensor's place in a branch: (index of the op in the branch's chain, which tensor).
type Slot = (usize, Leaf);

/// The tensors found for one branch of one candidate block.
#[derive(Debug, Default)]
struct Found {
    spec: usize,
    slots: BTreeMap<Slot, String>,
}

struct BlocksFound {
    blocks: Vec<Block>,
    skipped: Vec<(String, String)>,
}

fn segments(s: &str) -> Vec<String> {
    s.split('.')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// Every tensor an op reads, as (leaf, name relative to the op's base).
fn op_leaves(op: &OpSpec) -> Vec<(Leaf, String)> {
    let under = |base: &str, leaf: &str| {
        let base = base.trim_start_matches('/');
        if base.is_empty() {
            leaf.to_string()
        } else {
            format!("{base}.{leaf}")
        }
    };
    if let Some(conv) = &op.then_conv {
        vec![(Leaf::ConvWeight2, under(conv, "weight"))]
    } else if let Some(conv) = &op.conv {
        vec![
            (Leaf::ConvWeight, under(conv, "weight")),
            (Leaf::ConvBias, under(conv, "bias")),
        ]
    } else if let Some(bn) = op.bn.as_ref().or(op.bn_in.as_ref()) {
        BN_LEAVES
            .iter()
            .map(|(l, leaf)| (*l, under(bn, leaf)))
            .collect()
    } else if let Some(scale) = &op.scale {
        vec![(Leaf::Scale, scale.trim_start_matches('/').to_string())]
    } else {
        Vec::new()
    }
}

/// Whether an op's names are relative to the block rather than the branch.
fn block_relative(op: &OpSpec) -> bool {
    [&op.conv, &op.bn, &op.bn_in, &op.scale, &op.then_conv]
        .into_iter()
        .flatten()
        .any(|n| n.starts_with('/'))
}

/// Expands a branch spec into (slot, pattern segments) pairs, for its branch-relative ops.
fn slot_patterns(spec: &BranchSpec) -> Vec<(Slot, Vec<String>)> {
    let path = segments(&spec.path);
    let mut out = Vec::new();
    for (i, op) in spec.op_specs().iter().enumerate() {
        if block_relative(op) {
            continue;
        }
        for (leaf, name) in op_leaves(op) {
            let mut p = path.clone();
            p.extend(segments(&name));
            out.push(((i, leaf), p));
        }
    }
    out
}

/// Matches `name` against a pattern from its end; returns (prefix, branch label).
fn match_suffix(name: &[&str], pattern: &[String], n_path: usize) -> Option<(String, String)> {
    if name.len() < pattern.len() {
        return None;
    }
    let split = name.len() - pattern.len();
    for (seg, pat) in name[split..].iter().zip(pattern) {
        let ok = if pat == "{n}" {
            !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit())
        } else {
            seg == pat
        };
        if !ok {
            return None;
        }
    }
    let prefix = name[..split].join(".");
    let label = name[split..split + n_path].join(".");
    Some((prefix, label))
}

/// Every tensor name with its dot-separated parts, split once for all layouts.
type Names<'a> = Vec<(&'a str, Vec<&'a str>)>;

fn split_names(ckpt: &Checkpoint) -> Names<'_> {
    ckpt.tensors()
        .iter()
        .map(|t| (t.name.as_str(), t.name.split('.').collect()))
        .collect()
}

/// Candidate blocks of `kind`: prefix → branch label → tensors found.
fn candidates(names: &Names, kind: &Kind) -> BTreeMap<String, BTreeMap<String, Found>> {
    // Patterns by their last name (a leaf: `weight`, `running_var`, …): a tensor is matched
    // against those that end as it does only.
    let mut by_leaf: BTreeMap<String, Vec<(usize, Slot, Vec<String>)>> = BTreeMap::new();
    for (spec_i, spec) in kind.branches.iter().enumerate() {
        for (slot, pattern) in slot_patterns(spec) {
            let leaf = pattern.last().cloned().unwrap_or_default();
            by_leaf
                .entry(leaf)
                .or_default()
                .push((spec_i, slot, pattern));
        }
    }
    let path_len: Vec<usize> = kind
        .branches
        .iter()
        .map(|b| segments(&b.path).len())
        .collect();
    let mut candidates: BTreeMap<String, BTreeMap<String, Found>> = BTreeMap::new();
    for (name, segs) in names {
        let Some(patterns) = segs.last().and_then(|leaf| by_leaf.get(*leaf)) else {
            continue;
        };
        for (spec_i, slot, pattern) in patterns {
            let Some((prefix, label)) = match_suffix(segs, pattern, path_len[*spec_i]) else {
                continue;
            };
            // Branches right under the block (UniRepLKNet's) are told apart by their first
            // op's name.
            let label = if label.is_empty() {
                kind.branches[*spec_i].label()
            } else {
                label
            };
            let found = candidates
                .entry(prefix)
                .or_default()
                .entry(label)
                .or_default();
            found.spec = *spec_i;
            found.slots.insert(*slot, name.to_string());
        }
    }
    candidates
}

/// A candidate that is not a block: half a block (a conv branch without the main conv) or a
/// block without a required branch. An error, unless blocks of another kind take all its
/// tensors (at the same prefix, for a missing branch: RepViT's current and legacy RepVggDw).
struct Orphan {
    error: LayoutError,
    prefix: Option<String>,
    tensors: Vec<String>,
}

fn find_blocks(
    ckpt: &Checkpoint,
    names: &Names,
    layout: &Layout,
    refuse_half: bool,
) -> Result<BlocksFound, LayoutError> {
    let mut found = BlocksFound {
        blocks: Vec::new(),
        skipped: Vec::new(),
    };
    let mut kinds_of = Vec::new();
    let mut orphans = Vec::new();
    for (k, kind) in layout.all_kinds().iter().enumerate() {
        let before = found.blocks.len();
        find_kind(
            (ckpt, names),
            layout,
            kind,
            refuse_half,
            &mut found,
            &mut orphans,
        )?;
        kinds_of.resize(kinds_of.len() + found.blocks.len() - before, k);
    }
    let mut blocks = drop_contained(std::mem::take(&mut found.blocks), &kinds_of);
    let consumed: BTreeSet<&str> = blocks
        .iter()
        .flat_map(|b| b.consumed.iter().map(String::as_str))
        .collect();
    for o in orphans {
        let taken = o.tensors.iter().all(|t| consumed.contains(t.as_str()))
            && o.prefix.is_none_or(|p| blocks.iter().any(|b| b.name == p));
        if !taken {
            return Err(o.error);
        }
    }
    check_ownership(ckpt, &blocks)?;
    blocks.sort_by_key(|b| ckpt.get(b.main_weight()).map_or(0, |t| t.start));
    found.blocks = blocks;
    Ok(found)
}

/// The blocks of one kind of `layout` into `found`; candidates that are not blocks into
/// `orphans` (when refusing half blocks).
fn find_kind(
    (ckpt, names): (&Checkpoint, &Names),
    layout: &Layout,
    kind: &Kind,
    refuse_half: bool,
    found: &mut BlocksFound,
    orphans: &mut Vec<Orphan>,
) -> Result<(), LayoutError> {
    let several = layout.kinds.len() + usize::from(!layout.branches.is_empty()) > 1;
    let is_main = |f: &Found| {
        kind.branches[f.spec].role == Role::Kxk
            && f.slots.keys().any(|(_, leaf)| *leaf == Leaf::ConvWeight)
    };
    for (prefix, branches) in &candidates(names, kind) {
        if !kind.applies_at(prefix) {
            continue;
        }
        let tensors = || {
            branches
                .values()
                .flat_map(|f| f.slots.values().cloned())
                .collect()
        };
        if !branches.values().any(is_main) {
            if refuse_half && !layout.generic_names {
                if let Err(error) = refuse_half_block(layout, kind, prefix, branches) {
                    orphans.push(Orphan {
                        error,
                        prefix: None,
                        tensors: tensors(),
                    });
                }
            }
            continue;
        }
        let missing_required = kind
            .branches
            .iter()
            .enumerate()
            .find(|(i, spec)| spec.required && !branches.values().any(|f| f.spec == *i));
        if let Some((_, spec)) = missing_required {
            let why = format!("no `{}` branch", spec.path);
            if layout.generic_names || !refuse_half {
                found.skipped.push((prefix.clone(), why));
            } else {
                orphans.push(Orphan {
                    error: BlockError::new(prefix, why).into(),
                    prefix: Some(prefix.clone()),
                    tensors: tensors(),
                });
            }
            continue;
        }
        match assemble(ckpt, kind, prefix, branches) {
            Ok(block) => found.blocks.push(block),
            Err(e) if layout.generic_names => found.skipped.push((prefix.clone(), e.what)),
            // Another kind may be what the block is (DBB's four forms share most names).
            Err(e) if several && refuse_half => orphans.push(Orphan {
                error: e.into(),
                prefix: Some(prefix.clone()),
                tensors: tensors(),
            }),
            Err(e) if several => found.skipped.push((prefix.clone(), e.what)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Drops a block whose tensors all belong to a larger block of another kind (the mixer
/// inside FastViT's RepMixer, the ConvNorm inside RepViT's RepVggDw: the framework converts
/// the outer module); of two blocks with the same tensors, the inner one (SHViT's Residual
/// around a Conv2dNorm is converted, not the Conv2dNorm), at the same prefix the later kind's.
fn drop_contained(blocks: Vec<Block>, kinds_of: &[usize]) -> Vec<Block> {
    let sets: Vec<BTreeSet<&str>> = blocks
        .iter()
        .map(|b| b.consumed.iter().map(String::as_str).collect())
        .collect();
    let mut owners: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, set) in sets.iter().enumerate() {
        for t in set {
            owners.entry(t).or_default().push(i);
        }
    }
    let inside = |i: usize| {
        let Some(first) = sets[i].first() else {
            return false;
        };
        let outer = |j: usize| {
            let (a, b) = (depth(&blocks[j].name), depth(&blocks[i].name));
            a < b || a == b && kinds_of[j] < kinds_of[i]
        };
        owners[first].iter().any(|&j| {
            j != i
                && kinds_of[j] != kinds_of[i]
                && (sets[j].len() > sets[i].len() || sets[j].len() == sets[i].len() && outer(j))
                && sets[i].is_subset(&sets[j])
        })
    };
    let keep: Vec<bool> = (0..blocks.len()).map(|i| !inside(i)).collect();
    blocks
        .into_iter()
        .zip(keep)
        .filter_map(|(b, k)| k.then_some(b))
        .collect()
}

/// How deep a block prefix is: its number of dot-separated names.
fn depth(prefix: &str) -> usize {
    if prefix.is_empty() {
        0
    } else {
        prefix.split('.').count()
    }
}

/// A conv branch without its block's k×k conv is half a block.
fn refuse_half_block(
    layout: &Layout,
    kind: &Kind,
    prefix: &str,
    branches: &BTreeMap<String, Found>,
) -> Result<(), LayoutError> {
    let Some(tensor) = branches.values().find_map(|f| {
        f.slots
            .iter()
            .find_map(|((_, leaf), t)| (*leaf == Leaf::ConvWeight).then_some(t))
    }) else {
        return Ok(());
    };
    let main = kind
        .branches
        .iter()
        .find(|b| b.role == Role::Kxk)
        .map_or("k×k".to_string(), |b| format!("`{}` branch", b.path));
    Err(LayoutError::HalfBlock {
        layout: layout.name.clone(),
        block: prefix.to_string(),
        tensor: tensor.clone(),
        missing: main,
    })
}

/// Refuses a deploy name that is taken, and a tensor that two blocks both claim (blocks nest
/// only if a layout's names are ambiguous).
fn check_ownership(ckpt: &Checkpoint, blocks: &[Block]) -> Result<(), LayoutError> {
    for block in blocks {
        for tensor in [&block.deploy_weight, &block.deploy_bias] {
            // UniRepLKNet writes its fused kernel under the name of a kernel it consumes.
            if ckpt.get(tensor).is_some() && !block.consumed.contains(tensor) {
                return Err(LayoutError::DeployNameTaken {
                    block: block.name.clone(),
                    tensor: tensor.clone(),
                });
            }
        }
    }
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    for block in blocks {
        let own: BTreeSet<&str> = block.consumed.iter().map(String::as_str).collect();
        for t in own {
            if let Some(other) = owner.insert(t, &block.name) {
                return Err(BlockError::new(
                    &block.name,
                    format!("tensor `{t}` also belongs to block `{other}`"),
                )
                .into());
            }
        }
    }
    Ok(())
}

/// Joins a prefix and a name relative to it.
fn join(prefix: &str, leaf: &str) -> String {
    let leaf = leaf.trim_start_matches('/');
    if prefix.is_empty() {
        leaf.to_string()
    } else {
        format!("{prefix}.{leaf}")
    }
}

/// Turns the tensors found under one prefix into a checked [`Block`].
fn assemble(
    ckpt: &Checkpoint,
    kind: &Kind,
    prefix: &str,
    found: &BTreeMap<String, Found>,
) -> Result<Block, BlockError> {
    // Branches without tensors of their own (RepMixer's and RepViT's plain skip) are in every
    // block of the kind.
    let tensorless: Vec<(String, Found)> = (kind.branches.iter().enumerate())
        .filter(|(_, spec)| slot_patterns(spec).is_empty() && !spec.op_specs().is_empty())
        .filter(|(_, spec)| spec.op_specs().iter().all(|op| op_leaves(op).is_empty()))
        .map(|(i, spec)| {
            let found = Found {
                spec: i,
                ..Found::default()
            };
            (spec.label(), found)
        })
        .collect();
    let mut order: Vec<(&String, &Found)> = found
        .iter()
        .chain(tensorless.iter().map(|(l, f)| (l, f)))
        .collect();
    // Branch order: by role (k×k first), then label — so the main branch is first.
    order.sort_by_key(|(label, f)| (kind.branches[f.spec].role, f.spec, natural_key(label)));
    let mut branches = Vec::new();
    for (label, f) in order {
        let spec = &kind.branches[f.spec];
        let base = if spec.path.is_empty() {
            prefix.to_string()
        } else {
            join(prefix, label)
        };
        let at = Place {
            prefix,
            base,
            label,
            identity: spec.role == Role::Identity,
        };
        let ops = at.ops(ckpt, f, &spec.op_specs())?;
        branches.push(Branch {
            label: label.clone(),
            role: spec.role,
            coef: spec.coef,
            ops,
        });
    }
    let at = Place {
        prefix,
        base: prefix.to_string(),
        label: "(post-ops)",
        identity: false,
    };
    let post = at.ops(ckpt, &Found::default(), &kind.post)?;
    let deploy = [
        join(prefix, &kind.deploy.weight),
        join(prefix, &kind.deploy.bias),
    ];
    let mut block = Block::new(ckpt, prefix, branches, post, deploy)?;
    block.kind = kind.name.clone();
    Ok(block)
}

/// Where an op's tensors are: the block prefix, the branch's own path and label.
struct Place<'a> {
    prefix: &'a str,
    base: String,
    label: &'a str,
    identity: bool,
}

impl Place<'_> {
    /// A chain of ops; optional ones whose tensors are absent left out.
    fn ops(&self, ckpt: &Checkpoint, f: &Found, specs: &[OpSpec]) -> Result<Vec<Op>, BlockError> {
        let mut ops = Vec::with_capacity(specs.len());
        for (i, op) in specs.iter().enumerate() {
            ops.extend(self.op(ckpt, f, i, op)?);
        }
        Ok(ops)
    }

    /// Op `i` of a branch whose branch-relative tensors matched as `f`; block-relative ones
    /// (and the post-ops') are looked up by name.
    fn op(
        &self,
        ckpt: &Checkpoint,
        f: &Found,
        i: usize,
        op: &OpSpec,
    ) -> Result<Option<Op>, BlockError> {
        let looked_up;
        let slots = if block_relative(op) || f.slots.is_empty() {
            let root = if block_relative(op) {
                self.prefix
            } else {
                &self.base
            };
            looked_up = op_leaves(op)
                .into_iter()
                .map(|(leaf, name)| ((i, leaf), join(root, &name)))
                .filter(|(_, name)| ckpt.get(name).is_some())
                .collect();
            &looked_up
        } else {
            &f.slots
        };
        if op.optional && !slots.keys().any(|(j, _)| *j == i) {
            return Ok(None);
        }
        self.build(slots, f, i, op).map(Some)
    }

    fn err<T>(&self, what: String) -> Result<T, BlockError> {
        Err(BlockError::new(self.prefix, what))
    }

    /// Op `i` from `slots`, refusing one that is incomplete; `f` is all the branch matched.
    fn build(
        &self,
        slots: &BTreeMap<Slot, String>,
        f: &Found,
        i: usize,
        op: &OpSpec,
    ) -> Result<Op, BlockError> {
        let label = self.label;
        let slot = |leaf| slots.get(&(i, leaf)).cloned();
        if let Some(conv) = &op.conv {
            let Some(weight) = slot(Leaf::ConvWeight) else {
                return self.err(format!(
                    "branch `{label}` has {} but no conv weight `{}`",
                    describe_slots(f),
                    join(&self.base, &format!("{conv}.weight"))
                ));
            };
            return Ok(Op::Conv {
                weight,
                bias: slot(Leaf::ConvBias),
                dilation: op.dilation.unwrap_or(1),
                asymmetric: op.asymmetric,
                plus_identity: op.plus_identity,
            });
        }
        if let Some(conv) = &op.then_conv {
            return match slot(Leaf::ConvWeight2) {
                Some(weight) => Ok(Op::ThenConv { weight }),
                None => self.err(format!(
                    "branch `{label}` has {} but no second conv weight `{}`",
                    describe_slots(f),
                    join(&self.base, &format!("{conv}.weight"))
                )),
            };
        }
        if let Some(side) = op.then_avgpool {
            return Ok(Op::ThenAvgPool { kernel: side });
        }
        if op.identity {
            return Ok(Op::Identity);
        }
        if let Some(side) = op.avgpool {
            return Ok(Op::AvgPool { kernel: side });
        }
        if let Some(scale) = &op.scale {
            return match slot(Leaf::Scale) {
                Some(weight) => Ok(Op::Scale { weight }),
                None => self.err(format!(
                    "branch `{label}` has no scale tensor `{}`",
                    join(&self.base, scale)
                )),
            };
        }
        if let Some(path) = &op.bn_in {
            return match self.bn(slots, f, i, path)? {
                Op::Bn(bn) => Ok(Op::InputBn(bn)),
                other => Ok(other),
            };
        }
        self.bn(slots, f, i, op.bn.as_deref().unwrap_or_default())
    }

    /// A BN op: all four tensors, or an error that says which are missing.
    fn bn(
        &self,
        slots: &BTreeMap<Slot, String>,
        f: &Found,
        i: usize,
        bn_path: &str,
    ) -> Result<Op, BlockError> {
        let label = self.label;
        let missing: Vec<&str> = BN_LEAVES[..4]
            .iter()
            .filter(|(l, _)| !slots.contains_key(&(i, *l)))
            .map(|(_, name)| *name)
            .collect();
        if missing.len() == 4 {
            if self.identity {
                return self.err(format!("identity branch `{label}` has no BN tensors"));
            }
            // The layout puts a BN here; without it the branch would be fused as a bare conv,
            // silently wrong.
            let path = join(&self.base, bn_path);
            return self.err(format!(
                "branch `{label}` has {} but no BN: expected `{path}.weight`, `.bias`, `.running_mean` and `.running_var`",
                describe_slots(f)
            ));
        }
        if !missing.is_empty() {
            return self.err(format!(
                "branch `{label}`: its BN is missing {} (found {})",
                missing.join(", "),
                describe_slots(f)
            ));
        }
        let get = |leaf| slots[&(i, leaf)].clone();
        Ok(Op::Bn(BnTensors {
            weight: get(Leaf::BnWeight),
            bias: get(Leaf::BnBias),
            running_mean: get(Leaf::BnMean),
            running_var: get(Leaf::BnVar),
            num_batches_tracked: slots.get(&(i, Leaf::BnCount)).cloned(),
        }))
    }
}

fn describe_slots(f: &Found) -> String {
    let names: Vec<&str> = f.slots.values().map(String::as_str).collect();
    names.join(", ")
}

/// Sorts `conv_kxk.10` after `conv_kxk.2`.
fn natural_key(label: &str) -> Vec<(u64, String)> {
    label
        .split('.')
        .map(|s| match s.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, s.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_layouts_parse_and_check() {
        let layouts: Vec<Layout> = serde_json::from_str(BUILTIN).expect("layouts.json parses");
        assert!(layouts.len() >= 9);
        for l in &layouts {
            l.check().expect("built-in layout is consistent");
        }
    }

    #[test]
    fn pattern_with_index_matches_digits_only() {
        let spec = BranchSpec {
            role: Role::Kxk,
            path: "conv_kxk.{n}".into(),
            conv: Some("conv".into()),
            bn: Some("bn".into()),
            ops: Vec::new(),
            coef: 1.0,
            required: false,
        };
        let pats = slot_patterns(&spec);
        let (_, weight) = &pats[0];
        let name: Vec<&str> = "stages.1.0.conv_kxk.12.conv.weight".split('.').collect();
        assert_eq!(
            match_suffix(&name, weight, 2),
            Some(("stages.1.0".to_string(), "conv_kxk.12".to_string()))
        );
        let name: Vec<&str> = "stages.1.0.conv_kxk.conv.weight".split('.').collect();
        assert_eq!(match_suffix(&name, weight, 2), None);
    }
}
