//! The conversion, step by step: read the checkpoint, find the blocks, write the deploy file
//! (fusing each block on the way), optionally verify it, write the report — and put both in
//! place only when all of that succeeded. Also the settings and helpers that `verify` and
//! `inspect` share with it.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use safetensors::Dtype;

use crate::Error;
use crate::block::Block;
use crate::checkpoint::Checkpoint;
use crate::deploy::{Plan, WriteError, write_deploy};
use crate::layout::{Detection, Layout};
use crate::report::{
    BlockReport, EpsInfo, LayoutInfo, Probe, Report, Skipped, Summary, Tool, VerifyReport,
};
use crate::verify::check_deploy;

/// Everything the user can set.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Force this layout instead of detecting one.
    pub layout: Option<String>,
    /// Read layouts from this JSON file instead of the built-in table.
    pub layout_file: Option<PathBuf>,
    /// BN ε instead of the layout's default.
    pub bn_eps: Option<f64>,
    /// Cast every floating-point tensor of the output to this dtype.
    pub dtype: Option<Dtype>,
    /// Seed of the random inputs.
    pub seed: u64,
    /// Verification input `[h, w]`; `None` for the default.
    pub input_size: Option<[usize; 2]>,
    /// Images per block in verification.
    pub batch: usize,
    /// Absolute tolerance; `None` for the dtype's default.
    pub atol: Option<f64>,
    /// Relative tolerance; `None` for the dtype's default.
    pub rtol: Option<f64>,
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

pub(crate) fn find(ckpt: &Checkpoint, settings: &Settings) -> Result<Detection, Error> {
    let wrap = |error| Error::Layout {
        path: ckpt.path().to_path_buf(),
        error,
    };
    let (layouts, chosen_by) = match &settings.layout_file {
        Some(file) => (Layout::from_file(file).map_err(wrap)?, "--layout-file"),
        None if settings.layout.is_some() => (Layout::builtin(), "--layout"),
        None => (Layout::builtin(), "detected"),
    };
    Detection::find(ckpt, &layouts, settings.layout.as_deref(), chosen_by).map_err(wrap)
}

pub(crate) fn eps_info(detection: &Detection, settings: &Settings) -> EpsInfo {
    let (value, source) = detection.layout.bn_eps(settings.bn_eps);
    EpsInfo { value, source }
}

pub(crate) fn layout_info(d: &Detection) -> LayoutInfo {
    LayoutInfo {
        name: d.layout.name.clone(),
        description: d.layout.description.clone(),
        chosen_by: d.chosen_by.clone(),
    }
}

/// Ranges of output channels of about `elements` weights each.
pub(crate) fn row_chunks(block: &Block, elements: usize) -> Vec<Range<usize>> {
    let per_row = block.in_per_group * block.kernel * block.kernel;
    let step = (elements / per_row.max(1)).max(1);
    (0..block.out_channels)
        .step_by(step)
        .map(|s| s..(s + step).min(block.out_channels))
        .collect()
}

pub(crate) fn block_err(ckpt: &Checkpoint, e: crate::block::BlockError) -> Error {
    Error::Layout {
        path: ckpt.path().to_path_buf(),
        error: e.into(),
    }
}

/// A new temp file in `target`'s folder, removed unless persisted.
fn temp_beside(target: &Path) -> Result<tempfile::NamedTempFile, Error> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::Output {
            path: target.to_path_buf(),
            what: format!("its folder {} does not exist", dir.display()),
        });
    }
    let name = target
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        // Like any new file: 0666 less the umask (tempfile's own default is 0600).
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(&dir)
        .map_err(|e| Error::Output {
            path: target.to_path_buf(),
            what: format!("cannot create a file in {}: {e}", dir.display()),
        })
}

/// `deploy.safetensors` → `deploy.report.json`, in the same folder.
///
/// ```
/// use std::path::Path;
/// use repvgg_fuse::convert::default_report_path;
///
/// assert_eq!(
///     default_report_path(Path::new("out/deploy.safetensors")),
///     Path::new("out/deploy.report.json")
/// );
/// assert_eq!(default_report_path(Path::new("model")), Path::new("model.report.json"));
/// ```
pub fn default_report_path(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map_or("deploy".into(), |s| s.to_string_lossy().into_owned());
    output.with_file_name(format!("{stem}.report.json"))
}

