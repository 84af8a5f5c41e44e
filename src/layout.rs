//! Layouts: how each framework names the branches of a re-parameterizable block.
//!
//! A layout is data — a table of name patterns — not a code path. The built-in table lives in
//! `layouts.json`; a user can pass their own file of the same shape for an in-house fork.
//! Detection matches every tensor name against every pattern, groups the matches by block
//! prefix, and keeps the prefixes that carry a k×k conv branch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::block::{Block, BlockError, BnTensors, Branch, ConvTensors};
use crate::checkpoint::Checkpoint;

const BUILTIN: &str = include_str!("layouts.json");

/// PyTorch's `BatchNorm2d` default ε, used where a layout does not settle it.
pub const DEFAULT_BN_EPS: f64 = 1e-5;

/// The part a branch plays in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A k×k conv (+ BN): the block's main branch; MobileOne has several.
    Kxk,
    /// A 1×1 conv (+ BN), padded to k×k at the centre.
    Scale,
    /// A BN on the input itself (the skip connection).
    Identity,
}

/// One branch's names, relative to the block prefix.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchSpec {
    /// What the branch is.
    pub role: Role,
    /// Path of the branch module under the block; `{n}` stands for a branch index (0, 1, …).
    pub path: String,
    /// Name of the conv submodule under `path` (absent for the identity branch).
    #[serde(default)]
    pub conv: Option<String>,
    /// Name of the BN submodule under `path`; absent means the BN is `path` itself.
    #[serde(default)]
    pub bn: Option<String>,
    /// Whether a block must have this branch to count as a block of this layout.
    #[serde(default)]
    pub required: bool,
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
    /// The branches a block can have.
    pub branches: Vec<BranchSpec>,
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
            One(Layout),
            Many(Vec<Layout>),
        }
        let layouts = match serde_json::from_str(&text).map_err(|e| err(e.to_string()))? {
            OneOrMany::One(l) => vec![l],
            OneOrMany::Many(v) => v,
        };
        for l in &layouts {
            l.check().map_err(err)?;
        }
        Ok(layouts)
    }

    /// Checks that the layout can describe a block at all.
    fn check(&self) -> Result<(), String> {
        if !self.branches.iter().any(|b| b.role == Role::Kxk) {
            return Err(format!("layout `{}` has no \"kxk\" branch", self.name));
        }
        for b in &self.branches {
            let has_conv = b.conv.is_some();
            if (b.role == Role::Identity) == has_conv {
                return Err(format!(
                    "layout `{}`, branch `{}`: {}",
                    self.name,
                    b.path,
                    if has_conv {
                        "an identity branch has no conv"
                    } else {
                        "a conv branch needs \"conv\""
                    }
                ));
            }
        }
        Ok(())
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
        if let Some(name) = forced {
            let Some(layout) = layouts.iter().find(|l| l.name == name) else {
                let known: Vec<_> = layouts.iter().map(|l| l.name.as_str()).collect();
                return Err(LayoutError::Unknown(name.to_string(), known.join(", ")));
            };
            let found = find_blocks(ckpt, layout, true)?;
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
            let found = find_blocks(ckpt, layout, false)?;
            if !found.blocks.is_empty() {
                hits.push((layout, found));
            }
        }
        match hits.len() {
            0 => Err(LayoutError::NoBlocks {
                hint: deployed_hint(ckpt, layouts),
            }),
            1 => {
                let (layout, _) = hits.remove(0);
                // Again, now refusing half blocks: the layout is settled.
                let found = find_blocks(ckpt, layout, true)?;
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

/// Says so when the file looks like it is in deploy form already.
fn deployed_hint(ckpt: &Checkpoint, layouts: &[Layout]) -> String {
    for layout in layouts {
        if layout.generic_names {
            continue;
        }
        let suffix = format!(".{}", layout.deploy.weight);
        let n = ckpt
            .tensors()
            .iter()
            .filter(|t| t.name.ends_with(&suffix) || t.name == layout.deploy.weight)
            .count();
        if n > 0 {
            return format!(
                "; it has {n} `{}` tensors, so it looks like a deploy file already",
                layout.deploy.weight
            );
        }
    }
    "; expected tensors named like `<block>.rbr_dense.conv.weight` (see --layout for the known layouts)".to_string()
}

/// A tensor of a branch: which slot of the branch it fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    ConvWeight,
    ConvBias,
    BnWeight,
    BnBias,
    BnMean,
    BnVar,
    BnCount,
}

const BN_SLOTS: [(Slot, &str); 5] = [
    (Slot::BnWeight, "weight"),
    (Slot::BnBias, "bias"),
    (Slot::BnMean, "running_mean"),
    (Slot::BnVar, "running_var"),
    (Slot::BnCount, "num_batches_tracked"),
];

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

/// Expands a branch spec into (slot, pattern segments) pairs.
fn slot_patterns(spec: &BranchSpec) -> Vec<(Slot, Vec<String>)> {
    let split = |s: &str| -> Vec<String> {
        s.split('.')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut out = Vec::new();
    let path = split(&spec.path);
    if let Some(conv) = &spec.conv {
        let mut base = path.clone();
        base.extend(split(conv));
        for (slot, leaf) in [(Slot::ConvWeight, "weight"), (Slot::ConvBias, "bias")] {
            let mut p = base.clone();
            p.push(leaf.to_string());
            out.push((slot, p));
        }
    }
    let mut bn_base = path;
    if let Some(bn) = &spec.bn {
        bn_base.extend(split(bn));
    }
    if spec.conv.is_some() && spec.bn.is_none() {
        // A conv branch without a BN module name has no BN.
        return out;
    }
    for (slot, leaf) in BN_SLOTS {
        let mut p = bn_base.clone();
        p.push(leaf.to_string());
        out.push((slot, p));
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

fn find_blocks(
    ckpt: &Checkpoint,
    layout: &Layout,
    refuse_half: bool,
) -> Result<BlocksFound, LayoutError> {
    let patterns: Vec<Vec<(Slot, Vec<String>)>> =
        layout.branches.iter().map(slot_patterns).collect();
    let path_len: Vec<usize> = layout
        .branches
        .iter()
        .map(|b| b.path.split('.').filter(|p| !p.is_empty()).count())
        .collect();
    // prefix → branch label → tensors found
    let mut candidates: BTreeMap<String, BTreeMap<String, Found>> = BTreeMap::new();
    for tensor in ckpt.tensors() {
        let segs: Vec<&str> = tensor.name.split('.').collect();
        for (spec_i, slots) in patterns.iter().enumerate() {
            for (slot, pattern) in slots {
                if let Some((prefix, label)) = match_suffix(&segs, pattern, path_len[spec_i]) {
                    let found = candidates
                        .entry(prefix)
                        .or_default()
                        .entry(label)
                        .or_default();
                    found.spec = spec_i;
                    found.slots.insert(*slot, tensor.name.clone());
                }
            }
        }
    }

    let mut blocks = Vec::new();
    let mut skipped = Vec::new();
    for (prefix, branches) in &candidates {
        let has_main = branches.values().any(|f| {
            layout.branches[f.spec].role == Role::Kxk && f.slots.contains_key(&Slot::ConvWeight)
        });
        if !has_main {
            if refuse_half && !layout.generic_names {
                // A conv branch without its block's k×k conv is half a block.
                if let Some(f) = branches
                    .values()
                    .find(|f| f.slots.contains_key(&Slot::ConvWeight))
                {
                    let main = layout
                        .branches
                        .iter()
                        .find(|b| b.role == Role::Kxk)
                        .map_or("k×k".to_string(), |b| format!("`{}` branch", b.path));
                    return Err(LayoutError::HalfBlock {
                        layout: layout.name.clone(),
                        block: prefix.clone(),
                        tensor: f.slots[&Slot::ConvWeight].clone(),
                        missing: main,
                    });
                }
            }
            continue;
        }
        let missing_required = layout
            .branches
            .iter()
            .enumerate()
            .find(|(i, spec)| spec.required && !branches.values().any(|f| f.spec == *i));
        if let Some((_, spec)) = missing_required {
            let why = format!("no `{}` branch", spec.path);
            if layout.generic_names || !refuse_half {
                skipped.push((prefix.clone(), why));
                continue;
            }
            return Err(BlockError::new(prefix, why).into());
        }
        match assemble(ckpt, layout, prefix, branches) {
            Ok(block) => blocks.push(block),
            Err(e) if layout.generic_names => skipped.push((prefix.clone(), e.what)),
            Err(e) => return Err(e.into()),
        }
    }
    for block in &blocks {
        for tensor in [&block.deploy_weight, &block.deploy_bias] {
            if ckpt.get(tensor).is_some() {
                return Err(LayoutError::DeployNameTaken {
                    block: block.name.clone(),
                    tensor: tensor.clone(),
                });
            }
        }
    }
    // Blocks nest only if a layout's names are ambiguous; a tensor must belong to one block.
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    for block in &blocks {
        for t in &block.consumed {
            if let Some(other) = owner.insert(t, &block.name) {
                return Err(BlockError::new(
                    &block.name,
                    format!("tensor `{t}` also belongs to block `{other}`"),
                )
                .into());
            }
        }
    }
    blocks.sort_by_key(|b| {
        ckpt.get(&b.branches[0].conv_weight_name())
            .map_or(0, |t| t.start)
    });
    Ok(BlocksFound { blocks, skipped })
}

/// Turns the tensors found under one prefix into a checked [`Block`].
fn assemble(
    ckpt: &Checkpoint,
    layout: &Layout,
    prefix: &str,
    found: &BTreeMap<String, Found>,
) -> Result<Block, BlockError> {
    let join = |leaf: &str| {
        if prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{prefix}.{leaf}")
        }
    };
    let mut branches = Vec::new();
    // Branch order: by role (k×k first), then label — so the main branch is first.
    let mut order: Vec<(&String, &Found)> = found.iter().collect();
    order.sort_by_key(|(label, f)| (role_rank(layout.branches[f.spec].role), natural_key(label)));
    for (label, f) in order {
        let spec = &layout.branches[f.spec];
        let conv = match f.slots.get(&Slot::ConvWeight) {
            Some(weight) => Some(ConvTensors {
                weight: weight.clone(),
                bias: f.slots.get(&Slot::ConvBias).cloned(),
            }),
            None if spec.role != Role::Identity => {
                return Err(BlockError::new(
                    prefix,
                    format!(
                        "branch `{label}` has {} but no conv weight `{}`",
                        describe_slots(f),
                        join(&format!(
                            "{label}.{}.weight",
                            spec.conv.as_deref().unwrap_or("")
                        ))
                    ),
                ));
            }
            None => None,
        };
        let bn_slots = [Slot::BnWeight, Slot::BnBias, Slot::BnMean, Slot::BnVar];
        let present: Vec<_> = bn_slots
            .iter()
            .filter(|s| f.slots.contains_key(s))
            .collect();
        let bn = if present.is_empty() {
            if spec.conv.is_some() && spec.bn.is_some() {
                // The layout puts a BN after this conv; without it the branch would be fused
                // as a bare conv, silently wrong.
                let bn_path = join(&format!("{label}.{}", spec.bn.as_deref().unwrap_or("")));
                return Err(BlockError::new(
                    prefix,
                    format!(
                        "branch `{label}` has {} but no BN: expected `{bn_path}.weight`, `.bias`, `.running_mean` and `.running_var`",
                        describe_slots(f)
                    ),
                ));
            }
            None
        } else if present.len() < bn_slots.len() {
            let missing: Vec<&str> = bn_slots
                .iter()
                .filter(|s| !f.slots.contains_key(s))
                .map(|s| match s {
                    Slot::BnWeight => "weight",
                    Slot::BnBias => "bias",
                    Slot::BnMean => "running_mean",
                    _ => "running_var",
                })
                .collect();
            return Err(BlockError::new(
                prefix,
                format!(
                    "branch `{label}`: its BN is missing {} (found {})",
                    missing.join(", "),
                    describe_slots(f)
                ),
            ));
        } else {
            Some(BnTensors {
                weight: f.slots[&Slot::BnWeight].clone(),
                bias: f.slots[&Slot::BnBias].clone(),
                running_mean: f.slots[&Slot::BnMean].clone(),
                running_var: f.slots[&Slot::BnVar].clone(),
            })
        };
        if spec.role == Role::Identity && bn.is_none() {
            return Err(BlockError::new(
                prefix,
                format!("identity branch `{label}` has no BN tensors"),
            ));
        }
        branches.push(Branch {
            label: label.clone(),
            role: spec.role,
            conv,
            bn,
            num_batches_tracked: f.slots.get(&Slot::BnCount).cloned(),
        });
    }
    Block::new(
        ckpt,
        prefix,
        branches,
        join(&layout.deploy.weight),
        join(&layout.deploy.bias),
    )
}

fn describe_slots(f: &Found) -> String {
    let names: Vec<&str> = f.slots.values().map(String::as_str).collect();
    names.join(", ")
}

fn role_rank(role: Role) -> u8 {
    match role {
        Role::Kxk => 0,
        Role::Scale => 1,
        Role::Identity => 2,
    }
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
        assert_eq!(layouts.len(), 8);
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
