//! `lint` as a CI gate and `inspect` on ONNX graphs, through the binary. What each set would
//! save is held to `fixtures/onnx_lint/expected.json`, which `make_onnx_lint_fixtures.py`
//! counts with the `onnx` package (its shape inference, the initializers each node reads) on
//! the graphs PyTorch exported and the framework's own deploy export of the same weights;
//! each set's nodes are held to case.json's node map of the export.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn expected() -> Value {
    let path = fixtures_dir().join("onnx_lint/expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("expected.json")).expect("json")
}

fn case_json(case: &str) -> Value {
    let path = fixtures_dir().join(case).join("case.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("case.json")).expect("json")
}

fn strings(v: &Value) -> Vec<String> {
    (v.as_array().expect("an array").iter())
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

/// A block's train nodes as the finder sees a set: without the exporter's `Constant` nodes
/// (their values are read as constants, not merged as nodes).
fn set_nodes(block: &Value) -> BTreeSet<String> {
    let constants: BTreeSet<String> = strings(&block["constant_nodes"]).into_iter().collect();
    (strings(&block["train_nodes"]).into_iter())
        .filter(|n| !constants.contains(n))
        .collect()
}

fn run(args: &[&std::ffi::OsStr]) -> Output {
    common::bin().args(args).output().expect("runs")
}

fn lint_json(graph: &Path, dir: &Path) -> (Option<i32>, Value) {
    let report = dir.join("lint.json");
    let o = run(&[
        "lint".as_ref(),
        graph.as_os_str(),
        "--report".as_ref(),
        report.as_os_str(),
    ]);
    let text = std::fs::read_to_string(&report).expect("the report is written");
    (o.status.code(), serde_json::from_str(&text).expect("json"))
}

/// `lint GRAPH --junit XML` with the job summary appended to `summary`, and the `::error`
/// annotations asked for (`GITHUB_ACTIONS=true`) where `annotate`.
fn lint_for_ci(graph: &Path, xml: &Path, summary: &Path, annotate: bool) -> Output {
    let mut cmd = common::bin();
    cmd.args([
        "lint".as_ref(),
        graph.as_os_str(),
        "--junit".as_ref(),
        xml.as_os_str(),
    ])
    .env("GITHUB_STEP_SUMMARY", summary);
    if annotate {
        cmd.env("GITHUB_ACTIONS", "true");
    }
    cmd.output().expect("runs")
}

#[test]
fn lint_saves_the_parameters_and_flops_onnx_counts_for_every_exported_set() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut compared, mut unknown) = (0, 0);
    for (case, want) in expected().as_object().expect("cases") {
        let graph = fixtures_dir().join(case).join("train.onnx");
        let (code, r) = lint_json(&graph, tmp.path());
        assert_eq!(code, Some(1), "{case}");
        for block in want["blocks"].as_array().expect("blocks") {
            let nodes = set_nodes(block);
            let Some(u) = (r["unmerged"].as_array().expect("unmerged").iter())
                .find(|u| strings(&u["nodes"]).into_iter().collect::<BTreeSet<_>>() == nodes)
            else {
                continue; // a set we leave alone (DBB's BNAndPad, the f16 stem's Casts)
            };
            let at = format!("{case}: {}", block["deploy_node"]);
            assert_eq!(u["parameters_saved"], block["parameters_saved"], "{at}");
            match (u["flops_saved"].as_u64(), block["flops_saved"].as_u64()) {
                (Some(ours), Some(theirs)) => assert_eq!(ours, theirs, "{at}"),
                (None, None) => {}
                (None, Some(_)) => unknown += 1,
                (Some(ours), None) => panic!("{at}: {ours} FLOPs where onnx knows no shape"),
            }
            compared += 1;
        }
    }
    // 153 sets in all, of which DBB's 4 and the f16 stem are left alone; FastViT's final conv
    // (twice) comes after attention reshapes whose target shape is computed at run time.
    assert!(compared >= 148, "only {compared} sets compared");
    assert!(unknown <= 2, "{unknown} sets without FLOPs");
}

/// The JUnit file, parsed: `(suite attributes, [(name, failure message+text, skipped reason)])`.
type Case = (String, Option<String>, Option<String>);