/// Refuses an output that is the input, by any path.
fn check_not_input(input: &Path, output: &Path, what: &str) -> Result<(), Error> {
    if output.is_dir() {
        return Err(Error::Output {
            path: output.to_path_buf(),
            what: format!("the {what} is a directory"),
        });
    }
    if same_file(input, output) {
        return Err(Error::Output {
            path: output.to_path_buf(),
            what: format!(
                "the {what} is the input file {}; it would be overwritten",
                input.display()
            ),
        });
    }
    Ok(())
}

/// Whether `a` and `b` name the same file: the same inode when both exist (any path, symlink
/// or hard link), else the same canonical folder and file name.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return x.dev() == y.dev() && x.ino() == y.ino();
    }
    let place = |p: &Path| {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some((std::fs::canonicalize(dir).ok()?, p.file_name()?.to_owned()))
    };
    a == b || matches!((place(a), place(b)), (Some(x), Some(y)) if x == y)
}

/// Converts `input` to deploy form at `output`, with the report at `report_path`
/// (default: beside the output). With `verify`, re-reads the written file and runs every
/// block both ways on the verification input.
///
/// Nothing is written unless the whole run succeeds; after a failed verification only the
/// report is written, so the deviation can be looked into (`Outcome::passed` says it failed),
/// and an existing output stays as it was.
pub fn convert(
    input: &Path,
    output: &Path,
    report_path: Option<&Path>,
    settings: &Settings,
    verify: bool,
    progress: &ProgressBar,
) -> Result<Outcome, Error> {
    let report_path = report_path.map_or_else(|| default_report_path(output), Path::to_path_buf);
    check_not_input(input, output, "output")?;
    check_not_input(input, &report_path, "report path")?;
    if same_file(&report_path, output) {
        return Err(Error::Output {
            path: output.to_path_buf(),
            what: "the report would overwrite the deploy file".into(),
        });
    }
    let ckpt = Checkpoint::open(input)?;
    let detection = find(&ckpt, settings)?;
    let eps = eps_info(&detection, settings);
    let plan = Plan::new(&ckpt, &detection, settings.dtype);

    let mut tmp = temp_beside(output)?;
    let out_err = |e: std::io::Error| Error::Output {
        path: output.to_path_buf(),
        what: format!("cannot write: {e}"),
    };
    progress.set_length(plan.file_len());
    let (deviations, int8_pass_one) = write_deploy(
        &ckpt,
        &detection,
        &plan,
        eps.value,
        // With --verify the full check replaces the probe.
        (!verify).then_some(settings.seed),
        tmp.as_file(),
        progress,
    )
    .map_err(|e| match e {
        WriteError::Io(e) => out_err(e),
        WriteError::Run(e) => e,
    })?;
    tmp.as_file_mut().flush().map_err(out_err)?;
    // INT8: pass one ran while fusing; pass two (per-tensor, which needs each tensor's max)
    // reads the file just written, still in the page cache. The input is read once.
    let deploy = Checkpoint::open(tmp.path())?;
    let int8 = crate::int8::tensor_pass(&deploy, &detection.blocks, &int8_pass_one)?;

    let dtype_of = |b: &Block| format!("{:?}", settings.dtype.unwrap_or(b.dtype));
    let mut blocks: Vec<BlockReport> = detection
        .blocks
        .iter()
        .zip(&deviations)
        .zip(int8)
        .map(|((b, d), int8)| BlockReport {
            int8,
            ..BlockReport::new(b, &detection.layout.name, &dtype_of(b), *d)
        })
        .collect();
    let mut probe = Probe {
        kind: "probe".into(),
        input_size: None,
        batch: 1,
        seed: settings.seed,
    };
    let mut verify_report = None;
    if verify {
        progress.set_message("verifying");
        let (v, devs, int8_out) = check_deploy(&ckpt, &deploy, &detection, eps.value, settings)?;
        for ((report, dev), out) in blocks.iter_mut().zip(devs).zip(int8_out) {
            if let (Some(int8), Some(out)) = (&mut report.int8, out) {
                int8.output_sqnr_db = Some(out);
            }
            if let Some(dev) = dev {
                report.max_abs_deviation = dev.max_abs;
                report.max_rel_deviation = dev.max_rel;
                report.max_abs_output = dev.max_abs_output;
            }
        }
        probe = Probe {
            kind: "verify".into(),
            input_size: Some(v.input_size),
            batch: v.batch,
            seed: v.seed,
        };
        verify_report = Some(v);
    }

    let out_tensors = plan.entries.len();
    let report = build_report(
        "convert",
        &ckpt,
        output,
        &detection,
        eps,
        probe,
        blocks,
        verify_report,
        (
            out_tensors,
            plan.entries
                .iter()
                .map(|e| e.shape.iter().product::<usize>())
                .sum(),
            plan.file_len(),
        ),
    );
    let report_tmp = write_report_tmp(&report, &report_path)?;
    // A deploy file that failed verification is not put in place (the temp file goes with
    // `tmp`); the report is, since it says what failed.
    if report.verify.as_ref().is_none_or(|v| v.passed) {
        tmp.persist(output).map_err(|e| Error::Output {
            path: output.to_path_buf(),
            what: format!("cannot move the finished file into place: {}", e.error),
        })?;
    }
    report_tmp
        .persist(&report_path)
        .map_err(|e| Error::Output {
            path: report_path.clone(),
            what: format!("cannot move the report into place: {}", e.error),
        })?;
    Ok(Outcome {
        report,
        report_path: Some(report_path),
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn build_report(
    command: &str,
    ckpt: &Checkpoint,
    output: &Path,
    detection: &Detection,
    eps: EpsInfo,
    probe: Probe,
    blocks: Vec<BlockReport>,
    verify: Option<VerifyReport>,
    (tensors_out, parameters_out, bytes_out): (usize, usize, u64),
) -> Report {
    let consumed = detection.consumed();
    let tensors_in = ckpt.tensors().len();
    let mut summary = Summary {
        tensors_in,
        tensors_out,
        tensors_passed_through: tensors_in - consumed.len(),
        tensors_dropped: consumed.len(),
        parameters_in: ckpt.tensors().iter().map(|t| t.numel()).sum(),
        parameters_out,
        bytes_in: std::fs::metadata(ckpt.path()).map_or(0, |m| m.len()),
        bytes_out,
        ..Summary::default()
    };
    summary.set_worst(&blocks);
    Report {
        tool: Tool::default(),
        command: command.into(),
        input: ckpt.path().display().to_string(),
        output: output.display().to_string(),
        layout: layout_info(detection),
        bn_eps: eps,
        probe,
        blocks,
        skipped: Skipped::all(detection),
        summary,
        verify,
    }
}

/// Writes `report` to `path` atomically (a temp file beside it, renamed into place), refusing
/// a path that is one of `inputs`.
pub fn write_report(report: &Report, path: &Path, inputs: &[&Path]) -> Result<(), Error> {
    for input in inputs {
        check_not_input(input, path, "report path")?;
    }
    write_report_tmp(report, path)?
        .persist(path)
        .map_err(|e| Error::Output {
            path: path.to_path_buf(),
            what: format!("cannot move the report into place: {}", e.error),
        })?;
    Ok(())
}

fn write_report_tmp(report: &Report, path: &Path) -> Result<tempfile::NamedTempFile, Error> {
    let mut tmp = temp_beside(path)?;
    let text = serde_json::to_string_pretty(report).unwrap_or_default();
    tmp.as_file_mut()
        .write_all(format!("{text}\n").as_bytes())
        .map_err(|e| Error::Output {
            path: path.to_path_buf(),
            what: format!("cannot write the report: {e}"),
        })?;
    Ok(tmp)
}
