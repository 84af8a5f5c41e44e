//! `inspect`: what a conversion would find and write, without writing anything.

use std::path::Path;

use serde::Serialize;

use super::{Settings, Train, layout_info, skipped};
use crate::Error;
use rayon::prelude::*;
use safetensors::Dtype;

use crate::block::Block;
use crate::checkpoint::Checkpoint;
use crate::fuse::block::fuse_block_rows;
use crate::int8::{ChannelStats, Int8Report, TensorStats, figures};
use crate::report::{BlockInfo, EpsInfo, LayoutInfo, Skipped};
use crate::write::plan::{Plan, Source};

/// What `inspect` shows: the blocks found and the deploy file that would be written.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The file.
    pub input: String,
    /// The layout.
    pub layout: LayoutInfo,
    /// The BN ε that would be used.
    pub bn_eps: EpsInfo,
    /// The blocks.
    pub blocks: Vec<InspectBlock>,
    /// Candidates left alone.
    pub skipped: Vec<Skipped>,
    /// Tensors that pass through unchanged.
    pub passthrough: Vec<String>,
    /// The deploy file's tensors: name, dtype, shape.
    pub output: Vec<OutputTensor>,
}

/// A block as `inspect` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InspectBlock {
    /// Name and shape.
    #[serde(flatten)]
    pub block: BlockInfo,
    /// Tensors it consumes.
    pub tensors: Vec<String>,
    /// INT8 readiness of the fused weight `convert` would write (null if it would not fit the
    /// output dtype). Fusing for these reads the block's weights twice.
    pub int8: Option<crate::int8::Int8Report>,
}

/// A tensor of the would-be deploy file.
#[derive(Debug, Clone, Serialize)]
pub struct OutputTensor {
    /// Name.
    pub name: String,
    /// dtype.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// `copy`, `cast` or `fused`.
    pub source: String,
}

/// Describes what `convert` would do with `input`, without writing anything.
pub fn inspect(input: &Path, settings: &Settings) -> Result<Inspection, Error> {
    let Train {
        ckpt,
        detection,
        eps,
    } = Train::open(input, settings)?;
    let plan = Plan::new(&ckpt, &detection, settings.cast);
    let consumed = detection.consumed();
    let int8 = detection
        .blocks
        .iter()
        .map(|b| fused_figures(&ckpt, b, settings.cast.unwrap_or(b.dtype)))
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Inspection {
        input: input.display().to_string(),
        layout: layout_info(&detection),
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
        skipped: skipped(&detection),
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
                    Source::Copy(i) if ckpt.tensors()[i].dtype == e.dtype => "copy",
                    Source::Copy(_) => "cast",
                    _ => "fused",
                }
                .into(),
            })
            .collect(),
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
