//! The `repvgg-fuse` command line: parses, calls the library, prints, picks the exit code.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use repvgg_fuse::convert::{Outcome, Settings};
use repvgg_fuse::inspect::Inspection;
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
    Verify {
        /// The train-form checkpoint.
        train: PathBuf,
        /// The deploy-form checkpoint to judge.
        deploy: PathBuf,
        /// Also write the JSON report here.
        #[arg(long, value_name = "PATH")]
        report: Option<PathBuf>,
        #[command(flatten)]
        find: FindArgs,
        #[command(flatten)]
        check: CheckArgs,
        /// Print nothing but errors and failures.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show the layout and blocks found, and what the deploy file would hold.
    Inspect {
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
    },
}

#[derive(Args, Debug)]
struct ConvertArgs {
    /// The train-form checkpoint (.safetensors).
    #[arg(value_name = "INPUT")]
    input: Option<PathBuf>,
    /// Where to write the deploy-form checkpoint.
    #[arg(short, long, value_name = "OUTPUT")]
    output: Option<PathBuf>,
    /// Where to write the JSON report [default: beside the output, `<stem>.report.json`].
    #[arg(long, value_name = "PATH")]
    report: Option<PathBuf>,
    /// Re-read the written file and run every block fused and unfused; exit 1 if any is off.
    #[arg(long)]
    verify: bool,
    /// Cast every floating-point tensor of the output to this dtype.
    #[arg(long, value_enum)]
    dtype: Option<OutDtype>,
    #[command(flatten)]
    find: FindArgs,
    #[command(flatten)]
    check: CheckArgs,
    /// No summary and no progress bar.
    #[arg(short, long)]
    quiet: bool,
}

/// How blocks are found.
#[derive(Args, Debug, Clone)]
struct FindArgs {
    /// Use this layout instead of detecting one (official, timm-repvgg, timm-mobileone,
    /// apple-mobileone, mmpretrain-repvgg, mmpretrain-mobileone, yolov7, ultralytics).
    #[arg(long, value_name = "NAME")]
    layout: Option<String>,
    /// Read layouts from this JSON file (one layout or an array; see README) instead of the
    /// built-in table.
    #[arg(long, value_name = "PATH")]
    layout_file: Option<PathBuf>,
    /// BN ε [default: the layout's: 1e-3 for yolov7 and ultralytics, else 1e-5].
    #[arg(long, value_name = "X", value_parser = non_negative)]
    bn_eps: Option<f64>,
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

fn settings(find: &FindArgs, check: &CheckArgs, dtype: Option<OutDtype>) -> Settings {
    Settings {
        layout: find.layout.clone(),
        layout_file: find.layout_file.clone(),
        bn_eps: find.bn_eps,
        dtype: dtype.map(Dtype::from),
        seed: check.seed,
        input_size: check.input_size,
        batch: check.batch as usize,
        atol: check.atol,
        rtol: check.rtol,
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
    let flag = repvgg_fuse::interrupt_flag();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal sets the flag: the run stops at the next chunk and removes its temp
        // files. A second one while the flag is set exits at once, for a run that does not
        // stop (the order of registration matters: the check runs before the flag is set).
        // If registration fails the default action (exit) stays, which loses no data either.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 2, flag.clone());
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    match run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Verify {
            train,
            deploy,
            report,
            find,
            check,
            quiet,
        }) => {
            let s = settings(&find, &check, None);
            let outcome = repvgg_fuse::verify_files(&train, &deploy, &s)?;
            if let Some(path) = &report {
                repvgg_fuse::convert::write_report(&outcome.report, path, &[&train, &deploy])?;
            }
            Ok(finish(&outcome, quiet, None, check.int8_min_db))
        }
        Some(Command::Inspect {
            input,
            json,
            find,
            dtype,
        }) => {
            let s = settings(&find, &CheckArgs::default_values(), dtype);
            let inspection = repvgg_fuse::inspect(&input, &s)?;
            if json {
                print(&format!("{}\n", serde_json::to_string_pretty(&inspection)?));
            } else {
                print(&inspection_text(&inspection));
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let args = cli.convert;
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
            let s = settings(&args.find, &args.check, args.dtype);
            let bar = progress_bar(args.quiet);
            let outcome =
                repvgg_fuse::convert(input, output, args.report.as_deref(), &s, args.verify, &bar);
            bar.finish_and_clear();
            Ok(finish(
                &outcome?,
                args.quiet,
                Some(output),
                args.check.int8_min_db,
            ))
        }
    }
}

impl CheckArgs {
    fn default_values() -> Self {
        CheckArgs {
            input_size: None,
            batch: 1,
            seed: 0,
            atol: None,
            rtol: None,
            int8_min_db: None,
        }
    }
}

/// Prints the summary (stdout) and failures (stderr); returns 0, or 1 for a failed verify or
/// a block under `--int8-min-db`.
fn finish(
    outcome: &Outcome,
    quiet: bool,
    output: Option<&Path>,
    int8_min_db: Option<f64>,
) -> ExitCode {
    let r = &outcome.report;
    let s = &r.summary;
    let mut text = String::new();
    if !quiet {
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
                .map_or(String::new(), |p| p.display().to_string());
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
    }
    let code = match &r.verify {
        Some(v) if !v.passed => {
            for f in &v.failures {
                eprintln!("verify: FAILED `{}`: {}", f.name, f.reason);
            }
            let block_failures = v
                .failures
                .iter()
                .filter(|f| r.blocks.iter().any(|b| b.block.name == f.name))
                .count();
            eprintln!(
                "verify: FAILED: {block_failures} of {} blocks, {} other tensors (atol {:e}, rtol {:e}, {}×{}×{} input, seed {}){}",
                s.blocks,
                v.failures.len() - block_failures,
                v.atol,
                v.rtol,
                v.batch,
                v.input_size[0],
                v.input_size[1],
                v.seed,
                if output.is_some() {
                    "; the deploy file was not written"
                } else {
                    ""
                }
            );
            ExitCode::from(1)
        }
        Some(v) => {
            if !quiet {
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
            ExitCode::SUCCESS
        }
        None => ExitCode::SUCCESS,
    };
    let code = match int8_min_db {
        Some(min) if !int8_gate(r, min) => ExitCode::from(1),
        _ => code,
    };
    print(&text);
    code
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
fn int8_gate(r: &repvgg_fuse::report::Report, min: f64) -> bool {
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
            b.branches.join(" + "),
            if b.identity { "" } else { " (no identity)" },
            k = b.kernel
        );
        if let Some(q) = int8 {
            let db = |v: Option<f64>| v.map_or("exact".to_string(), |v| format!("{v:.2} dB"));
            say!(
                text,
                "  {:<32} INT8 SQNR per-tensor {}, per-channel {}, worst channel {}{}, range ratio {}",
                "",
                db(q.per_tensor_sqnr_db),
                db(q.per_channel_sqnr_db),
                db(q.worst_channel_sqnr_db),
                q.worst_channel
                    .map_or(String::new(), |c| format!(" (#{c})")),
                q.channel_range_ratio
                    .map_or("-".to_string(), |r| format!("{r:.1}"))
            );
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
