//! The use cases — [`convert()`], [`verify_files()`], [`inspect()`] — each strings the stages
//! together: read the checkpoint, find the blocks, fuse and write (or check), report. What they
//! share is here: the options, finding the blocks, and building the report.

mod convert;
mod graph;
mod inspect;
mod lint;
mod output;
mod verify;

use std::path::PathBuf;

use safetensors::Dtype;

pub use convert::{ReportTo, convert};
pub use inspect::{InspectBlock, Inspection, OutputTensor, inspect};
pub use lint::{Lint, Unmerged, lint, lint_file};
pub use output::{CiOutputs, RunStart, default_report_path, write_graph};
pub use verify::verify_files;

use crate::Error;
use crate::block::Block;
use crate::checkpoint::{Checkpoint, ReadOptions};
use crate::deviation::Deviation;
use crate::find::graph::blocks::graph_blocks;
use crate::find::graph::{BranchSet, find_branch_sets};
use crate::find::{Detection, FindRules, Layout};
use crate::int8::Int8Report;
use crate::progress::Hooks;
use crate::report::{
    BlockReport, ChosenBy, EpsInfo, Int8Gate, LayoutInfo, LowBlock, Probe, ProbeKind, Report,
    Skipped, Summary, Tool, VerifyReport, Warning,
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
    /// `--identity`: block prefix → whether its tensorless identity exists, over the rule.
    pub identity: std::collections::BTreeMap<String, bool>,
    /// `--fold-bn`: also fold the Conv→BN pairs outside the blocks.
    pub fold_bn: bool,
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
    /// `--int8-min-db`: a run fails (not [`Outcome::passed`]) if any fused block's
    /// per-channel INT8 SQNR is below this many dB (the deploy file is still written).
    pub int8_min_db: Option<f64>,
    /// The files CI systems read, written with the report.
    pub ci: CiOutputs,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The report.
    pub report: Report,
    /// Where the report was written, if it was.
    pub report_path: Option<PathBuf>,
    /// The INT8 gate, when [`Settings::int8_min_db`] set one.
    pub int8_gate: Option<Int8Gate>,
}

impl Outcome {
    /// The outcome of a run that made `report`, with the INT8 gate `settings` asks for.
    fn new(report: Report, report_path: Option<PathBuf>, settings: &Settings) -> Outcome {
        let int8_gate = settings.int8_min_db.map(|min_db| Int8Gate {
            min_db,
            low: crate::int8::below(
                (report.blocks.iter()).map(|b| (b.block.name.as_str(), b.int8.as_ref())),
                min_db,
            )
            .into_iter()
            .map(|(name, per_channel_sqnr_db)| LowBlock {
                name,
                per_channel_sqnr_db,
            })
            .collect(),
        });
        Outcome {
            report,
            report_path,
            int8_gate,
        }
    }

    /// The whole verdict: false when a verification ran and found a block or tensor off
    /// ([`Report::verified`]), or a block is below the INT8 gate.
    pub fn passed(&self) -> bool {
        self.report.verified() && self.int8_gate.as_ref().is_none_or(Int8Gate::passed)
    }
}

/// A train checkpoint and the blocks found in it: what every use case starts from.
struct Train {
    ckpt: Checkpoint,
    detection: Detection,
    chosen_by: ChosenBy,
    eps: EpsInfo,
    /// For an ONNX graph: the branch set each block replaces, and its nodes' names (in node
    /// order), as the finder's view of it had them.
    graph: Option<(Vec<BranchSet>, Vec<String>)>,
}

