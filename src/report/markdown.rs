//! The report as a Markdown job summary for `$GITHUB_STEP_SUMMARY`: a pure function of a
//! [`Report`].

use std::fmt::Write as _;

use super::lint::{Lint, flops_text};
use super::text::element;
use super::{BlockReport, Failure, FailureKind, Report};

/// The Markdown for `$GITHUB_STEP_SUMMARY`: the result, the number of blocks, the worst
/// deviation, the failing blocks (or the five worst when none failed), other failures, and
/// the output size. Names are in code spans, other text escaped, so a name cannot break the
/// Markdown.
pub fn job_summary(r: &Report) -> String {
    let s = &r.summary;
    let mut md = String::new();
    let _ = writeln!(md, "### repvgg-fuse {}: {}\n", r.command, headline(r));
    let _ = writeln!(
        md,
        "{} → {} · layout {} ({}) · BN ε {:e} ({})\n",
        code(&r.input),
        code(&r.output),
        code(&r.layout.name),
        text(r.layout.chosen_by.as_str()),
        r.bn_eps.value,
        text(&r.bn_eps.source)
    );
    let _ = writeln!(md, "- **blocks:** {}", s.blocks);
    if let Some(worst) = &s.worst_block {
        let _ = writeln!(
            md,
            "- **worst deviation:** {:.3e} relative, {:.3e} absolute, block {} ({})",
            s.max_rel_deviation,
            s.max_abs_deviation,
            code(worst),
            probe_text(r)
        );
    }
    if let Some(v) = &r.verify {
        let _ = writeln!(
            md,
            "- **tolerance:** atol {:e}, rtol {:e} (by the blocks' dtype unless set)",
            v.atol, v.rtol
        );
    }
    let _ = writeln!(md, "- **output:** {}\n", output_text(r));
    let failed_blocks: Vec<&Failure> = r
        .verify
        .iter()
        .flat_map(|v| &v.failures)
        .filter(|f| f.kind == FailureKind::Block)
        .collect();
    if failed_blocks.is_empty() {
        worst_table(&mut md, r);
    } else {
        failing_table(&mut md, r, &failed_blocks);
    }
    other_failures(&mut md, r);
    md
}

/// The Markdown of a `lint` run for `$GITHUB_STEP_SUMMARY`: the verdict, the node counts
/// before and after merging, what merging would save, a row per mergeable set (its scope, its
/// nodes, the node that would replace them, parameters and FLOPs) and the candidates left
/// alone, with why.
pub fn lint_summary(l: &Lint) -> String {
    let mut md = String::new();
    let headline = if l.passed() {
        "✅ passed: no mergeable branch set".to_string()
    } else {
        format!("❌ FAILED: {} mergeable branch sets", l.unmerged.len())
    };
    let _ = writeln!(md, "### repvgg-fuse lint: {headline}\n");
    let shapes: Vec<String> = l.input_shapes.iter().map(|s| code(s)).collect();
    let _ = writeln!(md, "{} · input {}\n", code(&l.input), shapes.join(", "));
    let _ = writeln!(
        md,
        "- **nodes:** {} → {} after merging",
        group_digits(l.nodes as u64),
        group_digits(l.nodes_after_merge as u64)
    );
    let _ = writeln!(
        md,
        "- **merging saves:** {} parameters, {}\n",
        group_digits(l.parameters_saved as u64),
        text(&flops_text(l.flops_saved))
    );
    if !l.unmerged.is_empty() {
        md.push_str("#### Mergeable branch sets\n\n| set | nodes | would be | parameters saved | FLOPs saved |\n|---|---|---|---:|---:|\n");
        for u in l.unmerged.iter().take(MAX_ROWS) {
            let nodes: Vec<String> = u.graph_nodes.nodes.iter().map(|n| cell_code(n)).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} {} | {} | {} |",
                cell_code(&u.name),
                nodes.join("<br>"),
                text(&u.graph_nodes.merged_op),
                cell_code(&u.graph_nodes.merged_node),
                group_digits(u.parameters_saved as u64),
                u.flops_saved.map_or("–".to_string(), group_digits)
            );
        }
        lint_more(&mut md, l.unmerged.len(), &l.input);
    }
    if !l.skipped.is_empty() {
        md.push_str("#### Left alone\n\n| candidate | why |\n|---|---|\n");
        for s in l.skipped.iter().take(MAX_ROWS) {
            let _ = writeln!(md, "| {} | {} |", cell_code(&s.name), cell(&s.reason));
        }
        lint_more(&mut md, l.skipped.len(), &l.input);
    }
    md
}

/// The rows a lint table left out, counted.
fn lint_more(md: &mut String, rows: usize, input: &str) {
    if rows > MAX_ROWS {
        let _ = writeln!(
            md,
            "\n… and {} more; `repvgg-fuse lint {} --report lint.json` lists them all.",
            rows - MAX_ROWS,
            text(input)
        );
    }
    md.push('\n');
}

/// Rows of a table at most; the rest is counted, and is in the JSON report.
const MAX_ROWS: usize = 50;

