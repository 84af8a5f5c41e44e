//! The report in the forms CI systems read: a JUnit XML file for test reporters (GitLab,
//! Jenkins, GitHub), a Markdown job summary for `$GITHUB_STEP_SUMMARY`, and GitHub Actions
//! `::error` workflow commands. Each is a pure function of a [`Report`]; the binary decides
//! where the text goes. [`check_junit_path`] and [`write_junit`] put the JUnit file in place
//! under the same rules as the report (never over an input, atomically).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use super::output::{same_file, temp_beside};
use crate::Error;
use crate::deviation::WorstElement;
use crate::report::{BlockReport, Failure, FailureKind, Report};

/// Facts about the run that the report does not hold, for the JUnit `testsuite` attributes.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// Wall time of the whole run, in seconds.
    pub seconds: f64,
    /// When the run started, seconds since the Unix epoch (UTC).
    pub started: u64,
    /// The machine's name (`localhost` when unknown).
    pub hostname: String,
}

/// The deploy-file checks, each a JUnit testcase: `(kind, testcase name, what a failure says)`.
const DEPLOY_CHECKS: [(FailureKind, &str, &str); 3] = [
    (
        FailureKind::Missing,
        "missing tensors",
        "missing from the deploy file",
    ),
    (
        FailureKind::Extra,
        "extra tensors",
        "in the deploy file but not expected there",
    ),
    (
        FailureKind::Altered,
        "altered tensors",
        "changed from the train file",
    ),
];

/// The JUnit `classname` of the deploy-file checks.
pub const DEPLOY_CLASS: &str = "deploy-file";

/// The JUnit XML of a verified run: one `testsuite` named after the input file; one `testcase`
/// per block (`classname` = the layout, `name` = the block) with a `failure` when the block is
/// over tolerance or its fused tensors are wrong; and, when a verification ran, one testcase per
/// deploy-file check (missing, extra, altered tensors). Blocks are checked in parallel and not
/// timed one by one: each testcase's `time` is 0, the suite's is the run's wall time.
///
/// The layout follows the Ant JUnit schema most readers accept: `properties`, the testcases,
/// `system-out` and `system-err`, in that order, and every attribute that schema requires.
pub fn junit(report: &Report, run: &RunInfo) -> String {
    let mut cases = String::new();
    let mut tests = 0;
    let mut failures = 0;
    for block in &report.blocks {
        let failure = block_failure(report, &block.block.name);
        tests += 1;
        failures += usize::from(failure.is_some());
        let failure = failure.map(|f| {
            let kind = if f.max_abs_deviation.is_some() {
                "over-tolerance"
            } else {
                "fused-tensor"
            };
            (
                kind,
                failure_message(block_of(report, f), f),
                f.reason.clone(),
            )
        });
        testcase(&mut cases, &report.layout.name, &block.block.name, failure);
    }
    if let Some(v) = &report.verify {
        for (kind, name, what) in DEPLOY_CHECKS {
            let bad: Vec<&Failure> = v.failures.iter().filter(|f| f.kind == kind).collect();
            tests += 1;
            failures += usize::from(!bad.is_empty());
            let failure = (!bad.is_empty()).then(|| {
                let body: Vec<String> = bad
                    .iter()
                    .map(|f| format!("{}: {}", f.name, f.reason))
                    .collect();
                (
                    kind_name(kind),
                    tensors_message(&bad, what),
                    body.join("\n"),
                )
            });
            testcase(&mut cases, DEPLOY_CLASS, name, failure);
        }
    }
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        xml,
        "<testsuite name=\"{}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\" time=\"{:.3}\" timestamp=\"{}\" hostname=\"{}\">",
        attr(&report.input),
        run.seconds.max(0.0),
        iso8601(run.started),
        attr(if run.hostname.trim().is_empty() {
            "localhost"
        } else {
            &run.hostname
        }),
    );
    xml.push_str("  <properties>\n");
    for (name, value) in properties(report) {
        let _ = writeln!(
            xml,
            "    <property name=\"{}\" value=\"{}\"/>",
            attr(name),
            attr(&value)
        );
    }
    xml.push_str("  </properties>\n");
    xml.push_str(&cases);
    xml.push_str("  <system-out></system-out>\n  <system-err></system-err>\n</testsuite>\n");
    xml
}

