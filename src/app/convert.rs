//! The conversion: read the checkpoint, find the blocks, write the deploy file (fusing each
//! block on the way), optionally verify it, write the report — and put both in place only
//! when all of that succeeded.

use std::path::{Path, PathBuf};

use super::output::{
    Pending, check_ci, check_not_input, default_report_path, put_in_place, same_file, write_atomic,
};
use super::{
    Outcome, ReportParts, Settings, Train, Written, add_graph_check, build_report, graph_check,
    set_checked, verify_probe,
};
use crate::Error;
use crate::checkpoint::Checkpoint;
use crate::int8;
use crate::progress::Hooks;
use crate::report::{Probe, ProbeKind};
use crate::write::plan::Plan;
use crate::write::safetensors::{Streamed, WriteError, write_deploy};

/// Where [`convert`] writes the JSON report.
#[derive(Debug, Clone, Copy)]
pub enum ReportTo<'a> {
    /// Beside the output: see [`default_report_path`].
    Beside,
    /// This file.
    File(&'a Path),
    /// No file: the caller has it in [`Outcome::report`] (`--report -` prints it).
    Caller,
}

impl ReportTo<'_> {
    /// The report file for a conversion to `output`; none for [`ReportTo::Caller`].
    pub fn path(self, output: &Path) -> Option<PathBuf> {
        match self {
            ReportTo::Beside => Some(default_report_path(output)),
            ReportTo::File(path) => Some(path.to_path_buf()),
            ReportTo::Caller => None,
        }
    }
}

/// Converts `input` to deploy form at `output`, with the report where `report` says. With
/// `verify`, re-reads the written file and runs every block both ways on the verification
/// input.
///
/// Nothing is written unless the whole run succeeds, and every file (deploy file, report, and
/// the CI files `settings.ci` asks for) is finished before any is put in place; after a failed
/// verification only the report and the CI files are, so the deviation can be looked into
/// (`Outcome::passed` says it failed), and an existing output stays as it was.
pub fn convert(
    input: &Path,
    output: &Path,
    report: ReportTo,
    settings: &Settings,
    verify: bool,
    hooks: Hooks,
) -> Result<Outcome, Error> {
    if settings.ci.junit.is_some() && !verify {
        return Err(Error::Usage(
            "--junit needs --verify: without it no block is held to a tolerance, so there are no test results to write".into(),
        ));
    }
    let report_path = report.path(output);
    check_paths(input, output, report_path.as_deref())?;
    let mut files = vec![input, output];
    files.extend(report_path.as_deref());
    check_ci(&settings.ci, &files)?;
    let train = Train::open(input, settings)?;
    refuse_cast_of_graph(&train, input, settings)?;
    let detection = &train.detection;
    // With --verify the full check replaces the probe.
    let probe_seed = (!verify).then_some(settings.check.seed);
    let staged = match &train.graph {
        Some((sets, _)) => super::graph::stage(&train, sets, output, probe_seed, hooks)?,
        None => stage_checkpoint(&train, settings, probe_seed, output, hooks)?,
    };
    // INT8: pass one ran while fusing; pass two (per tensor, which needs each tensor's max)
    // reads the file just written, still in the page cache. The input is read once.
    // A graph's pass two ran on the rows in memory.
    let int8 = match (&staged.int8, &staged.deploy) {
        (Some(figures), _) => figures.clone(),
        (None, Some(deploy)) => int8::tensor_pass(
            deploy,
            &detection.blocks,
            &staged.streamed.int8,
            hooks.cancel,
        )?,
        (None, None) => return Err(Error::internal("a deploy file neither read nor measured")),
    };
    let dtype_of = |b: &crate::block::Block| format!("{:?}", settings.cast.unwrap_or(b.dtype));
    let mut blocks = train.block_reports(dtype_of, staged.streamed.probe.clone(), int8);
    let (probe, verify_report) = if verify {
        hooks.progress.stage("verifying");
        let deploy = (staged.deploy.as_ref())
            .ok_or_else(|| Error::internal("a verified deploy file that was not opened"))?;
        let checked = train.check(deploy, &settings.check, hooks)?;
        set_checked(&mut blocks, &checked);
        (verify_probe(&checked.report), Some(checked.report))
    } else {
        let probe = Probe {
            kind: ProbeKind::Probe,
            input_size: None,
            batch: 1,
            seed: settings.check.seed,
        };
        (probe, None)
    };
    let mut verify_report = verify_report;
    let graph = whole_graph(&train, &staged, verify_report.as_mut(), settings)?;
    let parts = ReportParts {
        command: "convert",
        output: output.to_path_buf(),
        eps: train.eps.clone(),
        probe,
        blocks,
        verify: verify_report,
        written: staged.written.clone(),
    };
    let mut report = build_report(&train, parts);
    report.set_graph(graph);
    // A deploy file that failed verification is not put in place (the temp file goes with
    // `tmp`); the report is, since it says what failed.
    let deploy_files = match report.verified() {
        true => staged.files,
        false => Vec::new(),
    };
    put_in_place(&report, deploy_files, report_path.as_deref(), &settings.ci)?;
    Ok(Outcome::new(report, report_path, settings))
}

