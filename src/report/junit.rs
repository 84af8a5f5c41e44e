//! The report as a JUnit XML file for test reporters (GitLab, Jenkins, GitHub): a pure
//! function of a [`Report`] and the facts of the run it does not hold ([`RunInfo`]).
//!
//! The XML is our own code, not `quick-junit`'s: that crate always wraps the suite in a
//! `<testsuites>` root (the Ant schema readers expect a lone `<testsuite>`), writes its
//! timestamp with milliseconds and a zone (the schema's is `YYYY-MM-DDTHH:MM:SS`), and escapes
//! attributes with quick-xml's five entities only, so a newline in a block name becomes a
//! space for any reader. What is left is a writer of a dozen lines and an escape function.
//! The timestamp comes from `chrono`.

use std::fmt::Write as _;

use super::lint::{Lint, unmerged_message};
use super::text::{block_of, failure_message};
use super::{Failure, FailureKind, Report};

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

/// The JUnit `classname` of the deploy-file checks.
pub const DEPLOY_CLASS: &str = "deploy-file";

/// The JUnit `classname` of `lint`'s testcases.
pub const LINT_CLASS: &str = "lint";

/// The name of `lint`'s one testcase when no mergeable set is left.
pub const LINT_PASSED: &str = "no mergeable branch set";

/// A testcase's failure: `type`, `message`, text.
struct CaseFailure {
    kind: &'static str,
    message: String,
    text: String,
}

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
    let (mut tests, mut failures) = (0, 0);
    let mut case = |class: &str, name: &str, failure: Option<CaseFailure>| {
        tests += 1;
        failures += usize::from(failure.is_some());
        testcase(&mut cases, class, name, failure);
    };
    for block in &report.blocks {
        let failure = block_failure(report, &block.block.name).map(|f| CaseFailure {
            kind: if f.max_abs_deviation.is_some() {
                "over-tolerance"
            } else {
                "fused-tensor"
            },
            message: failure_message(block_of(report, f), f),
            text: f.reason.clone(),
        });
        case(&report.layout.name, &block.block.name, failure);
    }
    if let Some(v) = &report.verify {
        // A graph's outputs, run whole, are one more check of the deploy file.
        let graph = report.graph.is_some().then_some(FailureKind::Output);
        for kind in FailureKind::DEPLOY_CHECKS.into_iter().chain(graph) {
            let bad: Vec<&Failure> = v.failures.iter().filter(|f| f.kind == kind).collect();
            let failure = (!bad.is_empty()).then(|| CaseFailure {
                kind: kind_name(kind),
                message: tensors_message(&bad, kind.what()),
                text: (bad.iter().map(|f| format!("{}: {}", f.name, f.reason)))
                    .collect::<Vec<_>>()
                    .join("\n"),
            });
            case(DEPLOY_CLASS, kind.check_name(), failure);
        }
    }
    let counts = Counts {
        tests,
        failures,
        skipped: 0,
    };
    suite(&report.input, &counts, run, &properties(report), &cases)
}

/// The JUnit XML of a `lint` run: one `testsuite` named after the graph; one `testcase` per
/// mergeable branch set (`classname` `lint`, `name` the set's scope) failing with its nodes and
/// what merging it would save; the candidates left alone as skipped testcases with the
/// reason; and, when no set is left, one passing testcase (`no mergeable branch set`).
pub fn lint_junit(l: &Lint, run: &RunInfo) -> String {
    let mut cases = String::new();
    for u in &l.unmerged {
        let failure = CaseFailure {
            kind: "mergeable-branch-set",
            message: unmerged_message(u),
            text: format!(
                "nodes:\n{}\nmerged: {} `{}`",
                u.graph_nodes.nodes.join("\n"),
                u.graph_nodes.merged_op,
                u.graph_nodes.merged_node
            ),
        };
        testcase(&mut cases, LINT_CLASS, &u.name, Some(failure));
    }
    if l.passed() {
        testcase(&mut cases, LINT_CLASS, LINT_PASSED, None);
    }
    for s in &l.skipped {
        let _ = writeln!(
            cases,
            "  <testcase classname=\"{}\" name=\"{}\" time=\"0\">\n    <skipped message=\"{}\"/>\n  </testcase>",
            attr(LINT_CLASS),
            attr(&s.name),
            attr(&s.reason)
        );
    }
    let counts = Counts {
        tests: l.unmerged.len() + usize::from(l.passed()) + l.skipped.len(),
        failures: l.unmerged.len(),
        skipped: l.skipped.len(),
    };
    let properties = [
        ("tool", format!("{} {}", l.tool.name, l.tool.version)),
        ("command", "lint".to_string()),
        ("input", l.input.clone()),
        ("input_shapes", l.input_shapes.join(", ")),
    ];
    suite(&l.input, &counts, run, &properties, &cases)
}