/// One `<testcase>`, with its `(type, message, text)` failure if it failed.
fn testcase(out: &mut String, class: &str, name: &str, failure: Option<(&str, String, String)>) {
    let open = format!(
        "  <testcase classname=\"{}\" name=\"{}\" time=\"0\"",
        attr(class),
        attr(name)
    );
    match failure {
        None => {
            let _ = writeln!(out, "{open}/>");
        }
        Some((kind, message, text)) => {
            let _ = writeln!(
                out,
                "{open}>\n    <failure type=\"{}\" message=\"{}\">{}</failure>\n  </testcase>",
                attr(kind),
                attr(&message),
                text_node(&text)
            );
        }
    }
}

/// What the run was, as JUnit properties.
fn properties(r: &Report) -> Vec<(&'static str, String)> {
    let mut p = vec![
        ("tool", format!("{} {}", r.tool.name, r.tool.version)),
        ("command", r.command.clone()),
        ("input", r.input.clone()),
        ("output", r.output.clone()),
        ("layout", r.layout.name.clone()),
        ("bn_eps", format!("{:e}", r.bn_eps.value)),
    ];
    if let Some(v) = &r.verify {
        p.push(("atol", format!("{:e}", v.atol)));
        p.push(("rtol", format!("{:e}", v.rtol)));
        p.push((
            "input_size",
            format!("{}x{}", v.input_size[0], v.input_size[1]),
        ));
        p.push(("batch", v.batch.to_string()));
        p.push(("seed", v.seed.to_string()));
    }
    p
}

/// The JUnit failure `type` of a deploy-file check.
fn kind_name(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Block => "block",
        FailureKind::Missing => "missing-tensors",
        FailureKind::Extra => "extra-tensors",
        FailureKind::Altered => "altered-tensors",
    }
}

/// The failure of block `name`, if it failed.
fn block_failure<'a>(report: &'a Report, name: &str) -> Option<&'a Failure> {
    report
        .verify
        .as_ref()?
        .failures
        .iter()
        .find(|f| f.kind == FailureKind::Block && f.name == name)
}

fn block_of<'a>(report: &'a Report, f: &Failure) -> Option<&'a BlockReport> {
    report.blocks.iter().find(|b| b.block.name == f.name)
}

/// "3 tensors missing from the deploy file: `a`, `b`, `c`" (the first five named).
fn tensors_message(bad: &[&Failure], what: &str) -> String {
    let names: Vec<String> = bad
        .iter()
        .take(5)
        .map(|f| format!("`{}`", f.name))
        .collect();
    let more = if bad.len() > 5 {
        format!(" and {} more", bad.len() - 5)
    } else {
        String::new()
    };
    let noun = if bad.len() == 1 { "tensor" } else { "tensors" };
    format!("{} {noun} {what}: {}{more}", bad.len(), names.join(", "))
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
fn element(w: &WorstElement) -> String {
    format!(
        "image {}, channel {}, y {}, x {} (fused {:.6e}, unfused {:.6e})",
        w.image, w.channel, w.y, w.x, w.fused, w.unfused
    )
}

/// Escapes `s` for an XML attribute value in double quotes. Tab, CR and LF become character
/// references (a parser would turn them into spaces otherwise); characters XML 1.0 cannot
/// carry at all become a visible `\u{…}`.
pub fn attr(s: &str) -> String {
    escape(s, true)
}

/// Escapes `s` for XML text content.
pub fn text_node(s: &str) -> String {
    escape(s, false)
}

/// `s` escaped for XML: as an attribute value (quotes, tab and LF as references too), or as
/// text content.
fn escape(s: &str, attribute: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            '"' if attribute => out.push_str("&quot;"),
            '\'' if attribute => out.push_str("&apos;"),
            '\t' if attribute => out.push_str("&#9;"),
            '\n' if attribute => out.push_str("&#10;"),
            '"' | '\'' | '\t' | '\n' => out.push(c),
            c => push_xml_char(&mut out, c),
        }
    }
    out
}

fn push_xml_char(out: &mut String, c: char) {
    if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' {
        let _ = write!(out, "\\u{{{:x}}}", c as u32);
    } else {
        out.push(c);
    }
}

