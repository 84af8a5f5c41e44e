//! The `repvgg-fuse` command line: parses, calls the library, prints, picks the exit code.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use repvgg_fuse::app::export::{self, RunInfo};
use repvgg_fuse::app::{
    CheckOptions, FindOptions, Inspection, Outcome, ReportTo, Settings, default_report_path,
};
use repvgg_fuse::checkpoint::ReadOptions;
use repvgg_fuse::progress::{Cancel, Hooks, Progress, Silent};
use repvgg_fuse::report::{FailureKind, Report};
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
    /// timm-iformer (README's layout table says which models use each).
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
    /// tensors].
    #[arg(long, value_name = "NAME")]
    key: Option<String>,
    /// Keep a `module.` prefix (DataParallel) that every name of a PyTorch checkpoint carries
    /// [default: dropped, and the report says so].
    #[arg(long)]
    keep_prefix: bool,
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

fn settings(find: &FindArgs, check: Option<&CheckArgs>, dtype: Option<OutDtype>) -> Settings {
    Settings {
        find: FindOptions {
            layout: find.layout.clone(),
            layout_file: find.layout_file.clone(),
            bn_eps: find.bn_eps,
        },
        check: check.map_or_else(CheckOptions::default, |check| CheckOptions {
            seed: check.seed,
            input_size: check.input_size,
            batch: check.batch as usize,
            atol: check.atol,
            rtol: check.rtol,
        }),
        cast: dtype.map(Dtype::from),
        read: ReadOptions {
            key: find.key.clone(),
            keep_prefix: find.keep_prefix,
        },
    }
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

/// Appends a line to the text that goes to stdout.
macro_rules! say {
    ($buf:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($buf, $($arg)*);
    }};
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
fn print(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn main() -> ExitCode {
    let clock = Clock::start();
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
    match run(&clock, &cancel) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            if github_actions() {
                eprintln!(
                    "{}",
                    export::github_error("repvgg-fuse", &format!("{err:#}"))
                );
            }
            ExitCode::from(2)
        }
    }
}

fn run(clock: &Clock, cancel: &Cancel) -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Verify(args)) => run_verify(args, clock, cancel),
        Some(Command::Inspect(args)) => {
            let s = settings(&args.find, None, args.dtype);
            let inspection = repvgg_fuse::inspect(&args.input, &s)?;
            if args.json {
                print(&format!("{}\n", serde_json::to_string_pretty(&inspection)?));
            } else {
                print(&inspection_text(&inspection));
            }
            Ok(ExitCode::SUCCESS)
        }
        None => run_convert(cli.convert, clock, cancel),
    }
}

fn run_convert(args: ConvertArgs, clock: &Clock, cancel: &Cancel) -> Result<ExitCode> {
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
    if let Some(junit) = &args.run.ci.junit {
        if !args.verify {
            bail!(
                "--junit needs --verify: without it no block is held to a tolerance, so there are no test results to write"
            );
        }
        let report_file = match report {
            ReportTo::Beside => Some(default_report_path(output)),
            ReportTo::File(p) => Some(p.to_path_buf()),
            ReportTo::Caller => None,
        };
        let mut files = vec![input.as_path(), output.as_path()];
        files.extend(report_file.as_deref());
        check_junit(junit, &files)?;
    }
    let s = settings(&args.run.find, Some(&args.run.check), args.dtype);
    let bar = Bar(progress_bar(args.run.quiet));
    let hooks = Hooks {
        progress: &bar,
        cancel,
    };
    let outcome = repvgg_fuse::convert(input, output, report, &s, args.verify, hooks);
    bar.0.finish_and_clear();
    publish(
        &outcome?,
        &Publish {
            quiet: args.run.quiet,
            output: Some(output),
            report_to_stdout: matches!(report, ReportTo::Caller),
            junit: args.run.ci.junit.as_deref(),
            clock,
            int8_min_db: args.run.check.int8_min_db,
        },
    )
}

fn run_verify(args: VerifyArgs, clock: &Clock, cancel: &Cancel) -> Result<ExitCode> {
    let report_file = args.report.as_deref().filter(|p| !is_stdout(p));
    if let Some(junit) = &args.run.ci.junit {
        let mut files = vec![args.train.as_path(), args.deploy.as_path()];
        files.extend(report_file);
        check_junit(junit, &files)?;
    }
    let s = settings(&args.run.find, Some(&args.run.check), None);
    let hooks = Hooks {
        progress: &Silent,
        cancel,
    };
    let outcome = repvgg_fuse::verify_files(&args.train, &args.deploy, &s, hooks)?;
    if let Some(path) = report_file {
        repvgg_fuse::app::write_report(&outcome.report, path, &[&args.train, &args.deploy])?;
    }
    publish(
        &outcome,
        &Publish {
            quiet: args.run.quiet,
            output: None,
            report_to_stdout: args.report.as_deref().is_some_and(is_stdout),
            junit: args.run.ci.junit.as_deref(),
            clock,
            int8_min_db: args.run.check.int8_min_db,
        },
    )
}