/// A `testsuite`'s testcase counts.
struct Counts {
    tests: usize,
    failures: usize,
    skipped: usize,
}

/// The whole file: the `testsuite` named `name` with its attributes, `properties`, the
/// testcases `cases` (already XML), `system-out` and `system-err`, in the Ant schema's order.
fn suite(
    name: &str,
    counts: &Counts,
    run: &RunInfo,
    properties: &[(&str, String)],
    cases: &str,
) -> String {
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        xml,
        "<testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"{:.3}\" timestamp=\"{}\" hostname=\"{}\">",
        attr(name),
        counts.tests,
        counts.failures,
        counts.skipped,
        run.seconds.max(0.0),
        timestamp(run.started),
        attr(host(&run.hostname)),
    );
    xml.push_str("  <properties>\n");
    for (name, value) in properties {
        let _ = writeln!(
            xml,
            "    <property name=\"{}\" value=\"{}\"/>",
            attr(name),
            attr(value)
        );
    }
    xml.push_str("  </properties>\n");
    xml.push_str(cases);
    xml.push_str("  <system-out></system-out>\n  <system-err></system-err>\n</testsuite>\n");
    xml
}

/// The machine's name for the suite: `localhost` when blank.
fn host(name: &str) -> &str {
    if name.trim().is_empty() {
        "localhost"
    } else {
        name
    }
}

/// One `<testcase>`, with its failure if it failed.
fn testcase(out: &mut String, class: &str, name: &str, failure: Option<CaseFailure>) {
    let open = format!(
        "  <testcase classname=\"{}\" name=\"{}\" time=\"0\"",
        attr(class),
        attr(name)
    );
    match failure {
        None => {
            let _ = writeln!(out, "{open}/>");
        }
        Some(f) => {
            let _ = writeln!(
                out,
                "{open}>\n    <failure type=\"{}\" message=\"{}\">{}</failure>\n  </testcase>",
                attr(f.kind),
                attr(&f.message),
                text_node(&f.text)
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

/// The JUnit failure `type` of a check.
fn kind_name(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Block => "block",
        FailureKind::Missing => "missing-tensors",
        FailureKind::Extra => "extra-tensors",
        FailureKind::Altered => "altered-tensors",
        FailureKind::Output => "graph-output",
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
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `seconds` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS` (UTC, no zone: the form the JUnit
/// schema asks for); the epoch itself for a time chrono cannot represent.
///
/// ```
/// use repvgg_fuse::report::junit::timestamp;
/// assert_eq!(timestamp(0), "1970-01-01T00:00:00");
/// assert_eq!(timestamp(951_827_696), "2000-02-29T12:34:56");
/// ```
pub fn timestamp(seconds: u64) -> String {
    let time = i64::try_from(seconds)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .unwrap_or_default();
    time.format("%Y-%m-%dT%H:%M:%S").to_string()
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
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00");
        // Leap days of a century year divisible by 400, and a later ordinary date.
        assert_eq!(timestamp(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(timestamp(1_700_000_000), "2023-11-14T22:13:20");
        assert_eq!(timestamp(4_107_542_399), "2100-02-28T23:59:59");
        assert_eq!(timestamp(4_107_542_400), "2100-03-01T00:00:00");
    }
}
