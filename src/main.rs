//! The `repvgg-fuse` command line: parses, calls the library, prints, picks the exit code.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use repvgg_fuse::app::{
    CheckOptions, CiOutputs, FindOptions, Outcome, ReportTo, RunStart, Settings,
};
use repvgg_fuse::checkpoint::ReadOptions;
use repvgg_fuse::progress::{Cancel, Hooks, Progress, Silent};
use repvgg_fuse::report::{Warning, github, text};
use safetensors::Dtype;

/// Fuse RepVGG-family train checkpoints (k×k conv+BN, 1×1 conv+BN, identity BN) into deploy
/// form (one k×k conv with bias per block), from the weights alone, and prove the two compute
/// the same thing.
///
/// Exit codes: 0 ok; 1 verification found a deviation over tolerance; 2 bad input, usage or
/// I/O error.
#[derive(Parser, Debug)]
#[command(name = "repvgg-fuse", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    convert: ConvertArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Judge a deploy file (ours or anyone's, PyTorch's included) against its train file.
    Verify(VerifyArgs),
    /// Show the layout and blocks found, and what the deploy file would hold.
    Inspect(InspectArgs),
    /// Gate an exported ONNX graph: exit 1 if it still holds parallel branches that one conv
    /// would compute exactly (each named by its nodes, with what merging would save), 0 if
    /// none, 2 on bad input.
    Lint(LintArgs),
}

#[derive(Args, Debug)]
struct LintArgs {
    /// The ONNX graph.
    graph: PathBuf,
    /// Also write the JSON findings here; `-` writes them to stdout.
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Write the findings as JUnit XML here: a failing testcase per mergeable branch set (its
    /// nodes, what merging saves), a skipped one per candidate left alone, one passing
    /// testcase when no set is left. (A Markdown summary goes to `$GITHUB_STEP_SUMMARY`, and
    /// `::error` lines to stderr under `GITHUB_ACTIONS=true`, as for `verify`.)
    #[arg(long, value_name = "PATH")]
    junit: Option<PathBuf>,
    /// No lines on passing; only the findings.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// The train-form checkpoint.
    train: PathBuf,
    /// The deploy-form checkpoint to judge.
    deploy: PathBuf,
    /// Also write the JSON report here; `-` writes it to stdout (and the summary to stderr).
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The train-form checkpoint.
    input: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    find: FindArgs,
    /// Show the output as cast to this dtype.
    #[arg(long, value_enum)]
    dtype: Option<OutDtype>,
    /// Also show the INT8 readiness of each fused weight convert would write (fuses every
    /// block, so it reads every weight twice; `convert` reports them anyway).
    #[arg(long)]
    int8: bool,
}

#[derive(Args, Debug)]
struct ConvertArgs {
    /// The train-form checkpoint (safetensors, or a PyTorch .pth/.pt/.bin).
    #[arg(value_name = "INPUT")]
    input: Option<PathBuf>,
    /// Where to write the deploy-form checkpoint.
    #[arg(short, long, value_name = "OUTPUT")]
    output: Option<PathBuf>,
    /// Where to write the JSON report [default: beside the output, `<stem>.report.json`]; `-`
    /// writes it to stdout (and the summary to stderr).
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Re-read the written file and run every block fused and unfused; exit 1 if any is off.
    #[arg(long)]
    verify: bool,
    /// Cast every floating-point tensor of the output to this dtype.
    #[arg(long, value_enum)]
    dtype: Option<OutDtype>,
    #[command(flatten)]
    run: RunArgs,
}

/// What convert and verify share: how blocks are found and compared, what CI gets, verbosity.
#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    ci: CiArgs,
    #[command(flatten)]
    find: FindArgs,
    #[command(flatten)]
    check: CheckArgs,
    /// No summary and no progress bar: only errors and failures are printed.
    #[arg(short, long)]
    quiet: bool,
}

/// What CI systems read besides the exit code. (`$GITHUB_STEP_SUMMARY` and
/// `GITHUB_ACTIONS=true` are read from the environment.)
#[derive(Args, Debug, Clone)]
struct CiArgs {
    /// Write the verification as JUnit XML here: a testcase per block and per deploy-file
    /// check (missing, extra, altered tensors). Needs --verify when converting.
    #[arg(long, value_name = "PATH")]
    junit: Option<PathBuf>,
}

