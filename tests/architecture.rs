//! The house rules ARCHITECTURE.md states, read from the source so they stay true: library
//! modules depend on each other in one direction only (each on modules of a lower layer, or
//! of its own layer without a cycle), and the UI crate (indicatif) lives in the binary only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, top first; a module may use modules of lower layers (and its own layer's,
/// as long as no cycle forms).
const LAYERS: &[&[&str]] = &[
    &["app"],
    &["find", "write", "verify", "fuse"],
    &[
        "block",
        "checkpoint",
        "onnx",
        "report",
        "dtype",
        "conv",
        "deviation",
        "int8",
        "progress",
    ],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Every `.rs` file under `dir`, as (top-level module, source without its tests).
fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix("src").expect("under src/");
            let top = rel.components().next().expect("a file name");
            let module = top
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            let text = std::fs::read_to_string(&path).expect("a readable source file");
            let code = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .to_string();
            out.push((module, code));
        }
    }
}

/// `crate::name` paths in `code`, lower-case names only (modules, not root items).
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if !name.is_empty() {
            refs.insert(name);
        }
    }
    refs
}

fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(Path::new("src"), &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, code) in files {
        if module == "main" || module == "lib" || module == "bin" {
            continue;
        }
        let refs = crate_refs(&code);
        let entry = edges.entry(module.clone()).or_default();
        entry.extend(refs.into_iter().filter(|r| *r != module));
    }
    edges
}

#[test]
fn every_library_module_has_a_layer() {
    for module in edges().keys() {
        assert!(
            layer_of(module).is_some(),
            "module `{module}` is in no layer: add it to ARCHITECTURE.md and LAYERS here"
        );
    }
}

#[test]
fn modules_use_only_lower_layers_or_their_own() {
    for (module, uses) in edges() {
        let Some(mine) = layer_of(&module) else {
            continue;
        };
        for used in uses {
            let theirs = layer_of(&used).unwrap_or(usize::MAX);
            assert!(
                theirs >= mine,
                "`{module}` (layer {mine}) uses `crate::{used}` (layer {theirs}), a layer above it"
            );
        }
    }
}

#[test]
fn no_module_cycle() {
    let edges = edges();
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = stack.iter().position(|s| s == m) {
            panic!("module cycle: {} -> {m}", stack[at..].join(" -> "));
        }
        stack.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            visit(next, edges, stack, done);
        }
        stack.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        visit(m, &edges, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_ui_crate_is_used_by_the_binary_only() {
    let mut files = Vec::new();
    sources(Path::new("src"), &mut files);
    for (module, code) in files {
        if module != "main" && module != "bin" {
            assert!(
                !code.contains("indicatif"),
                "module `{module}` uses indicatif"
            );
        }
    }
}

#[test]
fn the_checker_sees_edges() {
    // The checker itself can fail: the stages do use the leaves.
    let edges = edges();
    assert!(edges["write"].contains("fuse"), "{edges:?}");
    assert!(edges["app"].contains("verify"), "{edges:?}");
}

/// Every file under `src/<dir>/` (and `src/<dir>.rs`), as (path, source without its tests).
fn files_of(dir: &str) -> Vec<(String, String)> {
    let mut files = Vec::new();
    sources(Path::new("src"), &mut files);
    files.into_iter().filter(|(m, _)| m == dir).collect()
}

#[test]
fn verify_never_names_the_fusion() {
    // The check must not share the algebra it checks: it runs each op's forward pass.
    let files = files_of("verify");
    assert!(!files.is_empty(), "src/verify/ has sources");
    for (_, code) in files {
        for needle in [
            "crate::fuse",
            "fuse_rows",
            "fuse_chunk",
            "fuse_block_rows",
            "Affine",
        ] {
            assert!(!code.contains(needle), "src/verify/ names `{needle}`");
        }
    }
}

#[test]
fn only_the_binary_prints_or_knows_terminals() {
    let mut files = Vec::new();
    sources(Path::new("src"), &mut files);
    for (module, code) in files {
        if module == "main" || module == "bin" {
            continue;
        }
        for needle in [
            "println!",
            "print!(",
            "dbg!(",
            "IsTerminal",
            "is_terminal",
            "stdout()",
            "stderr()",
        ] {
            assert!(
                !code.contains(needle),
                "module `{module}` has `{needle}`: only the binary prints"
            );
        }
    }
}

#[test]
fn every_file_the_tool_writes_goes_through_write_atomic() {
    // Temp files, creation and renames live in app/output.rs only: `write_atomic` makes a
    // finished temp file beside its target, `commit` renames them all at the end.
    let mut files = Vec::new();
    sources(Path::new("src"), &mut files);
    let mut writers = Vec::new();
    for (module, code) in &files {
        for needle in [
            "tempfile::",
            "NamedTempFile",
            "File::create",
            "fs::write(",
            "OpenOptions",
            "fs::rename",
            ".persist(",
        ] {
            if code.contains(needle) {
                writers.push(format!("{module}: {needle}"));
            }
        }
    }
    let output = std::fs::read_to_string("src/app/output.rs").expect("src/app/output.rs");
    assert!(
        output.contains("fn write_atomic") && output.contains("tempfile::"),
        "app/output.rs has write_atomic"
    );
    // Only the app module (its output.rs, checked by name below) may name them.
    assert!(writers.iter().all(|w| w.starts_with("app:")), "{writers:?}");
    for entry in std::fs::read_dir("src/app").expect("src/app") {
        let path = entry.expect("an entry").path();
        if path.file_name().is_some_and(|n| n == "output.rs") {
            continue;
        }
        let code = std::fs::read_to_string(&path).expect("readable");
        let code = code.split("#[cfg(test)]").next().unwrap_or_default();
        for needle in ["tempfile::", "NamedTempFile", "File::create", ".persist("] {
            assert!(
                !code.contains(needle),
                "{} names `{needle}`",
                path.display()
            );
        }
    }
}
