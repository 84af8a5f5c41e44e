//! Linears stored `[in, out]` in ONNX graphs (fixtures/make_onnx_linear_fixtures.py): PyTorch's
//! `MatMul` + `Add` for tokens `[B, N, C]` and a hand-built `Gemm` with `transB` 0, with BNs
//! before or after them (LeViT's folds, as `Flatten`/`Reshape` or `Transpose` around the BN),
//! parallel branches and RepViT's averaged heads. Each train graph merges to the op counts of
//! the framework-side deploy graph, its merged blocks verify, our deploy graph run whole
//! matches onnxruntime's output of the train graph, and `lint` tells the two apart; what does
//! not merge stays, with its reason.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[cfg(feature = "graph-run")]
use repvgg_fuse::verify::graph::{Optimization, compare, run_graph_with};
use serde_json::Value;

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/onnx_linear");
    let mut out: Vec<PathBuf> = std::fs::read_dir(root)
        .expect("fixtures/onnx_linear/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").is_file())
        .collect();
    out.sort();
    out
}

/// Converts `dir`'s train graph with `--verify` into `out`; the exit code and the report.
fn convert(dir: &Path, out: &Path) -> (Option<i32>, Value) {
    let case = common::case_json(dir);
    let shape: Vec<String> = (case["input_shape"].as_array().expect("a shape").iter())
        .map(|d| d.to_string())
        .collect();
    let input = case["input"].as_str().expect("input");
    let (o, report) = common::convert_graph(dir, out, &format!("{input}:{}", shape.join("x")));
    (o.status.code(), report)
}

/// The cases whose `case.json` says they merge (`true`) or stay as they are (`false`).
fn cases_that_merge(merges: bool) -> Vec<PathBuf> {
    (cases().into_iter())
        .filter(|d| common::case_json(d)["merges"] == merges)
        .collect()
}

fn lint(p: &Path) -> Option<i32> {
    common::bin()
        .arg("lint")
        .arg(p)
        .output()
        .expect("runs")
        .status
        .code()
}

#[test]
fn there_are_linear_cases() {
    assert!(cases().len() >= 10, "{:?}", cases());
}

#[test]
fn matmul_and_gemm_t0_sets_merge_to_the_framework_deploy_op_counts_and_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dir in cases_that_merge(true) {
        let case = common::dir_name(&dir);
        let out = tmp.path().join(format!("{case}.onnx"));
        let (code, report) = convert(&dir, &out);
        assert_eq!(code, Some(0), "{case}: {report}");
        assert_eq!(report["verify"]["passed"], true, "{case}");
        assert_eq!(report["graph"]["passed"], true, "{case}");
        let blocks = report["blocks"].as_array().expect("blocks");
        assert_eq!(blocks.len(), 1, "{case}: {blocks:?}");
        assert!(
            report["skipped"].as_array().is_some_and(Vec::is_empty),
            "{case}: {}",
            report["skipped"]
        );
        let want: BTreeMap<String, usize> =
            serde_json::from_value(common::case_json(&dir)["op_counts"]["deploy"].clone())
                .expect("counts");
        assert_eq!(
            common::op_counts(&out),
            want,
            "{case}: ours vs the framework's deploy graph"
        );
        assert_eq!(lint(&dir.join("train.onnx")), Some(1), "{case}: train");
        assert_eq!(lint(&out), Some(0), "{case}: ours");
        assert_eq!(lint(&dir.join("deploy.onnx")), Some(0), "{case}: theirs");
    }
}

#[test]
#[cfg(feature = "graph-run")]
fn our_deploy_graph_gives_onnxruntime_train_outputs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dir in cases_that_merge(true) {
        let case = common::dir_name(&dir);
        let out = tmp.path().join(format!("{case}.onnx"));
        assert_eq!(convert(&dir, &out).0, Some(0), "{case}");
        let (inputs, ort) = common::stored_io(&dir);
        let ours = run_graph_with(&out, &inputs, Optimization::Typed).expect("runs");
        let theirs = common::case_json(&dir)["train_vs_deploy_max_abs_over_max"]
            .as_f64()
            .expect("a figure");
        for d in compare(&ort, &ours).expect("same outputs") {
            assert!(d.max_abs_output > 0.0, "{case}");
            // f32 rounding of the output scale, and as close as the framework's own fold.
            assert!(
                d.max_rel <= 1e-6_f64.max(4.0 * theirs),
                "{case}: {d:?}, theirs {theirs:e}"
            );
        }
    }
}

#[test]
fn what_does_not_qualify_stays_with_its_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dir in cases_that_merge(false) {
        let case = common::dir_name(&dir);
        let out = tmp.path().join(format!("{case}.onnx"));
        let (code, report) = convert(&dir, &out);
        assert_eq!(code, Some(0), "{case}: {report}");
        assert!(
            report["blocks"].as_array().is_some_and(Vec::is_empty),
            "{case}"
        );
        let why = common::case_json(&dir)["reason"]
            .as_str()
            .expect("a reason")
            .to_string();
        let skipped = report["skipped"].as_array().expect("skipped");
        assert!(
            skipped
                .iter()
                .any(|s| s["reason"].as_str().is_some_and(|r| r.contains(&why))),
            "{case}: {skipped:?}"
        );
        assert_eq!(
            common::op_counts(&out),
            common::op_counts(&dir.join("train.onnx")),
            "{case}"
        );
    }
}
