//! `lint`: the gate after `torch.onnx.export` — does this graph still hold branch sets that one
//! conv would compute exactly? Each is named by its nodes, with what merging it would save.
//! Also where a graph's blocks get their node names ([`graph_nodes`]), for every report.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use super::output::{check_ci, check_target, commit, stage_appended, stage_json, stage_text};
use super::{Settings, Train};
use crate::Error;
use crate::block::Block;
use crate::checkpoint::Checkpoint;
use crate::find::graph::BranchSet;
use crate::onnx::{GraphEdit, OnnxModel};
use crate::report::junit::lint_junit;
pub use crate::report::lint::{Lint, Unmerged};
use crate::report::markdown::lint_summary;
use crate::report::{GraphNodes, Tool};

/// Lints the ONNX graph at `path`, with the JSON report at `report` and the CI files
/// `settings.ci` asks for (JUnit, job summary): every path checked before the run, every file
/// finished before any is put in place (atomically, never over the graph).
pub fn lint_file(path: &Path, report: Option<&Path>, settings: &Settings) -> Result<Lint, Error> {
    let mut inputs = vec![path];
    if let Some(target) = report {
        check_target(target, "the report path", &inputs)?;
        inputs.push(target);
    }
    check_ci(&settings.ci, &inputs)?;
    let found = lint(path, settings)?;
    let mut files = Vec::new();
    if let Some(target) = report {
        files.push(stage_json(&found, target)?);
    }
    if let Some(junit) = &settings.ci.junit {
        let xml = lint_junit(&found, &settings.ci.started.info());
        files.push(stage_text(junit, "the JUnit file", &xml)?);
    }
    if let Some(summary) = &settings.ci.job_summary {
        files.push(stage_appended(
            summary,
            "the job summary",
            &lint_summary(&found),
        )?);
    }
    commit(files)?;
    Ok(found)
}

/// Lints the ONNX graph at `path`.
pub fn lint(path: &Path, settings: &Settings) -> Result<Lint, Error> {
    let train = Train::open(path, settings)?;
    let (Some((sets, names)), Some(model)) = (&train.graph, train.ckpt.onnx()) else {
        return Err(Error::Usage(format!(
            "{}: lint reads ONNX graphs; this is a checkpoint (convert it, or `inspect` it)",
            path.display()
        )));
    };
    let shapes = crate::onnx::shapes::static_shapes(model);
    let mut unmerged = Vec::new();
    let blocks = train.detection.blocks.iter().zip(sets);
    for ((block, set), nodes) in blocks.zip(graph_nodes(&train)) {
        let (params, macs) = saved(&train.ckpt, block);
        let positions = shapes
            .get(&set.output)
            .and_then(|dims| crate::onnx::shapes::numel(dims))
            .map(|n| (n / block.out_channels.max(1)) as u64);
        let macs_saved = positions.and_then(|p| p.checked_mul(macs as u64));
        unmerged.push(Unmerged {
            name: block.name.clone(),
            graph_nodes: nodes,
            ops: block.described.clone(),
            parameters_saved: params,
            macs_per_position_saved: macs,
            output_positions: positions,
            macs_saved,
            flops_saved: macs_saved.and_then(|m| m.checked_mul(2)),
        });
    }
    Ok(Lint {
        tool: Tool::default(),
        input: path.display().to_string(),
        input_shapes: input_shapes(model, &shapes),
        parameters_saved: unmerged.iter().map(|u| u.parameters_saved).sum(),
        macs_per_position_saved: unmerged.iter().map(|u| u.macs_per_position_saved).sum(),
        flops_saved: (unmerged.iter()).try_fold(0u64, |sum, u| sum.checked_add(u.flops_saved?)),
        unmerged,
        skipped: train.detection.skipped.clone(),
        nodes: names.len(),
        nodes_after_merge: nodes_after_merge(&train)?.unwrap_or(names.len()),
    })
}

