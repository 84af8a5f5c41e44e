//! The checkpoint doctor: what makes a deploy file wrong although the fusion is right —
//! BatchNorms still at their initial statistics (eval mode or calibration forgotten), and a
//! file that mixes fused and unfused forms of one layout's blocks.

use std::collections::BTreeSet;

use super::{Detection, Layout, LayoutError};
use crate::block::{Block, Op};
use crate::checkpoint::Checkpoint;

/// The BNs of `blocks` whose running statistics are exactly what `nn.BatchNorm2d()` starts
/// with (every mean 0, every variance 1): never seen data, so the fold would be wrong.
pub(super) fn initial_bns(ckpt: &Checkpoint, blocks: &[Block]) -> (Vec<String>, usize) {
    let mut total = 0;
    let mut initial = Vec::new();
    let bns = blocks
        .iter()
        .flat_map(|b| b.branches.iter().flat_map(|br| &br.ops).chain(&b.post));
    for op in bns {
        let (Op::Bn(bn) | Op::InputBn(bn)) = op else {
            continue;
        };
        total += 1;
        let read = |name: &str| {
            let t = ckpt.get(name)?;
            ckpt.read_f64(t, 0..t.shape.iter().product()).ok().flatten()
        };
        let (Some(mean), Some(var)) = (read(&bn.running_mean), read(&bn.running_var)) else {
            continue;
        };
        if mean.iter().all(|&m| m == 0.0) && var.iter().all(|&v| v == 1.0) {
            let module = bn.running_mean.trim_end_matches(".running_mean");
            initial.push(module.to_string());
        }
    }
    (initial, total)
}

/// Refuses BNs at their initial statistics, naming them.
pub(super) fn refuse_initial_bns(ckpt: &Checkpoint, d: &Detection) -> Result<(), LayoutError> {
    let (initial, total) = initial_bns(ckpt, &d.blocks);
    if initial.is_empty() {
        return Ok(());
    }
    Err(LayoutError::InitialStatistics {
        count: initial.len(),
        total,
        names: initial.join(", "),
    })
}

/// Prefixes of blocks already in deploy form (a tensor `<prefix>.<deploy weight>` of one of
/// the layout's kinds that no block found consumes or writes). Layouts with generic names
/// (ultralytics' `conv.weight` is every Conv's) are not judged.
pub(super) fn fused_prefixes(ckpt: &Checkpoint, layout: &Layout, blocks: &[Block]) -> Vec<String> {
    if layout.generic_names || layout.fallback || layout.fold {
        return Vec::new();
    }
    let known: BTreeSet<&str> = blocks
        .iter()
        .flat_map(|b| b.consumed.iter().chain([&b.deploy_weight]))
        .map(String::as_str)
        .collect();
    let mut fused = BTreeSet::new();
    for kind in layout.all_kinds() {
        let suffix = format!(".{}", kind.deploy.weight);
        if !kind.deploy.weight.contains('.') {
            continue;
        }
        for t in ckpt.tensors() {
            if let Some(prefix) = t.name.strip_suffix(&suffix)
                && !known.contains(t.name.as_str())
            {
                fused.insert(prefix.to_string());
            }
        }
    }
    fused.into_iter().collect()
}

/// The error for a file whose blocks of `d`'s layout are partly fused already, listing both
/// kinds; `both` is a block holding its branches and its deploy tensor.
pub(super) fn mixed_forms(
    ckpt: &Checkpoint,
    d: &Detection,
    both: Option<&str>,
) -> Option<LayoutError> {
    let fused = fused_prefixes(ckpt, &d.layout, &d.blocks);
    // A block in both forms alone is a taken deploy name, said as such.
    if fused.is_empty() {
        return None;
    }
    let list = |v: Vec<&str>| {
        let n = v.len();
        let mut s: Vec<&str> = v.into_iter().take(6).collect();
        if n > 6 {
            s.push("…");
        }
        format!("{n} ({})", s.join(", "))
    };
    let unfused: Vec<&str> = d.blocks.iter().map(|b| b.name.as_str()).collect();
    let both = both.map_or(String::new(), |b| {
        format!("; block `{b}` holds both its branches and its deploy conv")
    });
    Some(LayoutError::MixedForms {
        layout: d.layout.name.clone(),
        forms: format!(
            "fused {}, unfused {}{both}",
            list(fused.iter().map(String::as_str).collect()),
            list(unfused)
        ),
    })
}