/// `-` as a path: stdout.
fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// Refuses a JUnit path before the run, so that a bad one writes nothing.
fn check_junit(junit: &Path, files: &[&Path]) -> Result<()> {
    if is_stdout(junit) {
        bail!("--junit needs a file path; only --report can be `-` (stdout)");
    }
    export::check_junit_path(junit, files)?;
    Ok(())
}

/// When the run started, for the JUnit file.
struct Clock {
    instant: Instant,
    epoch_seconds: u64,
}

impl Clock {
    fn start() -> Self {
        Clock {
            instant: Instant::now(),
            epoch_seconds: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    fn run_info(&self) -> RunInfo {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        RunInfo {
            seconds: self.instant.elapsed().as_secs_f64(),
            started: self.epoch_seconds,
            hostname,
        }
    }
}

/// How a finished run is told.
struct Publish<'a> {
    quiet: bool,
    /// The deploy file written (convert), or none (verify).
    output: Option<&'a Path>,
    /// `--report -`: the JSON report is the only thing on stdout.
    report_to_stdout: bool,
    junit: Option<&'a Path>,
    clock: &'a Clock,
    /// `--int8-min-db`.
    int8_min_db: Option<f64>,
}

/// Writes the JUnit file, prints the summary (stdout, or stderr under `--report -`), the
/// failures (stderr) and the JSON report if it goes to stdout, appends the job summary and the
/// `::error` lines under GitHub Actions; returns 0, or 1 for a failed verify.
fn publish(outcome: &Outcome, p: &Publish) -> Result<ExitCode> {
    let r = &outcome.report;
    if let Some(path) = p.junit {
        export::write_junit(path, &export::junit(r, &p.clock.run_info()))?;
    }
    let mut code = if outcome.passed() {
        ExitCode::SUCCESS
    } else {
        print_failures(r, p.output.is_some());
        ExitCode::from(1)
    };
    if p.int8_min_db.is_some_and(|min| !int8_gate(r, min)) {
        code = ExitCode::from(1);
    }
    let text = if p.quiet {
        String::new()
    } else {
        summary_text(outcome, p.output)
    };
    if p.report_to_stdout {
        eprint!("{text}");
        print(&format!("{}\n", serde_json::to_string_pretty(r)?));
    } else {
        print(&text);
    }
    if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty()) {
        if let Err(e) = append(Path::new(&path), &export::job_summary(r)) {
            eprintln!(
                "warning: cannot append the job summary to {}: {e}",
                Path::new(&path).display()
            );
        }
    }
    if github_actions() {
        for line in export::github_errors(r) {
            eprintln!("{line}");
        }
    }
    Ok(code)
}

fn github_actions() -> bool {
    std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true")
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(text.as_bytes())
}

/// The failures of a verification, on stderr.
fn print_failures(r: &Report, converting: bool) {
    let Some(v) = &r.verify else { return };
    for f in &v.failures {
        eprintln!("verify: FAILED `{}`: {}", f.name, f.reason);
    }
    let block_failures = v
        .failures
        .iter()
        .filter(|f| f.kind == FailureKind::Block)
        .count();
    eprintln!(
        "verify: FAILED: {block_failures} of {} blocks, {} other tensors (atol {:e}, rtol {:e}, {}×{}×{} input, seed {}){}",
        r.summary.blocks,
        v.failures.len() - block_failures,
        v.atol,
        v.rtol,
        v.batch,
        v.input_size[0],
        v.input_size[1],
        v.seed,
        if converting {
            "; the deploy file was not written"
        } else {
            ""
        }
    );
}

/// The text summary of a run.
fn summary_text(outcome: &Outcome, output: Option<&Path>) -> String {
    let r = &outcome.report;
    let s = &r.summary;
    let mut text = String::new();
    let verb = if output.is_some() { "fused" } else { "checked" };
    say!(
        text,
        "{verb} {} blocks ({} layout, {}; BN ε {:e} from {})",
        s.blocks,
        r.layout.name,
        r.layout.chosen_by,
        r.bn_eps.value,
        r.bn_eps.source
    );
    say!(
        text,
        "parameters {} → {}, tensors {} → {}",
        s.parameters_in,
        s.parameters_out,
        s.tensors_in,
        s.tensors_out
    );
    if let Some(worst) = &s.worst_block {
        let input = match r.probe.input_size {
            Some([h, w]) => format!("{}×{h}×{w} random input", r.probe.batch),
            None => "probe input".to_string(),
        };
        say!(
            text,
            "worst deviation: {:.3e} relative, {:.3e} absolute, in block `{worst}` ({input}, seed {})",
            s.max_rel_deviation,
            s.max_abs_deviation,
            r.probe.seed
        );
    }
    if let Some(i) = &s.int8 {
        say!(text, "{}", int8_line(i));
    }
    if let Some(out) = output {
        let report = outcome
            .report_path
            .as_ref()
            .map_or("on stdout".to_string(), |p| p.display().to_string());
        if outcome.passed() {
            say!(
                text,
                "wrote {} ({} bytes), report {report}",
                out.display(),
                s.bytes_out
            );
        } else {
            say!(
                text,
                "wrote the report {report}; not the deploy file, which failed verification"
            );
        }
    }
    if let Some(v) = r.verify.as_ref().filter(|v| v.passed) {
        say!(
            text,
            "verify: passed: every block within atol {:e} + rtol {:e} on {}×{}×{} input; every other tensor identical",
            v.atol,
            v.rtol,
            v.batch,
            v.input_size[0],
            v.input_size[1]
        );
    }
    text
}