impl Train {
    /// Opens `path` and finds its blocks.
    fn open(path: &std::path::Path, settings: &Settings) -> Result<Train, Error> {
        let ckpt = Checkpoint::open_with(path, &settings.read)?;
        if let Some(model) = ckpt.onnx() {
            let view = crate::onnx::graph_view(model);
            let finding = find_branch_sets(&view).map_err(|error| Error::Topology {
                path: path.to_path_buf(),
                error,
            })?;
            let found = graph_blocks(&ckpt, &view, &finding);
            let detection = found.detection();
            return Ok(Train {
                eps: eps_info(&detection),
                detection,
                chosen_by: ChosenBy::Detected,
                graph: Some((found.sets, view.nodes.into_iter().map(|n| n.name).collect())),
                ckpt,
            });
        }
        let (detection, chosen_by) = find(&ckpt, &settings.find)?;
        let eps = eps_info(&detection);
        Ok(Train {
            ckpt,
            detection,
            chosen_by,
            eps,
            graph: None,
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

    /// One report entry per block, with its fused dtype, deviation and INT8 figures (and, for
    /// a graph, its nodes).
    fn block_reports(
        &self,
        dtype_of: impl Fn(&Block) -> String,
        devs: impl IntoIterator<Item = Deviation>,
        int8: Vec<Option<Int8Report>>,
    ) -> Vec<BlockReport> {
        let layout = &self.detection.layout.name;
        let mut nodes = lint::graph_nodes(self).into_iter();
        (self.detection.blocks.iter().zip(devs).zip(int8))
            .map(|((b, d), int8)| {
                let mut report = BlockReport::new(b, layout, &dtype_of(b), d);
                report.int8 = int8;
                report.block.graph_nodes = nodes.next();
                report
            })
            .collect()
    }
}

/// The blocks of `ckpt`, by the layouts `opts` selects, and how the layout was chosen.
fn find(ckpt: &Checkpoint, opts: &FindOptions) -> Result<(Detection, ChosenBy), Error> {
    let wrap = |error| Error::Layout {
        path: ckpt.path().to_path_buf(),
        error,
    };
    let (layouts, chosen_by) = match &opts.layout_file {
        Some(file) => (Layout::from_file(file).map_err(wrap)?, ChosenBy::LayoutFile),
        None if opts.layout.is_some() => (Layout::builtin().map_err(wrap)?, ChosenBy::Layout),
        None => (Layout::builtin().map_err(wrap)?, ChosenBy::Detected),
    };
    let forced = opts.layout.as_deref();
    let rules = FindRules {
        bn_eps: opts.bn_eps,
        identity: opts.identity.clone(),
        fold_bn: opts.fold_bn,
    };
    let detection = Detection::find_with(ckpt, &layouts, forced, &rules).map_err(wrap)?;
    Ok((detection, chosen_by))
}

/// What the user should know about `ckpt`: a pickle naming globals a checkpoint does not need;
/// raw and EMA weights in one file, and which were read.
fn warnings(ckpt: &Checkpoint) -> Vec<Warning> {
    let Some(source) = ckpt.source() else {
        return Vec::new();
    };
    let globals = (!source.suspicious_globals.is_empty())
        .then(|| Warning::suspicious_globals(ckpt.path(), &source.suspicious_globals));
    let ema = source.other_weights.as_ref().map(|other| {
        let used = source.key.as_deref().unwrap_or_default();
        Warning::raw_and_ema(
            ckpt.path(),
            used,
            &other.key,
            other.used_is_ema,
            other.convention,
        )
    });
    globals.into_iter().chain(ema).collect()
}

fn eps_info(detection: &Detection) -> EpsInfo {
    detection.bn_eps.clone()
}

fn layout_info(train: &Train) -> LayoutInfo {
    let layout = &train.detection.layout;
    LayoutInfo {
        name: layout.name.clone(),
        description: layout.description.clone(),
        chosen_by: train.chosen_by,
    }
}

fn skipped(detection: &Detection) -> Vec<Skipped> {
    detection.skipped.clone()
}

/// What the written (or judged) file holds: tensors, parameters, bytes.
#[derive(Debug, Clone)]
struct Written {
    tensors: usize,
    parameters: usize,
    bytes: u64,
    /// Nodes of a graph written.
    nodes: Option<usize>,
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

fn build_report(train: &Train, parts: ReportParts) -> Report {
    let (ckpt, detection) = (&train.ckpt, &train.detection);
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
        nodes_in: train.graph.as_ref().map(|(_, names)| names.len()),
        nodes_out: parts.written.nodes,
        ..Summary::default()
    };
    summary.set_worst(&parts.blocks);
    Report {
        tool: Tool::default(),
        command: parts.command.into(),
        input: ckpt.path().display().to_string(),
        output: parts.output.display().to_string(),
        layout: layout_info(train),
        bn_eps: parts.eps,
        probe: parts.probe,
        blocks: parts.blocks,
        skipped: skipped(detection),
        source: ckpt.source().cloned(),
        summary,
        verify: parts.verify,
        graph: None,
        warnings: warnings(ckpt),
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

/// For ONNX graphs: both graphs run whole on the same seeded input (without the `graph-run`
/// feature, no whole-graph run: `None`).
#[cfg(feature = "graph-run")]
fn graph_check(
    train: &Train,
    deploy: &std::path::Path,
    opts: &CheckOptions,
) -> Result<Option<(crate::report::GraphCheck, Vec<crate::report::Failure>)>, Error> {
    let tolerance = (opts.atol, opts.rtol);
    let weights = (train.detection.blocks.first()).map_or(Dtype::F32, |b| b.dtype);
    let found = crate::verify::graph::check_graphs(
        train.ckpt.path(),
        deploy,
        &opts.input_shapes,
        opts.seed,
        tolerance,
        weights,
    )?;
    Ok(Some(found))
}

/// Without the `graph-run` feature there is no whole-graph run.
#[cfg(not(feature = "graph-run"))]
fn graph_check(
    _train: &Train,
    _deploy: &std::path::Path,
    _opts: &CheckOptions,
) -> Result<Option<(crate::report::GraphCheck, Vec<crate::report::Failure>)>, Error> {
    Ok(None)
}

/// Puts a whole-graph check into the verification: its failures, and the verdict.
fn add_graph_check(
    verify: &mut VerifyReport,
    found: Option<(crate::report::GraphCheck, Vec<crate::report::Failure>)>,
) -> Option<crate::report::GraphCheck> {
    let (check, failures) = found?;
    verify.passed &= check.passed;
    verify.failures.extend(failures);
    Some(check)
}

/// The probe record of a verification.
fn verify_probe(v: &VerifyReport) -> Probe {
    Probe {
        kind: ProbeKind::Verify,
        input_size: Some(v.input_size),
        batch: v.batch,
        seed: v.seed,
    }
}
