//! `inspect`: what a conversion would find and write, without writing anything.

use std::path::Path;

use super::{Settings, Train, layout_info, skipped, warnings};
use crate::Error;
use rayon::prelude::*;
use safetensors::Dtype;

use crate::block::Block;
use crate::checkpoint::Checkpoint;
use crate::fuse::block::fuse_block_rows;
use crate::int8::{ChannelStats, Int8Report, TensorStats, figures};
use crate::report::OutputSource;
pub use crate::report::{InspectBlock, Inspection, OutputTensor};
use crate::write::plan::{Plan, Source};

/// Describes what `convert` would do with `input`, without writing anything.
pub fn inspect(input: &Path, settings: &Settings) -> Result<Inspection, Error> {
    let train = Train::open(input, settings)?;
    let (ckpt, detection, eps) = (&train.ckpt, &train.detection, train.eps.clone());
    let plan = Plan::new(ckpt, detection, settings.cast);
    let consumed = detection.consumed();
    let int8 = detection
        .blocks
        .iter()
        .map(|b| match settings.check.int8 {
            true => fused_figures(ckpt, b, settings.cast.unwrap_or(b.dtype)),
            false => Ok(None),
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Inspection {
        input: input.display().to_string(),
        layout: layout_info(&train),
        bn_eps: eps,
        blocks: detection
            .blocks
            .iter()
            .zip(int8)
            .map(|(b, int8)| InspectBlock {
                block: b.into(),
                tensors: b.consumed.clone(),
                int8,
            })
            .collect(),
        skipped: skipped(detection),
        passthrough: ckpt
            .tensors()
            .iter()
            .filter(|t| !consumed.contains(t.name.as_str()))
            .map(|t| t.name.clone())
            .collect(),
        output: plan
            .entries
            .iter()
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
            .collect(),
        warnings: warnings(ckpt),
    })
}

/// The INT8 figures of `block` as `convert` would write it (fused with BN ε `eps`, rounded to
/// `dtype`), computed without writing anything. Both passes fuse the block through the one
/// fusion routine, a chunk of rows at a time (so the block's weights are read twice); a block
/// whose fused values overflow `dtype` has no figures (convert would refuse it).
fn fused_figures(
    ckpt: &Checkpoint,
    block: &Block,
    dtype: Dtype,
) -> Result<Option<Int8Report>, Error> {
    let chunks = block.row_chunks(1 << 16);
    let row_len = block.row_len();
    let fused = |rows: &std::ops::Range<usize>| match fuse_block_rows(
        ckpt,
        block,
        rows.clone(),
        dtype,
        None,
    ) {
        Ok(f) => Ok(Some(f.weight)),
        Err(Error::Overflow { .. }) => Ok(None),
        Err(e) => Err(e),
    };
    let channel: Option<Vec<ChannelStats>> = chunks
        .par_iter()
        .map(|rows| {
            Ok(fused(rows)?.map(|w| {
                let mut c = ChannelStats::new(row_len, rows.start);
                c.push_bytes(dtype, &w);
                c
            }))
        })
        .collect::<Result<Vec<_>, Error>>()?
        .into_iter()
        .collect();
    let Some(channel) = channel.and_then(|c| c.into_iter().reduce(ChannelStats::merge)) else {
        return Ok(None);
    };
    let tensor: Option<Vec<TensorStats>> = chunks
        .par_iter()
        .map(|rows| {
            Ok(fused(rows)?.map(|w| {
                let mut t = TensorStats::new(channel.max_abs(), row_len, rows.start);
                t.push_bytes(dtype, &w);
                t
            }))
        })
        .collect::<Result<Vec<_>, Error>>()?
        .into_iter()
        .collect();
    let tensor = tensor.and_then(|t| t.into_iter().reduce(TensorStats::merge));
    Ok(tensor.map(|t| figures(&channel, &t)))
}
