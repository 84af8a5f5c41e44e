//! `lint`: the gate after `torch.onnx.export` — does this graph still hold branch sets that one
//! conv would compute exactly? Each is named by its nodes, with what merging it would save.

use std::path::Path;

use super::{Settings, Train};
use crate::Error;
use crate::block::Op;
use crate::checkpoint::Checkpoint;
use crate::report::Tool;
pub use crate::report::lint::{Lint, Unmerged};

/// Lints the ONNX graph at `path`, writing the JSON report to `report` if given (atomically,
/// never over the graph).
pub fn lint_file(path: &Path, report: Option<&Path>, settings: &Settings) -> Result<Lint, Error> {
    if let Some(target) = report {
        super::output::check_target(target, "report path", &[path])?;
    }
    let found = lint(path, settings)?;
    if let Some(target) = report {
        let file = super::output::stage_json(&found, target)?;
        super::output::commit(vec![file])?;
    }
    Ok(found)
}

/// Lints the ONNX graph at `path`.
pub fn lint(path: &Path, settings: &Settings) -> Result<Lint, Error> {
    let train = Train::open(path, settings)?;
    let Some((sets, names)) = &train.graph else {
        return Err(Error::Usage(format!(
            "{}: lint reads ONNX graphs; this is a checkpoint (convert it, or `inspect` it)",
            path.display()
        )));
    };
    let node_name = |i: usize| names.get(i).map_or(format!("#{i}"), String::clone);
    let mut unmerged = Vec::new();
    let mut removed = 0;
    for (block, set) in train.detection.blocks.iter().zip(sets) {
        let (params, macs) = saved(&train.ckpt, block);
        removed += set.nodes.len().saturating_sub(1);
        unmerged.push(Unmerged {
            name: block.name.clone(),
            nodes: set.nodes.iter().map(|&i| node_name(i)).collect(),
            ops: block.described.clone(),
            parameters_saved: params,
            macs_per_position_saved: macs,
        });
    }
    Ok(Lint {
        tool: Tool::default(),
        input: path.display().to_string(),
        parameters_saved: unmerged.iter().map(|u| u.parameters_saved).sum(),
        macs_per_position_saved: unmerged.iter().map(|u| u.macs_per_position_saved).sum(),
        unmerged,
        skipped: train.detection.skipped.clone(),
        nodes: names.len(),
        nodes_after_merge: names.len() - removed,
    })
}

/// Parameters and multiply-adds per output position a block's branches have beyond its one
/// fused conv.
fn saved(ckpt: &Checkpoint, block: &crate::block::Block) -> (usize, usize) {
    let mut params = 0;
    let mut macs = 0;
    for branch in &block.branches {
        for op in &branch.ops {
            let numel: usize = op
                .tensor_names()
                .iter()
                .filter_map(|t| ckpt.get(t))
                .map(|t| t.numel())
                .sum();
            params += numel;
            if let Op::Conv { weight, .. } | Op::ThenConv { weight } = op {
                macs += ckpt.get(weight).map_or(0, |t| t.numel());
            }
        }
    }
    let fused_weights = block.out_channels * block.row_len();
    let fused = fused_weights + block.out_channels;
    (
        params.saturating_sub(fused),
        macs.saturating_sub(fused_weights),
    )
}
