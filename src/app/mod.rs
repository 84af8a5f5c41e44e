//! The use cases — [`convert()`], [`verify_files()`], [`inspect()`] — each strings the stages
//! together: read the checkpoint, find the blocks, fuse and write (or check), report. What they
//! share is here: the options, finding the blocks, and building the report.

mod convert;
pub mod export;
mod inspect;
mod output;
mod verify;

use std::path::PathBuf;

use safetensors::Dtype;

pub use convert::{ReportTo, convert};
pub use inspect::{InspectBlock, Inspection, OutputTensor, inspect};
pub use output::{default_report_path, write_report};
pub use verify::verify_files;

use crate::Error;
use crate::block::Block;
use crate::checkpoint::{Checkpoint, ReadOptions};
use crate::deviation::Deviation;
use crate::find::{Detection, Layout};
use crate::int8::Int8Report;
use crate::progress::Hooks;
use crate::report::{
    BlockReport, EpsInfo, LayoutInfo, Probe, Report, Skipped, Summary, Tool, VerifyReport,
};
pub use crate::verify::{CheckOptions, Checked, check_deploy};

/// How blocks are found.
#[derive(Debug, Clone, Default)]
pub struct FindOptions {
    /// Force this layout instead of detecting one.
    pub layout: Option<String>,
    /// Read layouts from this JSON file instead of the built-in table.
    pub layout_file: Option<PathBuf>,
    /// BN ε instead of the layout's default.
    pub bn_eps: Option<f64>,
}

/// Everything the user can set.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// How blocks are found.
    pub find: FindOptions,
    /// How fused and unfused blocks are compared.
    pub check: CheckOptions,
    /// Cast every floating-point tensor of the output to this dtype.
    pub cast: Option<Dtype>,
    /// How checkpoints are read (which dict of a PyTorch file, its `module.` prefix).
    pub read: ReadOptions,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The report.
    pub report: Report,
    /// Where the report was written, if it was.
    pub report_path: Option<PathBuf>,
}

impl Outcome {
    /// False when a verification ran and found a deviation over tolerance.
    pub fn passed(&self) -> bool {
        self.report.verify.as_ref().is_none_or(|v| v.passed)
    }
}

/// A train checkpoint and the blocks found in it: what every use case starts from.
struct Train {
    ckpt: Checkpoint,
    detection: Detection,
    eps: EpsInfo,
}

impl Train {
    /// Opens `path` and finds its blocks.
    fn open(path: &std::path::Path, settings: &Settings) -> Result<Train, Error> {
        let ckpt = Checkpoint::open_with(path, &settings.read)?;
        let detection = find(&ckpt, &settings.find)?;
        let eps = eps_info(&detection);
        Ok(Train {
            ckpt,
            detection,
            eps,
        })
    }

    /// Judges `deploy` against these blocks.
    fn check(
        &self,
        deploy: &Checkpoint,
        opts: &CheckOptions,
        hooks: Hooks,
    ) -> Result<Checked, Error> {
        let (train, found) = (&self.ckpt, &self.detection);
        check_deploy(train, deploy, found, opts, hooks.cancel)
    }

    /// One report entry per block, with its fused dtype, deviation and INT8 figures.
    fn block_reports(
        &self,
        dtype_of: impl Fn(&Block) -> String,
        devs: impl IntoIterator<Item = Deviation>,
        int8: Vec<Option<Int8Report>>,
    ) -> Vec<BlockReport> {
        let layout = &self.detection.layout.name;
        (self.detection.blocks.iter().zip(devs).zip(int8))
            .map(|((b, d), int8)| BlockReport {
                int8,
                ..BlockReport::new(b, layout, &dtype_of(b), d)
            })
            .collect()
    }
}

/// The blocks of `ckpt`, by the layouts `opts` selects.
fn find(ckpt: &Checkpoint, opts: &FindOptions) -> Result<Detection, Error> {
    let wrap = |error| Error::Layout {
        path: ckpt.path().to_path_buf(),
        error,
    };
    let (layouts, chosen_by) = match &opts.layout_file {
        Some(file) => (Layout::from_file(file).map_err(wrap)?, "--layout-file"),
        None if opts.layout.is_some() => (Layout::builtin().map_err(wrap)?, "--layout"),
        None => (Layout::builtin().map_err(wrap)?, "detected"),
    };
    Detection::find(
        ckpt,
        &layouts,
        opts.layout.as_deref(),
        chosen_by,
        opts.bn_eps,
    )
    .map_err(wrap)
}

fn eps_info(detection: &Detection) -> EpsInfo {
    detection.bn_eps.clone()
}

fn layout_info(d: &Detection) -> LayoutInfo {
    LayoutInfo {
        name: d.layout.name.clone(),
        description: d.layout.description.clone(),
        chosen_by: d.chosen_by.clone(),
    }
}

fn skipped(detection: &Detection) -> Vec<Skipped> {
    detection.skipped.clone()
}

/// What the written (or judged) file holds: tensors, parameters, bytes.
struct Written {
    tensors: usize,
    parameters: usize,
    bytes: u64,
}

/// The parts of a report that only the use case knows.
struct ReportParts {
    command: &'static str,
    output: PathBuf,
    eps: EpsInfo,
    probe: Probe,
    blocks: Vec<BlockReport>,
    verify: Option<VerifyReport>,
    written: Written,
}

fn build_report(ckpt: &Checkpoint, detection: &Detection, parts: ReportParts) -> Report {
    let consumed = detection.consumed();
    let tensors_in = ckpt.tensors().len();
    let mut summary = Summary {
        tensors_in,
        tensors_out: parts.written.tensors,
        tensors_passed_through: tensors_in - consumed.len(),
        tensors_dropped: consumed.len(),
        parameters_in: ckpt.tensors().iter().map(|t| t.numel()).sum(),
        parameters_out: parts.written.parameters,
        bytes_in: std::fs::metadata(ckpt.path()).map_or(0, |m| m.len()),
        bytes_out: parts.written.bytes,
        ..Summary::default()
    };
    summary.set_worst(&parts.blocks);
    Report {
        tool: Tool::default(),
        command: parts.command.into(),
        input: ckpt.path().display().to_string(),
        output: parts.output.display().to_string(),
        layout: layout_info(detection),
        bn_eps: parts.eps,
        probe: parts.probe,
        blocks: parts.blocks,
        skipped: skipped(detection),
        source: ckpt.source().cloned(),
        summary,
        verify: parts.verify,
    }
}

/// Puts a verification's findings in the block reports: the deviation where a block could be
/// run, and the INT8 output SQNR.
fn set_checked(blocks: &mut [BlockReport], checked: &Checked) {
    for ((report, dev), out) in blocks
        .iter_mut()
        .zip(&checked.deviations)
        .zip(&checked.int8_output)
    {
        if let Some(dev) = dev {
            report.max_abs_deviation = dev.max_abs;
            report.max_rel_deviation = dev.max_rel;
            report.max_abs_output = dev.max_abs_output;
        }
        if let (Some(int8), Some(out)) = (&mut report.int8, out) {
            int8.output_sqnr_db = Some(*out);
        }
    }
}

/// The probe record of a verification.
fn verify_probe(v: &VerifyReport) -> Probe {
    Probe {
        kind: "verify".into(),
        input_size: Some(v.input_size),
        batch: v.batch,
        seed: v.seed,
    }
}