/// A graph verified is also run whole, both forms on the same input: the check, its failures
/// added to the verification.
fn whole_graph(
    train: &Train,
    staged: &super::graph::Staged,
    verify: Option<&mut crate::report::VerifyReport>,
    settings: &Settings,
) -> Result<Option<crate::report::GraphCheck>, Error> {
    let (Some(verify), Some(deploy_path)) = (verify, &staged.path) else {
        return Ok(None);
    };
    let found = graph_check(train, deploy_path, &settings.check)?;
    Ok(add_graph_check(verify, found))
}

/// `--dtype` casts checkpoints; a graph keeps its dtypes.
fn refuse_cast_of_graph(train: &Train, input: &Path, settings: &Settings) -> Result<(), Error> {
    if train.graph.is_some() && settings.cast.is_some() {
        return Err(Error::Usage(format!(
            "{}: --dtype casts checkpoints; an ONNX graph keeps its own dtypes (convert it with onnxconverter-common first)",
            input.display()
        )));
    }
    Ok(())
}

/// Refuses an output or report that would overwrite the input, or each other.
fn check_paths(input: &Path, output: &Path, report_path: Option<&Path>) -> Result<(), Error> {
    check_not_input(input, output, "output")?;
    let Some(report_path) = report_path else {
        return Ok(());
    };
    check_not_input(input, report_path, "report path")?;
    if same_file(report_path, output) {
        return Err(Error::Output {
            path: output.to_path_buf(),
            what: "the report would overwrite the deploy file".into(),
        });
    }
    Ok(())
}

/// The safetensors deploy file of a checkpoint, written to a pending file beside `output`.
fn stage_checkpoint(
    train: &Train,
    settings: &Settings,
    probe_seed: Option<u64>,
    output: &Path,
    hooks: Hooks,
) -> Result<super::graph::Staged, Error> {
    let plan = Plan::new(&train.ckpt, &train.detection, settings.cast);
    let (tmp, streamed) = write(train, &plan, probe_seed, output, hooks)?;
    let deploy = Checkpoint::open(tmp.path())?;
    let written = Written {
        tensors: plan.entries.len(),
        parameters: plan.parameters(),
        bytes: plan.file_len(),
        nodes: None,
    };
    Ok(super::graph::Staged::new(
        vec![tmp],
        streamed,
        deploy,
        written,
    ))
}

/// Writes the deploy file to a pending file beside `output`; returns it and each block's probe
/// deviation (with `probe_seed`; zero without).
fn write(
    train: &Train,
    plan: &Plan,
    probe_seed: Option<u64>,
    output: &Path,
    hooks: Hooks,
) -> Result<(Pending, Streamed), Error> {
    hooks.progress.start(plan.file_len());
    let (ckpt, detection) = (&train.ckpt, &train.detection);
    write_atomic(output, "the finished file", |file| {
        write_deploy(ckpt, detection, plan, probe_seed, file, hooks).map_err(|e| match e {
            WriteError::Io(e) => Error::write(output, "cannot write")(e),
            WriteError::Run(e) => e,
        })
    })
}
