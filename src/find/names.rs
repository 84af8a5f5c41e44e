//! Matching tensor names against a layout's patterns: every name split once, looked up by
//! its last segment (its leaf), matched from its end; matches grouped by block prefix and
//! branch label.

use std::collections::BTreeMap;

use super::schema::{BranchSpec, Kind, OpKind, OpSpec};
use crate::block::Block;
use crate::checkpoint::Checkpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Leaf {
    ConvWeight,
    ConvWeight2,
    ConvBias,
    BnWeight,
    BnBias,
    BnMean,
    BnVar,
    BnCount,
    Scale,
    /// One of OREPA's stored tensors, by its index in `OrepaTensors::LEAVES`.
    Orepa(usize),
}

pub(super) const BN_LEAVES: [(Leaf, &str); 5] = [
    (Leaf::BnWeight, "weight"),
    (Leaf::BnBias, "bias"),
    (Leaf::BnMean, "running_mean"),
    (Leaf::BnVar, "running_var"),
    (Leaf::BnCount, "num_batches_tracked"),
];

/// A tensor's place in a branch: (index of the op in the branch's chain, which tensor).
pub(super) type Slot = (usize, Leaf);

/// The tensors found for one branch of one candidate block.
#[derive(Debug, Default)]
pub(super) struct Found {
    pub(super) spec: usize,
    pub(super) slots: BTreeMap<Slot, String>,
}

pub(super) struct BlocksFound {
    pub(super) blocks: Vec<Block>,
    pub(super) skipped: Vec<crate::report::Skipped>,
}

pub(super) fn segments(s: &str) -> Vec<String> {
    s.split('.')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// Every tensor an op reads, as (leaf, name relative to the op's base).
pub(super) fn op_leaves(op: &OpSpec) -> Vec<(Leaf, String)> {
    let under = |base: &str, leaf: &str| {
        let base = base.trim_start_matches('/');
        if base.is_empty() {
            leaf.to_string()
        } else {
            format!("{base}.{leaf}")
        }
    };
    match &op.kind {
        OpKind::ThenConv(conv) => vec![(Leaf::ConvWeight2, under(conv, "weight"))],
        OpKind::ConvFc(conv) => vec![(Leaf::ConvWeight, under(conv, "weight"))],
        OpKind::Conv { name: conv, .. } => vec![
            (Leaf::ConvWeight, under(conv, "weight")),
            (Leaf::ConvBias, under(conv, "bias")),
        ],
        OpKind::Bn(bn) | OpKind::BnIn(bn) | OpKind::GroupBn(bn) => BN_LEAVES
            .iter()
            .map(|(l, leaf)| (*l, under(bn, leaf)))
            .collect(),
        OpKind::Scale(scale) | OpKind::Scalar(scale) => {
            vec![(Leaf::Scale, scale.trim_start_matches('/').to_string())]
        }
        OpKind::Identity | OpKind::AvgPool(_) | OpKind::ThenAvgPool(_) => Vec::new(),
        OpKind::Affine(name) => vec![
            (Leaf::BnWeight, under(name, "weight")),
            (Leaf::BnBias, under(name, "bias")),
        ],
        OpKind::Orepa(name) => crate::block::OrepaTensors::LEAVES
            .iter()
            .enumerate()
            .map(|(j, leaf)| (Leaf::Orepa(j), under(name, leaf)))
            .collect(),
    }
}

/// Whether an op's names are relative to the block rather than the branch.
pub(super) fn block_relative(op: &OpSpec) -> bool {
    op.name().is_some_and(|n| n.starts_with('/'))
}

/// Expands a branch spec into (slot, pattern segments) pairs, for its branch-relative ops.
pub(super) fn slot_patterns(spec: &BranchSpec) -> Vec<(Slot, Vec<String>)> {
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
pub(super) fn match_suffix(
    name: &[&str],
    pattern: &[String],
    n_path: usize,
) -> Option<(String, String)> {
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
pub(super) type Names<'a> = Vec<(&'a str, Vec<&'a str>)>;

pub(super) fn split_names(ckpt: &Checkpoint) -> Names<'_> {
    ckpt.tensors()
        .iter()
        .map(|t| (t.name.as_str(), t.name.split('.').collect()))
        .collect()
}

/// Candidate blocks of `kind`: prefix → branch label → tensors found.
pub(super) fn candidates(names: &Names, kind: &Kind) -> BTreeMap<String, BTreeMap<String, Found>> {
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
