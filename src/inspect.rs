//! `inspect`: what a conversion would find and write, without writing anything.

use std::path::Path;

use serde::Serialize;

use crate::Error;
use crate::checkpoint::Checkpoint;
use crate::convert::{Settings, eps_info, find, layout_info};
use crate::deploy::{Plan, Source};
use crate::report::{BlockInfo, EpsInfo, LayoutInfo, Skipped};

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
    let ckpt = Checkpoint::open(input)?;
    let detection = find(&ckpt, settings)?;
    let plan = Plan::new(&ckpt, &detection, settings.dtype);
    let consumed = detection.consumed();
    let eps = eps_info(&detection, settings);
    let int8 = detection
        .blocks
        .iter()
        .map(|b| {
            let dtype = settings.dtype.unwrap_or(b.dtype);
            crate::int8::fused_figures(&ckpt, b, eps.value, dtype)
        })
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
        skipped: Skipped::all(&detection),
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