/// How blocks are found.
#[derive(Args, Debug, Clone)]
struct FindArgs {
    /// Use this layout instead of detecting one: official, timm-repvgg, timm-mobileone,
    /// apple-mobileone, mmpretrain-repvgg, mmpretrain-mobileone, yolov7, ultralytics,
    /// timm-fastvit, timm-repvit, timm-repghostnet, timm-ghostnetv3, timm-lcnetv2, replknet,
    /// unireplknet, acnet, dbb, timm-levit, timm-tinyvit, timm-efficientvit-msra, timm-shvit,
    /// timm-iformer, ultralytics-repvggdw, rtdetr-repvgg, sg-alpha-repvgg, sg-qarepvgg,
    /// sg-qarepvgg-partial, yolov6-qarepvgg, yolov6-qarepvgg-v2, doctr-fast, apple-mobileclip,
    /// repnext, mmpretrain-repmlp, mmpretrain-riformer, orepa, and for --fold-bn ultralytics-fold, doctr-fold (README's layout table says which models
    /// use each).
    #[arg(long, value_name = "NAME")]
    layout: Option<String>,
    /// Read layouts from this JSON file (one layout or an array; see README) instead of the
    /// built-in table.
    #[arg(long, value_name = "PATH")]
    layout_file: Option<PathBuf>,
    /// BN ε [default: the layout's: 1e-3 for yolov7 and ultralytics, else 1e-5].
    #[arg(long, value_name = "X", value_parser = non_negative)]
    bn_eps: Option<f64>,
    /// In a PyTorch checkpoint, read the weights from this entry (dotted for nesting, e.g.
    /// `state_dict_ema` or `model.ema`) [default: a top-level dict of tensors, or the one entry
    /// among state_dict, model, ema, model_ema, state_dict_ema, module, net, params that holds
    /// tensors; of a raw/EMA pair, the one the framework's loader reads, with a warning].
    #[arg(long, value_name = "NAME")]
    key: Option<String>,
    /// Keep a `module.` prefix (DataParallel) that every name of a PyTorch checkpoint carries
    /// [default: dropped, and the report says so].
    #[arg(long)]
    keep_prefix: bool,
    /// Whether block PREFIX has its tensorless identity (QARepVGG's identity and V2's
    /// average), whatever the layout's rule (in == out) says: `PREFIX=on` or `PREFIX=off`;
    /// repeatable.
    #[arg(long, value_name = "PREFIX=on|off", value_parser = parse_identity)]
    identity: Vec<(String, bool)>,
    /// Also fold every Conv→BN pair outside the multi-branch blocks, as the framework's own
    /// fuse does (ultralytics' fuse(), docTR's reparameterize()), under its fused names.
    #[arg(long)]
    fold_bn: bool,
}

/// `PREFIX=on|off` for `--identity`.
fn parse_identity(s: &str) -> Result<(String, bool), String> {
    match s.rsplit_once('=') {
        Some((prefix, "on")) if !prefix.is_empty() => Ok((prefix.to_string(), true)),
        Some((prefix, "off")) if !prefix.is_empty() => Ok((prefix.to_string(), false)),
        _ => Err(format!("`{s}` is not PREFIX=on or PREFIX=off")),
    }
}

