//! The `lint` report: the branch sets an ONNX graph still holds, and its text.

use std::fmt::Write as _;

use serde::Serialize;

use super::{Skipped, Tool};

/// What `lint` found.
#[derive(Debug, Clone, Serialize)]
pub struct Lint {
    /// The tool and its version.
    pub tool: Tool,
    /// The graph.
    pub input: String,
    /// Branch sets left unmerged: each would be one node.
    pub unmerged: Vec<Unmerged>,
    /// Candidates that do not merge exactly (or that the tool cannot merge yet), and why.
    pub skipped: Vec<Skipped>,
    /// Nodes in the graph.
    pub nodes: usize,
    /// Nodes after merging every set.
    pub nodes_after_merge: usize,
    /// Parameters merging would save, in all.
    pub parameters_saved: usize,
    /// Multiply-adds per output position merging would save, in all.
    pub macs_per_position_saved: usize,
}

/// One unmerged set.
#[derive(Debug, Clone, Serialize)]
pub struct Unmerged {
    /// The block's name (its nodes' shared scope).
    pub name: String,
    /// Its nodes' names, in graph order.
    pub nodes: Vec<String>,
    /// Its branches' op chains.
    pub ops: Vec<String>,
    /// Parameters of its branches minus those of the one conv.
    pub parameters_saved: usize,
    /// Multiply-adds per output position of its branches minus the one conv's.
    pub macs_per_position_saved: usize,
}

impl Lint {
    /// Whether the graph passes: no mergeable set left.
    pub fn passed(&self) -> bool {
        self.unmerged.is_empty()
    }
}

/// `lint`'s text: a line per unmerged set, then the verdict.
pub fn text(l: &Lint) -> String {
    let mut out = String::new();
    for u in &l.unmerged {
        let _ = writeln!(
            out,
            "lint: unmerged `{}`: {} nodes ({}) → 1; saves {} parameters, {} multiply-adds per output position",
            u.name,
            u.nodes.len(),
            u.ops.join(" + "),
            u.parameters_saved,
            u.macs_per_position_saved
        );
    }
    for s in &l.skipped {
        let _ = writeln!(out, "lint: left alone: {} ({})", s.name, s.reason);
    }
    if l.passed() {
        let _ = writeln!(
            out,
            "lint: passed: no mergeable branch set in {} ({} nodes)",
            l.input, l.nodes
        );
    } else {
        let _ = writeln!(
            out,
            "lint: FAILED: {} mergeable branch sets in {}: {} nodes would be {}, {} parameters fewer",
            l.unmerged.len(),
            l.input,
            l.nodes,
            l.nodes_after_merge,
            l.parameters_saved
        );
    }
    out
}