/// The summary line on INT8: the worst block for per-tensor INT8.
fn int8_line(i: &repvgg_fuse::int8::Int8Summary) -> String {
    match i.worst_blocks.first() {
        Some(w) => format!(
            "INT8: lowest per-tensor SQNR {:.2} dB in block `{}`; lowest per-channel {}",
            w.per_tensor_sqnr_db,
            w.name,
            i.min_per_channel_sqnr_db
                .map_or("exact".to_string(), |v| format!("{v:.2} dB"))
        ),
        None => "INT8: every fused weight quantizes exactly".to_string(),
    }
}

/// `--int8-min-db`: lists the blocks whose per-channel INT8 SQNR is below `min` on stderr;
/// false if there are any.
fn int8_gate(r: &Report, min: f64) -> bool {
    let low = repvgg_fuse::int8::below(
        r.blocks
            .iter()
            .map(|b| (b.block.name.as_str(), b.int8.as_ref())),
        min,
    );
    for (name, db) in &low {
        eprintln!(
            "int8: FAILED `{name}`: per-channel SQNR {db:.2} dB is below --int8-min-db {min}"
        );
    }
    if !low.is_empty() {
        eprintln!(
            "int8: FAILED: {} of {} blocks below {min} dB per-channel INT8 SQNR",
            low.len(),
            r.blocks.len()
        );
    }
    low.is_empty()
}

/// One block's INT8 figures, for `inspect`.
fn int8_text(q: &repvgg_fuse::int8::Int8Report) -> String {
    let db = |v: Option<f64>| v.map_or("exact".to_string(), |v| format!("{v:.2} dB"));
    format!(
        "  {:<32} INT8 SQNR per-tensor {}, per-channel {}, worst channel {}{}, range ratio {}",
        "",
        db(q.per_tensor_sqnr_db),
        db(q.per_channel_sqnr_db),
        db(q.worst_channel_sqnr_db),
        q.worst_channel
            .map_or(String::new(), |c| format!(" (#{c})")),
        q.channel_range_ratio
            .map_or("-".to_string(), |r| format!("{r:.1}"))
    )
}

fn inspection_text(i: &Inspection) -> String {
    let mut text = String::new();
    say!(
        text,
        "{}: layout {} ({}), BN ε {:e} ({})",
        i.input,
        i.layout.name,
        i.layout.chosen_by,
        i.bn_eps.value,
        i.bn_eps.source
    );
    say!(text, "{} blocks:", i.blocks.len());
    for (b, int8) in i.blocks.iter().map(|b| (&b.block, &b.int8)) {
        let groups = b.groups.map_or("?".to_string(), |g| g.to_string());
        let cin = b.in_channels.map_or("?".to_string(), |c| c.to_string());
        say!(
            text,
            "  {:<32} {}→{} ch, groups {groups}, {k}×{k}, {}{}",
            b.name,
            cin,
            b.out_channels,
            b.ops.join(" + "),
            if b.identity { "" } else { " (no identity)" },
            k = b.kernel
        );
        if let Some(q) = int8 {
            say!(text, "{}", int8_text(q));
        }
    }
    for s in &i.skipped {
        say!(text, "  not fused: {} ({})", s.name, s.reason);
    }
    say!(
        text,
        "{} tensors pass through unchanged",
        i.passthrough.len()
    );
    let fused = i.output.iter().filter(|o| o.source == "fused").count();
    say!(
        text,
        "would write {} tensors ({} fused, {} copied, {} cast)",
        i.output.len(),
        fused,
        i.output.iter().filter(|o| o.source == "copy").count(),
        i.output.iter().filter(|o| o.source == "cast").count()
    );
    text
}

/// mimalloc keeps freed pages for reuse; with the system allocator every large buffer of a
/// chunk came back from the kernel as fresh zeroed pages, and the page faults showed in
/// profiles of both conversion and verification.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
