//! `--fold-bn`: the Conv→BN pairs a framework's own fuse folds outside its multi-branch blocks
//! (ultralytics' `Conv`, `DWConv`, `Conv2`; docTR's Sequential siblings), found by a fold
//! layout (`"fold": true`) as one more kind of block — one branch, conv then BN — beside the
//! blocks of the layout detected. A pair a block already consumes stays that block's.

use std::collections::BTreeSet;

use super::assemble::{Ctx, Finding, find_blocks};
use super::names::Names;
use super::{Detection, FindRules, Layout, LayoutError, settle};
use crate::checkpoint::Checkpoint;

/// `found` (the detected layout's blocks, if any layout found some) with the folds of the
/// fold layout that goes with it: the one its `fold_with` names, else the one fold layout that
/// finds pairs.
pub(super) fn add_folds(
    ckpt: &Checkpoint,
    names: &Names,
    folds: &[Layout],
    found: Option<Detection>,
    rules: &FindRules,
) -> Result<Detection, LayoutError> {
    let wanted = found.as_ref().and_then(|d| d.layout.fold_with.clone());
    let mut hits = Vec::new();
    for layout in folds {
        if wanted.as_ref().is_some_and(|w| w != &layout.name) {
            continue;
        }
        let ctx = Ctx {
            eps: layout.bn_eps(rules.bn_eps).0,
            identity: &rules.identity,
        };
        let pairs = find_blocks(ckpt, names, layout, &ctx)?;
        if !pairs.blocks.is_empty() {
            hits.push((layout, pairs));
        }
    }
    let mut hits = settle(hits);
    if hits.len() > 1 {
        let found: Vec<String> = hits
            .iter()
            .map(|(l, f)| format!("{} ({} folds)", l.name, f.blocks.len()))
            .collect();
        return Err(LayoutError::Mixed {
            found: found.join(", "),
        });
    }
    let Some((layout, pairs)) = hits.pop() else {
        return found.ok_or_else(|| LayoutError::NoBlocks {
            hint: "; --fold-bn found no Conv→BN pair either".to_string(),
        });
    };
    Ok(merge(found, layout, pairs, rules))
}

/// The detected blocks and the folds that take none of their tensors.
fn merge(
    found: Option<Detection>,
    layout: &Layout,
    pairs: Finding,
    rules: &FindRules,
) -> Detection {
    let Some(mut detection) = found else {
        return Detection {
            layout: layout.clone(),
            blocks: pairs.blocks,
            skipped: Vec::new(),
            bn_eps: layout.eps_info(rules.bn_eps),
        };
    };
    let taken: BTreeSet<String> = detection
        .blocks
        .iter()
        .flat_map(|b| b.consumed.iter().cloned())
        .collect();
    let free = pairs
        .blocks
        .into_iter()
        .filter(|b| !b.consumed.iter().any(|t| taken.contains(t)));
    detection.blocks.extend(free);
    detection
}