/// `seconds` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS` (UTC, no zone: the form the JUnit
/// schema asks for).
///
/// ```
/// assert_eq!(repvgg_fuse::app::export::iso8601(0), "1970-01-01T00:00:00");
/// assert_eq!(repvgg_fuse::app::export::iso8601(951_827_696), "2000-02-29T12:34:56");
/// ```
pub fn iso8601(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rem = seconds % 86_400;
    // Days to a civil date: count in 400-year eras of 146097 days from 0000-03-01, so that
    // the leap day is the last day of a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}

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
        text(&r.layout.chosen_by),
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

/// Rows of a table at most; the rest is counted, and is in the JSON report.
const MAX_ROWS: usize = 50;

fn headline(r: &Report) -> String {
    match &r.verify {
        None => "✅ converted (not verified: deviations are the probe's)".into(),
        Some(v) if v.passed => "✅ passed".into(),
        Some(v) => {
            let blocks = v
                .failures
                .iter()
                .filter(|f| f.kind == FailureKind::Block)
                .count();
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
    let passed = r.verify.as_ref().is_none_or(|v| v.passed);
    match r.command.as_str() {
        "convert" if passed => format!("{} written, {size} bytes", code(&r.output)),
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
        let check = DEPLOY_CHECKS
            .iter()
            .find(|c| c.0 == f.kind)
            .map_or("", |c| c.1);
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
        if i > 0 && (digits.len() - i) % 3 == 0 {
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

/// The GitHub Actions `::error` workflow commands, one per failure, with the title and message
/// escaped by GitHub's rules (see [`command_property`], [`command_data`]).
pub fn github_errors(r: &Report) -> Vec<String> {
    let Some(v) = &r.verify else {
        return Vec::new();
    };
    v.failures
        .iter()
        .map(|f| {
            let title = match f.kind {
                FailureKind::Block => format!("repvgg-fuse: block {} failed verification", f.name),
                kind => {
                    let what = DEPLOY_CHECKS
                        .iter()
                        .find(|c| c.0 == kind)
                        .map_or("failed", |c| c.2);
                    format!("repvgg-fuse: tensor {} {what}", f.name)
                }
            };
            github_error(
                &title,
                &format!("{}: {}", r.output, failure_message(block_of(r, f), f)),
            )
        })
        .collect()
}

/// One `::error title=…::…` line.
pub fn github_error(title: &str, message: &str) -> String {
    format!(
        "::error title={}::{}",
        command_property(title),
        command_data(message)
    )
}

/// Escapes workflow-command data (the message): `%`, CR and LF.
pub fn command_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Escapes a workflow-command property value: as data, and `:` and `,` too.
pub fn command_property(s: &str) -> String {
    command_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// Refuses a JUnit path that would overwrite one of `files` (the input, the output, the
/// report: by any path), that is a directory, or whose folder does not exist. Called before
/// the run, so that a bad path writes nothing.
pub fn check_junit_path(path: &Path, files: &[&Path]) -> Result<(), Error> {
    if path.is_dir() {
        return Err(Error::Output {
            path: path.to_path_buf(),
            what: "the JUnit file is a directory".into(),
        });
    }
    for file in files {
        if same_file(file, path) {
            return Err(Error::Output {
                path: path.to_path_buf(),
                what: format!("the JUnit file would overwrite {}", file.display()),
            });
        }
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::Output {
            path: path.to_path_buf(),
            what: format!("its folder {} does not exist", dir.display()),
        });
    }
    Ok(())
}

/// Writes `xml` to `path` atomically: a temp file beside it, renamed into place.
pub fn write_junit(path: &Path, xml: &str) -> Result<(), Error> {
    let mut tmp = temp_beside(path)?;
    let err = |what: String| Error::Output {
        path: path.to_path_buf(),
        what,
    };
    tmp.as_file_mut()
        .write_all(xml.as_bytes())
        .map_err(|e| err(format!("cannot write the JUnit file: {e}")))?;
    tmp.persist(path).map_err(|e| {
        err(format!(
            "cannot move the JUnit file into place: {}",
            e.error
        ))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_escapes_markup_quotes_and_line_ends() {
        assert_eq!(attr(r#"<&"'>"#), "&lt;&amp;&quot;&apos;&gt;");
        assert_eq!(attr("a\nb\tc\rd"), "a&#10;b&#9;c&#13;d");
        assert_eq!(text_node("a<b>&\nc"), "a&lt;b&gt;&amp;\nc");
        assert_eq!(attr("x\u{1}y"), "x\\u{1}y");
    }

    #[test]
    fn workflow_commands_escape_by_githubs_rules() {
        assert_eq!(command_data("50%\r\nok: a,b"), "50%25%0D%0Aok: a,b");
        assert_eq!(command_property("a:b,c%\n"), "a%3Ab%2Cc%25%0A");
        assert_eq!(
            github_error("t: 1", "m, 2%"),
            "::error title=t%3A 1::m, 2%25"
        );
    }

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00");
        // Leap days of a century year divisible by 400, and a later ordinary date.
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(iso8601(1_700_000_000), "2023-11-14T22:13:20");
        assert_eq!(iso8601(4_107_542_399), "2100-02-28T23:59:59");
        assert_eq!(iso8601(4_107_542_400), "2100-03-01T00:00:00");
    }

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
