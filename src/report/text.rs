//! What the binary prints: the summary of a run (stdout), its failures and the INT8 gate's
//! (stderr), warnings, and `inspect`'s listing. Each is a pure function of the report types;
//! the binary decides where the text goes.

use std::fmt::Write as _;
use std::path::Path;

use super::{
    BlockReport, Failure, FailureKind, Inspection, Int8Gate, OutputSource, Report, Warning,
};
use crate::deviation::WorstElement;
use crate::int8::{Int8Report, Int8Summary};

/// Appends a line to `$buf`.
macro_rules! say {
    ($buf:expr, $($arg:tt)*) => {{
        let _ = writeln!($buf, $($arg)*);
    }};
}

/// The summary of a run: what was fused or checked, the sizes, the worst deviation, INT8,
/// what was written (for a conversion, with the report at `report_path`, or on stdout when
/// none), and the verification's verdict when it passed.
pub fn summary(r: &Report, report_path: Option<&Path>) -> String {
    let s = &r.summary;
    let mut text = String::new();
    let verb = if r.converting() { "fused" } else { "checked" };
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
    // A graph judged only whole has no block figures to tell.
    let graph_only = r.verify.as_ref().is_some_and(|v| v.input_size == [0, 0]);
    if let Some(worst) = s.worst_block.as_ref().filter(|_| !graph_only) {
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
    if r.converting() {
        written(&mut text, r, report_path);
    }
    if let Some(g) = &r.graph {
        let worst = (g.outputs.iter()).fold(0.0f64, |m, o| m.max(o.max_rel_deviation));
        say!(
            text,
            "graph: both graphs run whole on {} (seed {}): {} outputs, worst {:.3e} of the output's max (tolerance atol {:e} + rtol {:e}){}",
            g.inputs.join(", "),
            g.seed,
            g.outputs.len(),
            worst,
            g.atol,
            g.rtol,
            if g.passed { "" } else { ": FAILED" }
        );
    }
    let by_blocks = r.verify.as_ref().is_some_and(|v| v.input_size != [0, 0]);
    if let Some(v) = r.verify.as_ref().filter(|v| v.passed && !by_blocks) {
        say!(
            text,
            "verify: passed: the deploy graph computes the train graph's outputs (its merged weights are named its own way, so its blocks were not run one by one; seed {})",
            v.seed
        );
    }
    if let Some(v) = r.verify.as_ref().filter(|v| v.passed && by_blocks) {
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

/// The summary's line on what a conversion wrote.
fn written(text: &mut String, r: &Report, report_path: Option<&Path>) {
    let report = report_path.map_or("on stdout".to_string(), |p| p.display().to_string());
    if r.verified() {
        say!(
            text,
            "wrote {} ({} bytes), report {report}",
            r.output,
            r.summary.bytes_out
        );
    } else {
        say!(
            text,
            "wrote the report {report}; not the deploy file, which failed verification"
        );
    }
}

/// The failures of a verification, a line each, then the count (empty when none ran).
pub fn failures(r: &Report) -> String {
    let mut text = String::new();
    let Some(v) = &r.verify else { return text };
    for f in &v.failures {
        say!(text, "verify: FAILED `{}`: {}", f.name, f.reason);
    }
    let block_failures = v.block_failures();
    say!(
        text,
        "verify: FAILED: {block_failures} of {} blocks, {} other tensors (atol {:e}, rtol {:e}, {}×{}×{} input, seed {}){}",
        r.summary.blocks,
        v.failures.len() - block_failures,
        v.atol,
        v.rtol,
        v.batch,
        v.input_size[0],
        v.input_size[1],
        v.seed,
        if r.converting() {
            "; the deploy file was not written"
        } else {
            ""
        }
    );
    text
}

/// The summary line on INT8: the worst block for per-tensor INT8.
pub fn int8_line(i: &Int8Summary) -> String {
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

/// `--int8-min-db`'s failures: a line per low block, then the count out of `blocks` (empty
/// when the gate passed).
pub fn int8_gate(gate: &Int8Gate, blocks: usize) -> String {
    let mut text = String::new();
    let min = gate.min_db;
    for low in &gate.low {
        say!(
            text,
            "int8: FAILED `{}`: per-channel SQNR {:.2} dB is below --int8-min-db {min}",
            low.name,
            low.per_channel_sqnr_db
        );
    }
    if !gate.low.is_empty() {
        say!(
            text,
            "int8: FAILED: {} of {blocks} blocks below {min} dB per-channel INT8 SQNR",
            gate.low.len()
        );
    }
    text
}

/// A warning as printed: `warning: …`.
pub fn warning(w: &Warning) -> String {
    format!("warning: {}", w.message)
}

/// One block's INT8 figures, for `inspect`.
pub fn int8_block(q: &Int8Report) -> String {
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

/// `inspect`'s listing: the layout, each block (with its INT8 figures), what is left alone,
/// and what the deploy file would hold.
pub fn inspection(i: &Inspection) -> String {
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
    for block in &i.blocks {
        let b = &block.block;
        let groups = b.groups.map_or("?".to_string(), |g| g.to_string());
        let cin = b.in_channels.map_or("?".to_string(), |c| c.to_string());
        say!(
            text,
            "  {:<32} {}→{} ch, groups {groups}, {kh}×{kw}, {}{}",
            b.name,
            cin,
            b.out_channels,
            b.ops.join(" + "),
            if b.identity { "" } else { " (no identity)" },
            kh = b.kernel_shape[0],
            kw = b.kernel_shape[1],
        );
        if let Some(g) = &b.graph_nodes {
            say!(
                text,
                "  {:<32} merges {} nodes into {} `{}`: {}",
                "",
                g.nodes.len(),
                g.merged_op,
                g.merged_node,
                g.nodes.join(", ")
            );
        }
        if let (Some(abs), Some(rel)) = (block.max_abs_deviation, block.max_rel_deviation) {
            say!(
                text,
                "  {:<32} probe deviation {abs:.3e} absolute, {rel:.3e} relative",
                ""
            );
        }
        if let Some(q) = &block.int8 {
            say!(text, "{}", int8_block(q));
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
    if let (Some(n_in), Some(n_out)) = (i.nodes_in, i.nodes_out) {
        say!(text, "graph: {n_in} nodes → {n_out} after merging");
    }
    let count = |source| i.output.iter().filter(|o| o.source == source).count();
    say!(
        text,
        "would write {} tensors ({} fused, {} copied, {} cast)",
        i.output.len(),
        count(OutputSource::Fused),
        count(OutputSource::Copy),
        count(OutputSource::Cast)
    );
    text
}

/// One line on a failure: for a block run both ways, the deviation, the tolerance it was held
/// to and the worst element; else the reason.
pub fn failure_message(block: Option<&BlockReport>, f: &Failure) -> String {
    let (Some(abs), Some(rel), Some([atol, rtol])) =
        (f.max_abs_deviation, f.max_rel_deviation, f.tolerance)
    else {
        return match f.kind {
            FailureKind::Block => format!("block `{}`: {}", f.name, f.reason),
            _ => format!("tensor `{}`: {}", f.name, f.reason),
        };
    };
    let mut m = format!(
        "block `{}`: max |fused − unfused| {abs:.3e} (relative {rel:.3e}) is over atol {atol:.1e} + rtol {rtol:.1e}",
        f.name
    );
    if let Some(b) = block {
        let _ = write!(m, " × max |unfused| {:.3e}", b.max_abs_output);
    }
    if let Some(w) = &f.worst_element {
        let _ = write!(m, "; worst at {}", element(w));
    }
    m
}

/// "image 0, channel 3, y 2, x 5 (fused 1.234e0, unfused 1.255e0)".
pub fn element(w: &WorstElement) -> String {
    format!(
        "image {}, channel {}, y {}, x {} (fused {:.6e}, unfused {:.6e})",
        w.image, w.channel, w.y, w.x, w.fused, w.unfused
    )
}

/// The report entry of the block a failure is about, if it is a block.
pub fn block_of<'a>(report: &'a Report, f: &Failure) -> Option<&'a BlockReport> {
    report.blocks.iter().find(|b| b.block.name == f.name)
}
