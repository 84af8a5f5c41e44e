//! The `lint` report: the branch sets an ONNX graph still holds, and its text. (Its JUnit,
//! Markdown and `::error` renderings are beside the report's: [`super::junit::lint_junit`],
//! [`super::markdown::lint_summary`], [`super::github::lint_errors`].)

use std::fmt::Write as _;

use serde::Serialize;

use super::{GraphNodes, Skipped, Tool};

/// What `lint` found.
#[derive(Debug, Clone, Serialize)]
pub struct Lint {
    /// The tool and its version.
    pub tool: Tool,
    /// The graph.
    pub input: String,
    /// The graph inputs' shapes the multiply-adds and FLOPs are counted at (`name:1x3x224x224`;
    /// a symbolic dim is its name).
    pub input_shapes: Vec<String>,
    /// Branch sets left unmerged: each would be one node.
    pub unmerged: Vec<Unmerged>,
    /// Candidates that do not merge exactly (or that the tool cannot merge yet), and why.
    pub skipped: Vec<Skipped>,
    /// Nodes in the graph.
    pub nodes: usize,
    /// Nodes after merging every set (and dropping the `Constant` nodes only they read), as
    /// `convert` would write the graph.
    pub nodes_after_merge: usize,
    /// Parameters merging would save, in all.
    pub parameters_saved: usize,
    /// Multiply-adds per output position merging would save, in all.
    pub macs_per_position_saved: usize,
    /// FLOPs per run of the graph merging would save, in all; null when some set's output
    /// shape is not static (a symbolic dim, or an op the shapes are not followed through).
    pub flops_saved: Option<u64>,
}

/// One unmerged set.
#[derive(Debug, Clone, Serialize)]
pub struct Unmerged {
    /// The block's name (its nodes' shared scope).
    pub name: String,
    /// Its nodes' names (`nodes`, in graph order) and the node merging writes in their place.
    #[serde(flatten)]
    pub graph_nodes: GraphNodes,
    /// Its branches' op chains.
    pub ops: Vec<String>,
    /// Parameters of its branches minus those of the one conv.
    pub parameters_saved: usize,
    /// Multiply-adds per output position of its branches minus the one conv's.
    pub macs_per_position_saved: usize,
    /// Output positions per run (elements of the set's output over its channels: N·H·W);
    /// null when the output's shape is not static.
    pub output_positions: Option<u64>,
    /// Multiply-adds per run of the graph merging saves: `macs_per_position_saved` ×
    /// `output_positions`.
    pub macs_saved: Option<u64>,
    /// FLOPs per run merging saves: 2 × `macs_saved` (element-wise ops not counted).
    pub flops_saved: Option<u64>,
}

impl Lint {
    /// Whether the graph passes: no mergeable set left.
    pub fn passed(&self) -> bool {
        self.unmerged.is_empty()
    }
}

/// `n` FLOPs as `1.23 MFLOPs`, or `FLOPs unknown (…)` when the shape is not static.
pub fn flops_text(flops: Option<u64>) -> String {
    let Some(f) = flops else {
        return "FLOPs unknown (the output shape is not static)".into();
    };
    let f = f as f64;
    match f {
        f if f >= 1e9 => format!("{:.2} GFLOPs", f / 1e9),
        f if f >= 1e6 => format!("{:.2} MFLOPs", f / 1e6),
        f if f >= 1e3 => format!("{:.2} kFLOPs", f / 1e3),
        f => format!("{f} FLOPs"),
    }
}

/// One set's finding, as the text and the JUnit failure say it.
pub fn unmerged_message(u: &Unmerged) -> String {
    format!(
        "{} nodes ({}) merge into one {} `{}`: saves {} parameters, {} ({} multiply-adds per output position)",
        u.graph_nodes.nodes.len(),
        u.ops.join(" + "),
        u.graph_nodes.merged_op,
        u.graph_nodes.merged_node,
        u.parameters_saved,
        flops_text(u.flops_saved),
        u.macs_per_position_saved
    )
}

/// The verdict line.
pub fn verdict(l: &Lint) -> String {
    if l.passed() {
        return format!(
            "passed: no mergeable branch set in {} ({} nodes)",
            l.input, l.nodes
        );
    }
    format!(
        "FAILED: {} mergeable branch sets in {}: {} nodes would be {}, {} parameters and {} fewer (at {})",
        l.unmerged.len(),
        l.input,
        l.nodes,
        l.nodes_after_merge,
        l.parameters_saved,
        flops_text(l.flops_saved),
        l.input_shapes.join(", ")
    )
}

/// `lint`'s text: a line per unmerged set (with its nodes), what was left alone, the verdict.
pub fn text(l: &Lint) -> String {
    let mut out = String::new();
    for u in &l.unmerged {
        let _ = writeln!(out, "lint: unmerged `{}`: {}", u.name, unmerged_message(u));
        let _ = writeln!(out, "  nodes: {}", u.graph_nodes.nodes.join(", "));
    }
    for s in &l.skipped {
        let _ = writeln!(out, "lint: left alone: {} ({})", s.name, s.reason);
    }
    let _ = writeln!(out, "lint: {}", verdict(l));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_are_told_in_their_unit() {
        assert_eq!(flops_text(Some(12_288)), "12.29 kFLOPs");
        assert_eq!(flops_text(Some(999)), "999 FLOPs");
        assert_eq!(flops_text(Some(3_400_000_000)), "3.40 GFLOPs");
        assert!(flops_text(None).contains("unknown"));
    }
}