/// Each block of a graph by its node names: the train nodes it merges and the node `convert`
/// writes in their place (the names the graph writer's edit gives them); empty for a
/// checkpoint.
pub(super) fn graph_nodes(train: &Train) -> Vec<GraphNodes> {
    let Some((sets, names)) = &train.graph else {
        return Vec::new();
    };
    let edit = merge_edit(train, sets);
    let name = |i: usize| names.get(i).map_or(format!("#{i}"), String::clone);
    // A set's first new node (a Linear kept as `MatMul` + `Add` has two) goes where its
    // first node was.
    let first = |set: &BranchSet| {
        let at = set.nodes.first().copied().unwrap_or_default();
        edit.insert.iter().find(|n| n.at == at)
    };
    (sets.iter())
        .map(|set| GraphNodes {
            nodes: set.nodes.iter().map(|&i| name(i)).collect(),
            merged_node: first(set).map(|n| n.name.clone()).unwrap_or_default(),
            merged_op: first(set).map(|n| n.op_type.clone()).unwrap_or_default(),
        })
        .collect()
}

/// The edit `convert` makes to a graph: every set replaced by its node(s).
fn merge_edit(train: &Train, sets: &[BranchSet]) -> GraphEdit {
    super::graph::edit(
        &train.detection.blocks,
        sets,
        super::graph::taken_names(train),
    )
}

/// How many nodes the deploy graph of `train` would have (every set merged, the constants only
/// they read dropped, as the graph writer does); `None` for a checkpoint.
pub(super) fn nodes_after_merge(train: &Train) -> Result<Option<usize>, Error> {
    let (Some((sets, _)), Some(model)) = (&train.graph, train.ckpt.onnx()) else {
        return Ok(None);
    };
    let summary = model.plan_summary(&merge_edit(train, sets))?;
    Ok(Some(summary.nodes_after))
}

/// The graph's inputs (not its initializers) as `name:1x3x32x32`, a symbolic dim by its name.
fn input_shapes(model: &OnnxModel, shapes: &HashMap<String, Vec<usize>>) -> Vec<String> {
    let graph = model.graph();
    let initializers: BTreeSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let real = (graph.input.iter()).filter(|v| !initializers.contains(v.name()));
    real.map(|v| {
        let dims: Vec<String> = match shapes.get(v.name()) {
            Some(dims) => dims.iter().map(usize::to_string).collect(),
            None => (v.type_.tensor_type.shape.dim.iter())
                .map(|d| match (&d.dim_value, &d.dim_param) {
                    (Some(n), _) => n.to_string(),
                    (None, Some(p)) if !p.is_empty() => p.clone(),
                    _ => "?".into(),
                })
                .collect(),
        };
        format!("{}:{}", v.name(), dims.join("x"))
    })
    .collect()
}

/// Parameters and multiply-adds per output position a block's nodes have beyond its one
/// fused conv: every tensor the block consumes (branches and the ops after the sum), and the
/// weights of its convs (a conv weight's elements are its multiply-adds per output position).
fn saved(ckpt: &Checkpoint, block: &Block) -> (usize, usize) {
    let numel = |t: &str| ckpt.get(t).map_or(0, |t| t.numel());
    // A tensor several ops read (FastViT's layer scale, in every branch) is counted once.
    let consumed: BTreeSet<&str> = block.consumed.iter().map(String::as_str).collect();
    let params: usize = consumed.into_iter().map(numel).sum();
    let macs: usize = (block.branches.iter())
        .flat_map(|b| &b.ops)
        .map(|op| match op {
            crate::block::Op::Conv { weight, .. } | crate::block::Op::ThenConv { weight } => {
                numel(weight)
            }
            _ => 0,
        })
        .sum();
    let fused_weights = block.out_channels * block.row_len();
    let fused = fused_weights + block.out_channels;
    (
        params.saturating_sub(fused),
        macs.saturating_sub(fused_weights),
    )
}
