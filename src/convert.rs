//! The three things the tool does — convert, verify, inspect — as steps over the modules:
//! read the checkpoint, find the blocks, fuse each block, write the deploy file and the report.

use std::collections::BTreeSet;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use rayon::prelude::*;
use safetensors::Dtype;
use serde::Serialize;

use crate::Error;
use crate::block::{Block, BlockError};
use crate::checkpoint::{Checkpoint, encode, float_width};
use crate::conv::Input;
use crate::deploy::{Plan, Source, copy_tensor};
use crate::fuse::{BlockValues, FusedConv};
use crate::layout::{Detection, Layout};
use crate::probe::{BranchRows, FusedRows, RowError, fuse_rows};
use crate::report::{
    BlockInfo, BlockReport, EpsInfo, Failure, LayoutInfo, Probe, Report, Skipped, Summary, Tool,
    VerifyReport,
};
use crate::verify::{self, BlockInput, Deviation};

/// Weights fused at a time by one thread when converting: small enough that the bytes just
/// read are still in the core's cache when they are decoded (64 Ki elements, 256 KB of F32).
const FUSE_CHUNK: usize = 1 << 16;

/// f64 weights run through one GEMM when verifying (8 MB): big enough for the GEMM to be
/// efficient, small enough to bound memory per block.
const VERIFY_CHUNK: usize = 1 << 20;

/// Default verification input side, raised to the kernel size where a kernel is larger.
pub const DEFAULT_VERIFY_SIZE: usize = 8;

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

/// Default tolerances `(atol, rtol)` for fused tensors stored as `dtype`: a few units of the
/// dtype's rounding, so a correct file passes and a wrong ε or a dropped bias does not.
pub fn default_tolerance(dtype: Dtype) -> (f64, f64) {
    match dtype {
        Dtype::F64 => (1e-12, 1e-10),
        Dtype::F16 => (1e-3, 1e-2),
        Dtype::BF16 => (1e-2, 5e-2),
        _ => (1e-6, 1e-5),
    }
}

fn find(ckpt: &Checkpoint, settings: &Settings) -> Result<Detection, Error> {
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

fn eps_info(detection: &Detection, settings: &Settings) -> EpsInfo {
    let (value, source) = detection.layout.bn_eps(settings.bn_eps);
    EpsInfo { value, source }
}

fn layout_info(d: &Detection) -> LayoutInfo {
    LayoutInfo {
        name: d.layout.name.clone(),
        description: d.layout.description.clone(),
        chosen_by: d.chosen_by.clone(),
    }
}

/// Ranges of output channels of about `elements` weights each.
fn row_chunks(block: &Block, elements: usize) -> Vec<Range<usize>> {
    let per_row = block.in_per_group * block.kernel * block.kernel;
    let step = (elements / per_row.max(1)).max(1);
    (0..block.out_channels)
        .step_by(step)
        .map(|s| s..(s + step).min(block.out_channels))
        .collect()
}

fn block_err(ckpt: &Checkpoint, e: crate::block::BlockError) -> Error {
    Error::Layout {
        path: ckpt.path().to_path_buf(),
        error: e.into(),
    }
}

/// Byte buffers passed from the fusing threads to the writer and back, so that a few buffers
/// carry the whole file: fresh ones would cost a page fault per 4 KiB, and the faults of two
/// threads contend for the same lock.
#[derive(Default)]
struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .map(|mut v| v.pop())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        if let Ok(mut v) = self.0.lock() {
            v.push(buf);
        }
    }
}