fn junit(path: &Path) -> (Vec<(String, String)>, Vec<Case>) {
    let text = std::fs::read_to_string(path).expect("the JUnit file is written");
    let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
    let suite = doc.root_element();
    assert_eq!(suite.tag_name().name(), "testsuite");
    let attrs = suite
        .attributes()
        .map(|a| (a.name().into(), a.value().into()));
    let cases = (suite.children())
        .filter(|c| c.has_tag_name("testcase"))
        .map(|c| {
            let child = |tag: &str| c.children().find(|f| f.has_tag_name(tag));
            let failure = child("failure").map(|f| {
                format!(
                    "{}\n{}",
                    f.attribute("message").unwrap_or_default(),
                    f.text().unwrap_or_default()
                )
            });
            let skipped = child("skipped").map(|s| s.attribute("message").unwrap_or_default());
            let name = c.attribute("name").expect("a testcase name").to_string();
            (name, failure, skipped.map(str::to_string))
        })
        .collect();
    (attrs.collect(), cases)
}

fn attr<'a>(attrs: &'a [(String, String)], name: &str) -> &'a str {
    (attrs.iter().find(|(n, _)| n == name)).map_or("", |(_, v)| v)
}

#[test]
fn lint_junit_and_job_summary_of_train_graphs_fail_each_set_by_its_nodes_and_savings() {
    let want = expected();
    for case in [
        "onnx_repvgg_ts17",
        "onnx_ultralytics_repconv",
        "onnx_mobileone_dynamo",
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (xml, summary) = (tmp.path().join("lint.xml"), tmp.path().join("summary.md"));
        std::fs::write(&summary, "earlier step\n").expect("writable");
        let graph = fixtures_dir().join(case).join("train.onnx");
        let o = lint_for_ci(&graph, &xml, &summary, true);
        assert_eq!(o.status.code(), Some(1), "{case}");
        let blocks = want[case]["blocks"].as_array().expect("blocks");
        let (attrs, cases) = junit(&xml);
        assert_eq!(attr(&attrs, "tests"), blocks.len().to_string(), "{case}");
        assert_eq!(attr(&attrs, "failures"), blocks.len().to_string(), "{case}");
        let md = std::fs::read_to_string(&summary).expect("summary");
        assert!(
            md.starts_with("earlier step\n### repvgg-fuse lint: ❌ FAILED"),
            "{md}"
        );
        let errors = String::from_utf8_lossy(&o.stderr);
        for block in blocks {
            let nodes = set_nodes(block);
            let (_, failure, _) = (cases.iter())
                .find(|(_, f, _)| {
                    f.as_ref()
                        .is_some_and(|f| nodes.iter().all(|n| f.contains(n)))
                })
                .unwrap_or_else(|| panic!("{case}: no failing testcase names {nodes:?}"));
            let failure = failure.as_deref().unwrap_or_default();
            let params = format!("saves {} parameters", block["parameters_saved"]);
            assert!(failure.contains(&params), "{case}: {failure}");
            let first = nodes.iter().next().expect("a node");
            assert!(md.contains(&format!("`{first}`")), "{case}: {md}");
            assert!(
                errors.contains("::error title=repvgg-fuse lint"),
                "{errors}"
            );
        }
    }
}

#[test]
fn lint_junit_and_job_summary_of_deploy_graphs_have_the_one_passing_case() {
    for case in [
        "onnx_repvgg_ts17",
        "onnx_fastvit_ts17",
        "onnx_ghostnetv3_ts17",
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (xml, summary) = (tmp.path().join("lint.xml"), tmp.path().join("summary.md"));
        let graph = fixtures_dir().join(case).join("deploy.onnx");
        let o = lint_for_ci(&graph, &xml, &summary, false);
        assert_eq!(o.status.code(), Some(0), "{case}");
        let (attrs, cases) = junit(&xml);
        assert_eq!(
            (attr(&attrs, "tests"), attr(&attrs, "failures")),
            ("1", "0"),
            "{case}"
        );
        assert_eq!(cases[0].0, "no mergeable branch set");
        let md = std::fs::read_to_string(&summary).expect("summary");
        assert!(md.contains("✅ passed"), "{md}");
        let nodes = case_json(case)["node_counts"]["deploy"].to_string();
        assert!(md.contains(&format!("{nodes} → {nodes}")), "{md}");
    }
}

