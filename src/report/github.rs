//! The report as GitHub Actions `::error` workflow commands, one per failure: a pure function
//! of a [`Report`].

use super::FailureKind;
use super::Report;
use super::lint::{Lint, unmerged_message};
use super::text::{block_of, failure_message};

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
                kind => format!("repvgg-fuse: tensor {} {}", f.name, kind.what()),
            };
            github_error(
                &title,
                &format!("{}: {}", r.output, failure_message(block_of(r, f), f)),
            )
        })
        .collect()
}

/// `lint`'s `::error` workflow commands, one per mergeable branch set.
pub fn lint_errors(l: &Lint) -> Vec<String> {
    (l.unmerged.iter())
        .map(|u| {
            github_error(
                &format!("repvgg-fuse lint: unmerged branch set {}", u.name),
                &format!("{}: {}", l.input, unmerged_message(u)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflow_commands_escape_by_githubs_rules() {
        assert_eq!(command_data("50%\r\nok: a,b"), "50%25%0D%0Aok: a,b");
        assert_eq!(command_property("a:b,c%\n"), "a%3Ab%2Cc%25%0A");
        assert_eq!(
            github_error("t: 1", "m, 2%"),
            "::error title=t%3A 1::m, 2%25"
        );
    }
}