/// How the fused and unfused blocks are compared.
#[derive(Args, Debug, Clone)]
struct CheckArgs {
    /// Verification input size HxW [default: 8x8, or the kernel size if larger].
    #[arg(long, value_name = "HxW", value_parser = parse_size)]
    input_size: Option<[usize; 2]>,
    /// Images per block in verification.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Seed of the random inputs.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// Absolute tolerance [default by dtype: F32 1e-6, F16 1e-3, BF16 1e-2, F64 1e-12].
    #[arg(long, value_name = "X", value_parser = non_negative)]
    atol: Option<f64>,
    /// Relative tolerance, against max |unfused| of the block [default by dtype: F32 1e-5,
    /// F16 1e-2, BF16 5e-2, F64 1e-10].
    #[arg(long, value_name = "X", value_parser = non_negative)]
    rtol: Option<f64>,
    /// Exit 1 (listing them) if any fused block's per-channel INT8 SQNR is below X dB
    /// (`blocks[i].int8.per_channel_sqnr_db`; the deploy file is still written).
    #[arg(long, value_name = "X", value_parser = finite)]
    int8_min_db: Option<f64>,
    /// ONNX graphs: the shape to run a graph input at in verification, `NxCxHxW` (a graph of
    /// one input) or `name:NxCxHxW`; needed where the graph's input has symbolic dims
    /// (repeatable).
    #[arg(long, value_name = "SHAPE")]
    input_shape: Vec<String>,
    /// In verification, also measure each block's output SQNR with per-channel INT8 weights
    /// against its float output (`blocks[i].int8.output_sqnr_db`; an f32 GEMM per block).
    #[arg(long)]
    int8_output: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum OutDtype {
    F32,
    F16,
    Bf16,
}

impl From<OutDtype> for Dtype {
    fn from(d: OutDtype) -> Dtype {
        match d {
            OutDtype::F32 => Dtype::F32,
            OutDtype::F16 => Dtype::F16,
            OutDtype::Bf16 => Dtype::BF16,
        }
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a finite number ≥ 0")),
    }
}

fn finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` is not a finite number")),
    }
}

fn parse_size(s: &str) -> Result<[usize; 2], String> {
    let bad = || format!("`{s}` is not a size like 16x16");
    let (h, w) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    let w: usize = w.trim().parse().map_err(|_| bad())?;
    if h == 0 || w == 0 || h > 4096 || w > 4096 {
        return Err(format!("`{s}`: each side must be between 1 and 4096"));
    }
    Ok([h, w])
}

/// The settings of a run: how blocks are found, compared (`check`, for convert and verify),
/// cast, and what CI gets.
fn settings(
    find: &FindArgs,
    check: Option<&CheckArgs>,
    dtype: Option<OutDtype>,
    ci: CiOutputs,
) -> Settings {
    Settings {
        find: FindOptions {
            layout: find.layout.clone(),
            layout_file: find.layout_file.clone(),
            bn_eps: find.bn_eps,
            identity: find.identity.iter().cloned().collect(),
            fold_bn: find.fold_bn,
        },
        check: check.map_or_else(CheckOptions::default, |check| CheckOptions {
            seed: check.seed,
            input_size: check.input_size,
            batch: check.batch as usize,
            atol: check.atol,
            rtol: check.rtol,
            int8: check.int8_output,
            input_shapes: check.input_shape.clone(),
        }),
        cast: dtype.map(Dtype::from),
        read: ReadOptions {
            key: find.key.clone(),
            keep_prefix: find.keep_prefix,
        },
        int8_min_db: check.and_then(|c| c.int8_min_db),
        ci,
    }
}

/// What CI gets: `--junit`, and the job summary at `$GITHUB_STEP_SUMMARY`. (A conversion
/// without `verify` is refused `--junit` by the library first, whatever its path.)
fn ci_outputs(args: &CiArgs, verify: bool, started: RunStart) -> Result<CiOutputs> {
    if verify && args.junit.as_deref().is_some_and(is_stdout) {
        bail!("--junit needs a file path; only --report can be `-` (stdout)");
    }
    let job_summary = std::env::var_os("GITHUB_STEP_SUMMARY")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    Ok(CiOutputs {
        junit: args.junit.clone(),
        job_summary,
        started,
    })
}

/// The machine's name, for the JUnit file (`localhost` when unknown).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The progress bar, as the library's [`Progress`].
struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }

    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    fn stage(&self, name: &str) {
        self.0.set_message(name.to_string());
    }
}

fn progress_bar(quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:10} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("fusing");
    bar
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
fn print(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn main() -> ExitCode {
    let started = RunStart::now(hostname());
    let cancel = Cancel::new();
    let flag = cancel.flag();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal sets the flag: the run stops at the next chunk and removes its temp
        // files. A second one while the flag is set exits at once, for a run that does not
        // stop (the order of registration matters: the check runs before the flag is set).
        // If registration fails the default action (exit) stays, which loses no data either.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 2, flag.clone());
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    match run(started, &cancel) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            if github_actions() {
                eprintln!(
                    "{}",
                    github::github_error("repvgg-fuse", &format!("{err:#}"))
                );
            }
            ExitCode::from(2)
        }
    }
}

fn run(started: RunStart, cancel: &Cancel) -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Verify(args)) => run_verify(args, started, cancel),
        Some(Command::Lint(args)) => run_lint(&args, started),
        Some(Command::Inspect(args)) => {
            let mut s = settings(&args.find, None, args.dtype, CiOutputs::default());
            s.check.int8 = args.int8;
            let inspection = repvgg_fuse::inspect(&args.input, &s)?;
            print_warnings(&inspection.warnings);
            if args.json {
                print(&format!("{}\n", serde_json::to_string_pretty(&inspection)?));
            } else {
                print(&text::inspection(&inspection));
            }
            Ok(ExitCode::SUCCESS)
        }
        None => run_convert(cli.convert, started, cancel),
    }
}

fn run_convert(args: ConvertArgs, started: RunStart, cancel: &Cancel) -> Result<ExitCode> {
    let (Some(input), Some(output)) = (&args.input, &args.output) else {
        let missing = if args.input.is_none() {
            "INPUT"
        } else {
            "-o OUTPUT"
        };
        eprintln!(
            "error: {missing} is required\n\nUsage: repvgg-fuse INPUT -o OUTPUT [--verify]\n       repvgg-fuse verify TRAIN DEPLOY\n       repvgg-fuse inspect INPUT\n\nFor more information, try '--help'."
        );
        return Ok(ExitCode::from(2));
    };
    let report = match args.report.as_deref() {
        None => ReportTo::Beside,
        Some(p) if is_stdout(p) => ReportTo::Caller,
        Some(p) => ReportTo::File(p),
    };
    let ci = ci_outputs(&args.run.ci, args.verify, started)?;
    let s = settings(&args.run.find, Some(&args.run.check), args.dtype, ci);
    let bar = Bar(progress_bar(args.run.quiet));
    let hooks = Hooks {
        progress: &bar,
        cancel,
    };
    let outcome = repvgg_fuse::convert(input, output, report, &s, args.verify, hooks);
    bar.0.finish_and_clear();
    publish(
        &outcome?,
        args.run.quiet,
        matches!(report, ReportTo::Caller),
    )
}

fn run_verify(args: VerifyArgs, started: RunStart, cancel: &Cancel) -> Result<ExitCode> {
    let report_file = args.report.as_deref().filter(|p| !is_stdout(p));
    let ci = ci_outputs(&args.run.ci, true, started)?;
    let s = settings(&args.run.find, Some(&args.run.check), None, ci);
    let hooks = Hooks {
        progress: &Silent,
        cancel,
    };
    let outcome = repvgg_fuse::verify_files(&args.train, &args.deploy, report_file, &s, hooks)?;
    let report_to_stdout = args.report.as_deref().is_some_and(is_stdout);
    publish(&outcome, args.run.quiet, report_to_stdout)
}

/// `-` as a path: stdout.
fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == "-"
}

fn run_lint(args: &LintArgs, started: RunStart) -> Result<ExitCode> {
    let to_stdout = args.report.as_deref().is_some_and(is_stdout);
    let file = args.report.as_deref().filter(|p| !is_stdout(p));
    let ci = CiArgs {
        junit: args.junit.clone(),
    };
    let s = Settings {
        ci: ci_outputs(&ci, true, started)?,
        ..Settings::default()
    };
    let found = repvgg_fuse::app::lint_file(&args.graph, file, &s)?;
    let text = repvgg_fuse::report::lint::text(&found);
    if to_stdout {
        eprint!("{text}");
        print(&format!("{}\n", serde_json::to_string_pretty(&found)?));
    } else if !(args.quiet && found.passed()) {
        print(&text);
    }
    if github_actions() {
        for line in github::lint_errors(&found) {
            eprintln!("{line}");
        }
    }
    Ok(if found.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_warnings(warnings: &[Warning]) {
    for w in warnings {
        eprintln!("{}", text::warning(w));
    }
}

/// Tells a finished run (its files are in place): the warnings, failures and INT8 gate on
/// stderr, the summary on stdout (stderr under `--report -`, when the JSON report is the only
/// thing on stdout; none with `quiet`), the `::error` lines under GitHub Actions; returns 0,
/// or 1 when the run did not pass.
fn publish(outcome: &Outcome, quiet: bool, report_to_stdout: bool) -> Result<ExitCode> {
    let r = &outcome.report;
    print_warnings(&r.warnings);
    if !r.verified() {
        eprint!("{}", text::failures(r));
    }
    if let Some(gate) = &outcome.int8_gate {
        eprint!("{}", text::int8_gate(gate, r.blocks.len()));
    }
    let summary = if quiet {
        String::new()
    } else {
        text::summary(r, outcome.report_path.as_deref())
    };
    if report_to_stdout {
        eprint!("{summary}");
        print(&format!("{}\n", serde_json::to_string_pretty(r)?));
    } else {
        print(&summary);
    }
    if github_actions() {
        for line in github::github_errors(r) {
            eprintln!("{line}");
        }
    }
    Ok(if outcome.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn github_actions() -> bool {
    std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true")
}

/// mimalloc keeps freed pages for reuse; with the system allocator every large buffer of a
/// chunk came back from the kernel as fresh zeroed pages, and the page faults showed in
/// profiles of both conversion and verification.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