fn headline(r: &Report) -> String {
    match &r.verify {
        None => "✅ converted (not verified: deviations are the probe's)".into(),
        Some(v) if v.passed => "✅ passed".into(),
        Some(v) => {
            let blocks = v.block_failures();
            format!(
                "❌ FAILED: {blocks} of {} blocks, {} other tensors",
                r.summary.blocks,
                v.failures.len() - blocks
            )
        }
    }
}

fn probe_text(r: &Report) -> String {
    match r.probe.input_size {
        Some([h, w]) => format!(
            "{}×{h}×{w} random input, seed {}",
            r.probe.batch, r.probe.seed
        ),
        None => format!("probe input, seed {}", r.probe.seed),
    }
}

fn output_text(r: &Report) -> String {
    let size = group_digits(r.summary.bytes_out);
    match r.command.as_str() {
        "convert" if r.verified() => format!("{} written, {size} bytes", code(&r.output)),
        "convert" => format!(
            "{} not written: it failed verification ({size} bytes)",
            code(&r.output)
        ),
        _ => format!("{} judged, {size} bytes", code(&r.output)),
    }
}

fn worst_table(md: &mut String, r: &Report) {
    if r.blocks.is_empty() {
        return;
    }
    let mut blocks: Vec<&BlockReport> = r.blocks.iter().collect();
    // Worst first; a NaN deviation is the worst of all.
    blocks.sort_by(|a, b| {
        let key = |x: &BlockReport| {
            if x.max_rel_deviation.is_nan() {
                f64::INFINITY
            } else {
                x.max_rel_deviation
            }
        };
        key(b).total_cmp(&key(a))
    });
    let _ = writeln!(
        md,
        "#### The {} worst blocks\n\n| block | max abs deviation | max rel deviation |\n|---|---:|---:|",
        blocks.len().min(5)
    );
    for b in blocks.iter().take(5) {
        let _ = writeln!(
            md,
            "| {} | {:.3e} | {:.3e} |",
            cell_code(&b.block.name),
            b.max_abs_deviation,
            b.max_rel_deviation
        );
    }
    md.push('\n');
}

fn failing_table(md: &mut String, r: &Report, failed: &[&Failure]) {
    md.push_str("#### Failing blocks\n\n| block | max abs deviation | max rel deviation | atol, rtol | worst element / reason |\n|---|---:|---:|---|---|\n");
    let num = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.3e}"));
    for f in failed.iter().take(MAX_ROWS) {
        let tol = f
            .tolerance
            .map_or("–".to_string(), |[a, r]| format!("{a:.1e}, {r:.1e}"));
        let last = f
            .worst_element
            .as_ref()
            .map_or_else(|| cell(&f.reason), |w| cell(&element(w)));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {tol} | {last} |",
            cell_code(&f.name),
            num(f.max_abs_deviation),
            num(f.max_rel_deviation)
        );
    }
    more_rows(md, failed.len(), r);
}

fn other_failures(md: &mut String, r: &Report) {
    let others: Vec<&Failure> = r
        .verify
        .iter()
        .flat_map(|v| &v.failures)
        .filter(|f| f.kind != FailureKind::Block)
        .collect();
    if others.is_empty() {
        return;
    }
    md.push_str(
        "#### Deploy-file checks that failed\n\n| tensor | check | reason |\n|---|---|---|\n",
    );
    for f in others.iter().take(MAX_ROWS) {
        let check = f.kind.check_name();
        let _ = writeln!(
            md,
            "| {} | {check} | {} |",
            cell_code(&f.name),
            cell(&f.reason)
        );
    }
    more_rows(md, others.len(), r);
}

fn more_rows(md: &mut String, rows: usize, r: &Report) {
    if rows > MAX_ROWS {
        let _ = writeln!(
            md,
            "\n… and {} more; the JSON report ({}) has them all.",
            rows - MAX_ROWS,
            code(&r.output)
        );
    }
    md.push('\n');
}

/// `n` with thousands separated: 1234567 → "1,234,567".
fn group_digits(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `s` as a Markdown code span: a fence longer than any run of backticks in it, control
/// characters shown as spaces (a newline would end a table row).
fn code(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut longest = 0;
    let mut run = 0;
    for c in s.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat(longest + 1);
    let pad = if s.starts_with('`') || s.ends_with('`') || s.trim().is_empty() {
        " "
    } else {
        ""
    };
    format!("{fence}{pad}{s}{pad}{fence}")
}

/// A code span inside a table cell: GitHub splits cells at `|` even inside code spans unless
/// it is escaped, and shows `\|` there as `|`.
fn cell_code(s: &str) -> String {
    code(s).replace('|', "\\|")
}

/// Plain text with Markdown's and HTML's special characters backslash-escaped.
fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.push(' ');
            continue;
        }
        if "\\`*_[]<>&|~#!$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Plain text in a table cell (`text` already escapes `|`).
fn cell(s: &str) -> String {
    text(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_code_spans_survive_backticks_and_pipes() {
        assert_eq!(code("stages.0"), "`stages.0`");
        assert_eq!(code("a`b"), "``a`b``");
        assert_eq!(code("`x"), "`` `x ``");
        assert_eq!(cell_code("a|b"), "`a\\|b`");
        assert_eq!(text("<b>|*"), "\\<b\\>\\|\\*");
        assert_eq!(group_digits(1_234_567), "1,234,567");
        assert_eq!(group_digits(12), "12");
    }
}