#[test]
fn lint_junit_lists_the_candidates_left_alone_as_skipped_with_the_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (xml, report) = (tmp.path().join("lint.xml"), tmp.path().join("lint.json"));
    let graph = fixtures_dir().join("onnx_dbb_ts17/train.onnx");
    let o = run(&[
        "lint".as_ref(),
        graph.as_os_str(),
        "--junit".as_ref(),
        xml.as_os_str(),
        "--report".as_ref(),
        report.as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    let skipped = r["skipped"].as_array().expect("skipped");
    assert!(
        !skipped.is_empty(),
        "DBB's sums over BNAndPad are left alone"
    );
    let (attrs, cases) = junit(&xml);
    assert_eq!(attr(&attrs, "skipped"), skipped.len().to_string());
    for s in skipped {
        let reason = s["reason"].as_str().expect("a reason");
        assert!(
            cases.iter().any(|(_, _, r)| r.as_deref() == Some(reason)),
            "{reason}"
        );
    }
}

#[test]
fn lint_refuses_ci_paths_before_the_run_and_writes_none_of_its_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let graph = fixtures_dir().join("onnx_repvgg_ts17/train.onnx");
    let (report, xml) = (tmp.path().join("lint.json"), tmp.path().join("lint.xml"));
    // The job summary cannot be written (its folder is missing): no report, no JUnit file.
    let o = common::bin()
        .args([
            "lint".as_ref(),
            graph.as_os_str(),
            "--junit".as_ref(),
            xml.as_os_str(),
        ])
        .args(["--report".as_ref(), report.as_os_str()])
        .env("GITHUB_STEP_SUMMARY", tmp.path().join("gone/summary.md"))
        .output()
        .expect("runs");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("summary.md"));
    assert!(!report.exists() && !xml.exists());
    // A JUnit path that is the graph itself, and `-`.
    for junit in [graph.as_os_str(), "-".as_ref()] {
        let o = run(&[
            "lint".as_ref(),
            graph.as_os_str(),
            "--junit".as_ref(),
            junit,
        ]);
        assert_eq!(o.status.code(), Some(2), "{junit:?}");
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).expect("dir").collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn inspect_names_each_block_of_a_graph_by_its_nodes_and_the_node_replacing_them() {
    for case in [
        "onnx_repvgg_ts17",
        "onnx_mobileone_ts17",
        "onnx_repvit_ts17",
    ] {
        let graph = fixtures_dir().join(case).join("train.onnx");
        let o = run(&["inspect".as_ref(), graph.as_os_str(), "--json".as_ref()]);
        assert_eq!(o.status.code(), Some(0), "{case}");
        let i: Value = serde_json::from_slice(&o.stdout).expect("json");
        let want = &expected()[case];
        let blocks = i["blocks"].as_array().expect("blocks");
        assert_eq!(
            blocks.len(),
            want["blocks"].as_array().expect("blocks").len()
        );
        for block in want["blocks"].as_array().expect("blocks") {
            let nodes = set_nodes(block);
            let ours = (blocks.iter())
                .find(|b| {
                    strings(&b["graph_nodes"]["nodes"])
                        .into_iter()
                        .collect::<BTreeSet<_>>()
                        == nodes
                })
                .unwrap_or_else(|| panic!("{case}: no block is {nodes:?}"));
            let op = block["deploy_node"]
                .as_str()
                .expect("a node")
                .rsplit('/')
                .next();
            assert_eq!(ours["graph_nodes"]["merged_op"].as_str(), op, "{case}");
            assert!(ours.get("int8").is_none() && ours.get("max_abs_deviation").is_none());
        }
        let counts = &case_json(case)["node_counts"];
        assert_eq!(i["nodes_in"], counts["train"], "{case}");
        assert_eq!(i["nodes_out"], counts["deploy"], "{case}");
        let o = run(&["inspect".as_ref(), graph.as_os_str()]);
        let text = String::from_utf8_lossy(&o.stdout);
        let first = set_nodes(&want["blocks"][0])
            .into_iter()
            .next()
            .expect("a node");
        assert!(
            text.contains(&first) && text.contains("nodes into Conv `"),
            "{text}"
        );
    }
}