thread_local! {
    /// Each fusing thread's buffers for the branch weights it reads.
    static RAW: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Fuses output channels `rows` of `block` straight from the file's bytes, encoded in `dtype`
/// into `out`, with the probe deviation of the rows as written.
#[allow(clippy::too_many_arguments)]
fn fuse_chunk(
    ckpt: &Checkpoint,
    block: &Block,
    rows: Range<usize>,
    eps: f64,
    dtype: Dtype,
    probe: Option<&Input>,
    out: Vec<u8>,
) -> Result<FusedRows, Error> {
    RAW.with(|raw| {
        let mut raw = raw.borrow_mut();
        let n = block.branches.len().max(raw.len());
        raw.resize_with(n, Vec::new);
        fuse_chunk_with(ckpt, block, rows, eps, dtype, probe, out, &mut raw)
    })
}

#[allow(clippy::too_many_arguments)]
fn fuse_chunk_with(
    ckpt: &Checkpoint,
    block: &Block,
    rows: Range<usize>,
    eps: f64,
    dtype: Dtype,
    probe: Option<&Input>,
    out: Vec<u8>,
    raw_bufs: &mut [Vec<u8>],
) -> Result<FusedRows, Error> {
    let affine =
        BlockValues::load_affine(ckpt, block, rows.clone()).map_err(|e| block_err(ckpt, e))?;
    let mut raw = Vec::with_capacity(block.branches.len());
    for (branch, buf) in block.branches.iter().zip(raw_bufs.iter_mut()) {
        raw.push(match &branch.conv {
            Some(conv) => {
                let t = ckpt.get(&conv.weight).ok_or_else(|| {
                    block_err(
                        ckpt,
                        BlockError::new(&block.name, format!("`{}` is missing", conv.weight)),
                    )
                })?;
                let per_row = t.len / block.out_channels as u64;
                ckpt.read_bytes_into(
                    t,
                    rows.start as u64 * per_row,
                    rows.len() as u64 * per_row,
                    buf,
                )?;
                Some((t.dtype, &buf[..]))
            }
            None => None,
        });
    }
    let branches: Vec<BranchRows> = affine
        .branches
        .iter()
        .zip(&raw)
        .zip(affine.affines(eps, block).map_err(|e| block_err(ckpt, e))?)
        .map(|((v, raw), (t, shift))| BranchRows {
            role: v.role,
            kernel: v.kernel,
            weight: *raw,
            t,
            shift,
        })
        .collect();
    let start = rows.start;
    fuse_rows(
        out,
        rows,
        block.in_per_group,
        block.kernel,
        block.out_per_group(),
        &branches,
        dtype,
        probe,
    )
    .map_err(|e| match e {
        RowError::NonFinite {
            branch,
            index,
            value,
        } => {
            let b = &block.branches[branch];
            let name = b.conv.as_ref().map_or(String::new(), |c| c.weight.clone());
            let per_row = ckpt
                .get(&name)
                .map_or(0, |t| t.numel() / block.out_channels);
            block_err(
                ckpt,
                BlockError::new(
                    &block.name,
                    format!(
                        "tensor `{name}` holds {value} at element {}; fusion needs finite values",
                        start * per_row + index
                    ),
                ),
            )
        }
        RowError::Overflow { bias, index, value } => {
            let per_row = block.in_per_group * block.kernel * block.kernel;
            let (tensor, at) = if bias {
                (&block.deploy_bias, start + index)
            } else {
                (&block.deploy_weight, start * per_row + index)
            };
            Error::Overflow {
                path: ckpt.path().to_path_buf(),
                block: block.name.clone(),
                tensor: tensor.clone(),
                index: at,
                value,
                dtype,
            }
        }
    })
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
    let deviations = write_deploy(
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

    let dtype_of = |b: &Block| format!("{:?}", settings.dtype.unwrap_or(b.dtype));
    let mut blocks: Vec<BlockReport> = detection
        .blocks
        .iter()
        .zip(&deviations)
        .map(|(b, d)| BlockReport::new(b, &detection.layout.name, &dtype_of(b), *d))
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
        let deploy = Checkpoint::open(tmp.path())?;
        let (v, devs) = check_deploy(&ckpt, &deploy, &detection, eps.value, settings)?;
        for (report, dev) in blocks.iter_mut().zip(devs) {
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

/// Why writing stopped: the output failed, or the input did.
enum WriteError {
    Io(std::io::Error),
    Run(Error),
}

impl From<Error> for WriteError {
    fn from(e: Error) -> Self {
        WriteError::Run(e)
    }
}

/// What the writer thread is asked to put next in the file.
enum Piece {
    Bytes(Vec<u8>),
    Copy(usize),
}

/// Writes the deploy file's header and data to `file`; returns each block's probe deviation
/// (all zero when `probe_seed` is `None`: no probe).
///
/// The main thread fuses (its chunks in parallel) while a writer thread writes what is done,
/// so computing and writing overlap; the pieces arrive in file order through a short queue.
fn write_deploy(
    ckpt: &Checkpoint,
    detection: &Detection,
    plan: &Plan,
    eps: f64,
    probe_seed: Option<u64>,
    file: &std::fs::File,
    progress: &ProgressBar,
) -> Result<Vec<Deviation>, WriteError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(16);
    let buffers = Buffers::default();
    std::thread::scope(|scope| {
        let buffers = &buffers;
        let writer = scope.spawn(move || -> std::io::Result<()> {
            let mut out = file;
            for piece in rx {
                match piece {
                    Piece::Bytes(bytes) => {
                        out.write_all(&bytes)?;
                        progress.inc(bytes.len() as u64);
                        buffers.give(bytes);
                    }
                    Piece::Copy(i) => {
                        copy_tensor(ckpt, i, &mut out)?;
                        progress.inc(ckpt.tensors()[i].len);
                    }
                }
            }
            Ok(())
        });
        let produced = produce(ckpt, detection, plan, eps, probe_seed, &tx, buffers);
        drop(tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the writer thread failed")));
        // An output error explains a closed queue better than the producer's view of it.
        written.map_err(WriteError::Io)?;
        produced
    })
}

fn produce(
    ckpt: &Checkpoint,
    detection: &Detection,
    plan: &Plan,
    eps: f64,
    probe_seed: Option<u64>,
    tx: &std::sync::mpsc::SyncSender<Piece>,
    buffers: &Buffers,
) -> Result<Vec<Deviation>, WriteError> {
    let send = |piece| {
        tx.send(piece)
            .map_err(|_| WriteError::Io(std::io::Error::other("the writer stopped")))
    };
    send(Piece::Bytes(plan.header()))?;
    let mut deviations = vec![Deviation::default(); detection.blocks.len()];
    let mut pending_bias: Vec<Option<Vec<u8>>> = vec![None; detection.blocks.len()];
    for entry in &plan.entries {
        crate::check_interrupted()?;
        match entry.source {
            Source::Copy(i) if ckpt.tensors()[i].dtype == entry.dtype => send(Piece::Copy(i))?,
            Source::Copy(i) => {
                let t = &ckpt.tensors()[i];
                let values = ckpt
                    .read_f64(t, 0..t.numel())
                    .map_err(Error::from)?
                    .unwrap_or_default();
                let mut bytes = Vec::new();
                encode(entry.dtype, &values, &mut bytes).map_err(|at| Error::Overflow {
                    path: ckpt.path().to_path_buf(),
                    block: String::new(),
                    tensor: t.name.clone(),
                    index: at,
                    value: values[at],
                    dtype: entry.dtype,
                })?;
                send(Piece::Bytes(bytes))?;
            }
            Source::FusedWeight(b) => {
                let block = &detection.blocks[b];
                let probe = probe_seed.map(|seed| {
                    let c = block.in_channels().unwrap_or(block.in_per_group);
                    Input::random(1, c, block.kernel, block.kernel, seed, b as u64)
                });
                // A window of chunks at a time, one per thread: fused in parallel, then queued
                // for the writer, which writes them while the next window is fused.
                let mut bias = Vec::new();
                for window in
                    row_chunks(block, FUSE_CHUNK).chunks(4 * rayon::current_num_threads().max(1))
                {
                    let chunks: Vec<FusedRows> = window
                        .par_iter()
                        .map(|rows| {
                            let out = buffers.take();
                            fuse_chunk(
                                ckpt,
                                block,
                                rows.clone(),
                                eps,
                                entry.dtype,
                                probe.as_ref(),
                                out,
                            )
                        })
                        .collect::<Result<_, _>>()?;
                    for c in chunks {
                        deviations[b] = deviations[b].merge(c.deviation);
                        bias.extend(c.bias);
                        send(Piece::Bytes(c.weight))?;
                    }
                }
                pending_bias[b] = Some(bias);
            }
            Source::FusedBias(b) => send(Piece::Bytes(pending_bias[b].take().unwrap_or_default()))?,
        }
    }
    Ok(deviations)
}

#[allow(clippy::too_many_arguments)]
fn build_report(
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

/// Judges `deploy` against the blocks of `train`: every block run both ways on the verification
/// input, every other tensor compared. Returns the verdict and each block's deviation (`None`
/// where the fused tensors are missing or mis-shaped).
pub fn check_deploy(
    train: &Checkpoint,
    deploy: &Checkpoint,
    detection: &Detection,
    eps: f64,
    settings: &Settings,
) -> Result<(VerifyReport, Vec<Option<Deviation>>), Error> {
    let max_k = detection.blocks.iter().map(|b| b.kernel).max().unwrap_or(1);
    let [h, w] = settings.input_size.unwrap_or([
        DEFAULT_VERIFY_SIZE.max(max_k),
        DEFAULT_VERIFY_SIZE.max(max_k),
    ]);
    if let Some(b) = detection
        .blocks
        .iter()
        .find(|b| b.kernel > h || b.kernel > w)
    {
        return Err(Error::Usage(format!(
            "--input-size {h}x{w} is smaller than the {k}×{k} kernel of block `{}`; borders and interior would not both be tested",
            b.name,
            k = b.kernel
        )));
    }
    let batch = settings.batch.max(1);
    let tol = |dtype: Dtype| {
        let (a, r) = default_tolerance(dtype);
        (settings.atol.unwrap_or(a), settings.rtol.unwrap_or(r))
    };
    // Tolerances reported are those of the blocks' (first) dtype.
    let report_dtype = detection
        .blocks
        .first()
        .and_then(|b| deploy.get(&b.deploy_weight).map(|t| t.dtype))
        .unwrap_or(Dtype::F32);
    let (atol, rtol) = tol(report_dtype);

    let results: Vec<Result<Result<Deviation, String>, Error>> = detection
        .blocks
        .par_iter()
        .enumerate()
        .map(|(i, block)| {
            crate::check_interrupted()?;
            verify_block(
                train,
                deploy,
                block,
                eps,
                [h, w],
                batch,
                settings.seed,
                i as u64,
            )
        })
        .collect();
    let mut failures = Vec::new();
    let mut devs = Vec::new();
    for (block, result) in detection.blocks.iter().zip(results) {
        match result? {
            Ok(dev) => {
                let dtype = deploy
                    .get(&block.deploy_weight)
                    .map_or(Dtype::F32, |t| t.dtype);
                let (a, r) = tol(dtype);
                if !dev.within(a, r) {
                    failures.push(Failure {
                        name: block.name.clone(),
                        reason: format!(
                            "deviation {:.3e} (relative {:.3e}) is over the tolerance {a:.1e} + {r:.1e} × {:.3e}",
                            dev.max_abs, dev.max_rel, dev.max_abs_output
                        ),
                        max_abs_deviation: Some(dev.max_abs),
                        max_rel_deviation: Some(dev.max_rel),
                    });
                }
                devs.push(Some(dev));
            }
            Err(reason) => {
                failures.push(Failure {
                    name: block.name.clone(),
                    reason,
                    max_abs_deviation: None,
                    max_rel_deviation: None,
                });
                devs.push(None);
            }
        }
    }
    failures.extend(check_passthrough(train, deploy, detection)?);
    Ok((
        VerifyReport {
            passed: failures.is_empty(),
            atol,
            rtol,
            input_size: [h, w],
            batch,
            seed: settings.seed,
            failures,
        },
        devs,
    ))
}

#[allow(clippy::too_many_arguments)]
fn verify_block(
    train: &Checkpoint,
    deploy: &Checkpoint,
    block: &Block,
    eps: f64,
    [h, w]: [usize; 2],
    batch: usize,
    seed: u64,
    stream: u64,
) -> Result<Result<Deviation, String>, Error> {
    let k = block.kernel;
    let expect_w = vec![block.out_channels, block.in_per_group, k, k];
    let expect_b = vec![block.out_channels];
    let mut fused_tensors = Vec::new();
    for (name, shape) in [
        (&block.deploy_weight, &expect_w),
        (&block.deploy_bias, &expect_b),
    ] {
        let Some(t) = deploy.get(name) else {
            return Ok(Err(format!("the deploy file has no `{name}`")));
        };
        if &t.shape != shape {
            return Ok(Err(format!(
                "`{name}` has shape {:?}; expected {shape:?}",
                t.shape
            )));
        }
        if float_width(t.dtype).is_none() {
            return Ok(Err(format!(
                "`{name}` is {:?}, not floating point",
                t.dtype
            )));
        }
        fused_tensors.push(t);
    }
    let x = BlockInput::new(block, batch, h, w, seed, stream);
    let per_row = block.in_per_group * k * k;
    let opg = block.out_per_group();
    let mut dev = Deviation::default();
    for rows in row_chunks(block, VERIFY_CHUNK) {
        let values =
            BlockValues::load(train, block, rows.clone()).map_err(|e| block_err(train, e))?;
        let weight = deploy
            .read_f64(fused_tensors[0], rows.start * per_row..rows.end * per_row)?
            .unwrap_or_default();
        let bias = deploy
            .read_f64(fused_tensors[1], rows.clone())?
            .unwrap_or_default();
        let fused = FusedConv {
            rows,
            in_per_group: block.in_per_group,
            kernel: k,
            weight,
            bias,
        };
        let d = verify::deviation(
            &verify::unfused(&values, &x, opg, eps),
            &verify::fused(&fused, &x, opg),
        );
        dev = dev.merge(d);
    }
    Ok(Ok(dev))
}

/// Every tensor the deploy file should carry over unchanged is there, equal to the train
/// file's (cast to the deploy dtype where that differs); and nothing else is there.
fn check_passthrough(
    train: &Checkpoint,
    deploy: &Checkpoint,
    detection: &Detection,
) -> Result<Vec<Failure>, Error> {
    let consumed = detection.consumed();
    let mut expected: BTreeSet<&str> = BTreeSet::new();
    let mut failures = Vec::new();
    let fail = |name: &str, reason: String| Failure {
        name: name.to_string(),
        reason,
        max_abs_deviation: None,
        max_rel_deviation: None,
    };
    for b in &detection.blocks {
        expected.insert(&b.deploy_weight);
        expected.insert(&b.deploy_bias);
    }
    for t in train.tensors() {
        if consumed.contains(t.name.as_str()) {
            continue;
        }
        expected.insert(&t.name);
        let Some(d) = deploy.get(&t.name) else {
            failures.push(fail(&t.name, "missing from the deploy file".into()));
            continue;
        };
        if d.shape != t.shape {
            failures.push(fail(
                &t.name,
                format!(
                    "shape {:?} in the deploy file, {:?} in the train file",
                    d.shape, t.shape
                ),
            ));
            continue;
        }
        let same = if d.dtype == t.dtype {
            train.read_bytes(t, 0, t.len)? == deploy.read_bytes(d, 0, d.len)?
        } else if float_width(d.dtype).is_some() && float_width(t.dtype).is_some() {
            let values = train.read_f64(t, 0..t.numel())?.unwrap_or_default();
            let mut cast = Vec::new();
            let _ = encode(d.dtype, &values, &mut cast);
            cast == deploy.read_bytes(d, 0, d.len)?
        } else {
            false
        };
        if !same {
            failures.push(fail(
                &t.name,
                format!(
                    "differs from the train file's ({:?} there, {:?} here)",
                    t.dtype, d.dtype
                ),
            ));
        }
    }
    for d in deploy.tensors() {
        if !expected.contains(d.name.as_str()) {
            failures.push(fail(
                &d.name,
                "is in the deploy file but not expected there (a leftover train branch? strict loading would refuse it)".into(),
            ));
        }
    }
    Ok(failures)
}

/// Judges a deploy file made by anyone against its train file.
pub fn verify_files(
    train_path: &Path,
    deploy_path: &Path,
    settings: &Settings,
) -> Result<Outcome, Error> {
    let train = Checkpoint::open(train_path)?;
    let deploy = Checkpoint::open(deploy_path)?;
    let detection = find(&train, settings)?;
    let eps = eps_info(&detection, settings);
    let (v, devs) = check_deploy(&train, &deploy, &detection, eps.value, settings)?;
    let blocks = detection
        .blocks
        .iter()
        .zip(devs)
        .map(|(b, d)| {
            let dtype = deploy
                .get(&b.deploy_weight)
                .map_or("missing".to_string(), |t| format!("{:?}", t.dtype));
            let d = d.unwrap_or(Deviation {
                max_abs: f64::NAN,
                max_rel: f64::NAN,
                max_abs_output: f64::NAN,
            });
            BlockReport::new(b, &detection.layout.name, &dtype, d)
        })
        .collect();
    let probe = Probe {
        kind: "verify".into(),
        input_size: Some(v.input_size),
        batch: v.batch,
        seed: v.seed,
    };
    let out = (
        deploy.tensors().len(),
        deploy.tensors().iter().map(|t| t.numel()).sum(),
        std::fs::metadata(deploy_path).map_or(0, |m| m.len()),
    );
    let report = build_report(
        "verify",
        &train,
        deploy_path,
        &detection,
        eps,
        probe,
        blocks,
        Some(v),
        out,
    );
    Ok(Outcome {
        report,
        report_path: None,
    })
}

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
    Ok(Inspection {
        input: input.display().to_string(),
        layout: layout_info(&detection),
        bn_eps: eps_info(&detection, settings),
        blocks: detection
            .blocks
            .iter()
            .map(|b| InspectBlock {
                block: b.into(),
                tensors: b.consumed.clone(),
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
