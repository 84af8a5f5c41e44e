//! `inspect`: what a conversion would find and write, without writing anything.

use std::path::Path;

use super::{Settings, Train, layout_info, skipped, warnings};
use crate::Error;
use rayon::prelude::*;
use safetensors::Dtype;

use crate::block::Block;
use crate::checkpoint::Checkpoint;
use crate::conv::Input;
use crate::deviation::Deviation;
use crate::fuse::block::{fuse_block_rows, probe_input};
use crate::int8::{ChannelStats, Int8Report, TensorStats, figures};
use crate::report::{BlockInfo, OutputSource};
pub use crate::report::{InspectBlock, Inspection, OutputTensor};
use crate::write::plan::{Plan, Source};

/// Describes what `convert` would do with `input`, without writing anything. For an ONNX
/// graph, each block is named by the graph's nodes (those it merges, the node that would replace
/// them). With `settings.check.int8` every block is fused (twice, chunk by chunk) for its INT8
/// figures and its probe deviation; without it nothing but the file's header (or graph) and
/// the small constants are read: no weight, no whole-graph run.
pub fn inspect(input: &Path, settings: &Settings) -> Result<Inspection, Error> {
    let train = Train::open(input, settings)?;
    let (ckpt, detection, eps) = (&train.ckpt, &train.detection, train.eps.clone());
    let plan = Plan::new(ckpt, detection, settings.cast);
    let consumed = detection.consumed();
    let fused = (detection.blocks.iter().enumerate())
        .map(|(i, b)| match settings.check.int8 {
            true => fused_figures(ckpt, b, settings.cast.unwrap_or(b.dtype), (i, settings)),
            false => Ok(None),
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mut nodes = super::lint::graph_nodes(&train).into_iter();
    let blocks = (detection.blocks.iter().zip(fused))
        .map(|(b, fused)| {
            let (int8, dev) = fused.map_or((None, None), |(q, d)| (q, Some(d)));
            let mut block = BlockInfo::from(b);
            block.graph_nodes = nodes.next();
            InspectBlock {
                block,
                tensors: b.consumed.clone(),
                int8,
                max_abs_deviation: dev.map(|d| d.max_abs),
                max_rel_deviation: dev.map(|d| d.max_rel),
            }
        })
        .collect();
    let nodes_in = train.graph.as_ref().map(|(_, names)| names.len());
    Ok(Inspection {
        input: input.display().to_string(),
        layout: layout_info(&train),
        bn_eps: eps,
        blocks,
        skipped: skipped(detection),
        passthrough: ckpt
            .tensors()
            .iter()
            .filter(|t| !consumed.contains(t.name.as_str()))
            .map(|t| t.name.clone())
            .collect(),
        output: output_tensors(ckpt, &plan),
        warnings: warnings(ckpt),
        nodes_in,
        nodes_out: super::lint::nodes_after_merge(&train)?,
    })
}

/// The tensors `plan` would write, and where each one's values come from.
fn output_tensors(ckpt: &Checkpoint, plan: &Plan) -> Vec<OutputTensor> {
    (plan.entries.iter())
        .map(|e| OutputTensor {
            name: e.name.clone(),
            dtype: format!("{:?}", e.dtype),
            shape: e.shape.clone(),
            source: match e.source {
                Source::Copy(i) if ckpt.tensors()[i].dtype == e.dtype => OutputSource::Copy,
                Source::Copy(_) => OutputSource::Cast,
                _ => OutputSource::Fused,
            },
        })
        .collect()
}

/// The INT8 figures and the probe deviation of block `b` as `convert` would write it (fused
/// with each BN's ε, rounded to `dtype`; the probe `convert` measures without `--verify`, with
/// `settings`' seed), computed without writing anything. Both passes fuse the block through
/// the one fusion routine, a chunk of rows at a time (so the block's weights are read twice);
/// a block whose fused values overflow `dtype` has none (convert would refuse it).
fn fused_figures(
    ckpt: &Checkpoint,
    block: &Block,
    dtype: Dtype,
    (b, settings): (usize, &Settings),
) -> Result<Option<(Option<Int8Report>, Deviation)>, Error> {
    let chunks = block.row_chunks(1 << 16);
    let row_len = block.row_len();
    let probe = probe_input(block, b, settings.check.seed);
    let fused = |rows: &std::ops::Range<usize>, probe: Option<&Input>| match fuse_block_rows(
        ckpt,
        block,
        rows.clone(),
        dtype,
        probe,
    ) {
        Ok(f) => Ok(Some(f)),
        Err(Error::Overflow { .. }) => Ok(None),
        Err(e) => Err(e),
    };
    let first: Option<Vec<(ChannelStats, Deviation)>> = chunks
        .par_iter()
        .map(|rows| {
            Ok(fused(rows, Some(&probe))?.map(|f| {
                let mut c = ChannelStats::new(row_len, rows.start);
                c.push_bytes(dtype, &f.weight);
                (c, f.deviation)
            }))
        })
        .collect::<Result<Vec<_>, Error>>()?
        .into_iter()
        .collect();
    let Some((channel, dev)) = first
        .and_then(|c| (c.into_iter()).reduce(|(c1, d1), (c2, d2)| (c1.merge(c2), d1.merge(d2))))
    else {
        return Ok(None);
    };
    let tensor: Option<Vec<TensorStats>> = chunks
        .par_iter()
        .map(|rows| {
            Ok(fused(rows, None)?.map(|f| {
                let mut t = TensorStats::new(channel.max_abs(), row_len, rows.start);
                t.push_bytes(dtype, &f.weight);
                t
            }))
        })
        .collect::<Result<Vec<_>, Error>>()?
        .into_iter()
        .collect();
    let tensor = tensor.and_then(|t| t.into_iter().reduce(TensorStats::merge));
    Ok(Some((tensor.map(|t| figures(&channel, &t)), dev)))
}