#[test]
fn inspect_int8_of_a_graph_gives_each_block_its_figures_and_probe_deviation() {
    let graph = fixtures_dir().join("onnx_repvgg_ts17/train.onnx");
    let args = [
        "inspect".as_ref(),
        graph.as_os_str(),
        "--json".as_ref(),
        "--int8".as_ref(),
    ];
    let o = run(&args);
    assert_eq!(o.status.code(), Some(0));
    let i: Value = serde_json::from_slice(&o.stdout).expect("json");
    for b in i["blocks"].as_array().expect("blocks") {
        let rel = b["max_rel_deviation"].as_f64().expect("a probe deviation");
        // f32 fused once from f64: within the f32 default tolerance of the unfused block.
        assert!(rel < 1e-5, "{}: {rel}", b["name"]);
        assert!(
            b["int8"]["per_channel_sqnr_db"].as_f64().is_some(),
            "{}",
            b["name"]
        );
    }
    let o = run(&[args[0], args[1], args[3]]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("probe deviation") && text.contains("INT8 SQNR"),
        "{text}"
    );
}

#[test]
fn convert_report_names_each_block_by_its_nodes_and_the_new_conv_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let case = "onnx_repvgg_ts17";
    let (out, report) = (
        tmp.path().join("deploy.onnx"),
        tmp.path().join("deploy.report.json"),
    );
    let graph = fixtures_dir().join(case).join("train.onnx");
    let o = run(&[
        graph.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--verify".as_ref(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    let written = std::fs::read(&out).expect("the deploy graph");
    for (b, want) in (r["blocks"].as_array().expect("blocks").iter())
        .zip(expected()[case]["blocks"].as_array().expect("blocks"))
    {
        let ours: BTreeSet<String> = strings(&b["graph_nodes"]["nodes"]).into_iter().collect();
        assert_eq!(ours, set_nodes(want));
        let new = b["graph_nodes"]["merged_node"].as_str().expect("a name");
        // A node's name is a plain protobuf string in the file.
        assert!(
            written.windows(new.len()).any(|w| w == new.as_bytes()),
            "{new}"
        );
    }
    let counts = &case_json(case)["node_counts"];
    assert_eq!(r["summary"]["nodes_in"], counts["train"]);
    assert_eq!(r["summary"]["nodes_out"], counts["deploy"]);
    let worst = (r["graph"]["outputs"].as_array().expect("outputs").iter())
        .filter_map(|o| o["max_abs_deviation"].as_f64())
        .fold(0.0, f64::max);
    assert_eq!(
        r["summary"]["graph_max_abs_deviation"].as_f64(),
        Some(worst)
    );
    let framework = case_json(case)["deviation"].clone();
    let theirs = (framework.as_object().expect("outputs").values())
        .filter_map(|d| d["train_vs_deploy"]["max_abs_over_max"].as_f64())
        .fold(0.0, f64::max);
    let ours = r["summary"]["graph_max_rel_deviation"]
        .as_f64()
        .expect("relative");
    // On another seeded input, but the same order as the framework's own deploy export.
    assert!(
        ours < 10.0 * theirs.max(1e-7),
        "ours {ours}, the framework's {theirs}"
    );
}

#[test]
fn lint_and_inspect_refuse_bad_input_with_exit_2_naming_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(fixtures_dir().join("onnx_repvgg_ts17/train.onnx")).expect("graph");
    let cut = tmp.path().join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).expect("writable");
    let missing = tmp.path().join("missing.onnx");
    for file in [&cut, &missing] {
        for cmd in ["lint", "inspect"] {
            let o = run(&[cmd.as_ref(), file.as_os_str()]);
            assert_eq!(o.status.code(), Some(2), "{cmd} {file:?}");
            let err = String::from_utf8_lossy(&o.stderr);
            let name = file
                .file_name()
                .expect("a name")
                .to_string_lossy()
                .to_string();
            assert!(err.contains(&name), "{cmd}: {err}");
            assert!(o.stdout.is_empty(), "{cmd}");
        }
    }
}
