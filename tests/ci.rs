//! The CI step: `--junit`, the job summary under `GITHUB_STEP_SUMMARY`, `::error` lines under
//! `GITHUB_ACTIONS=true`, and `--report -`. Runs the real binary on `fixtures/timm_repvgg`
//! (made by timm itself): its `deploy.safetensors` is timm's own conversion, so a verify of it
//! passes, and every failure here comes from a change the test makes to it and knows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;

use common::{Tensor, bin, describe, read_st, run, stderr, write_st};
use safetensors::Dtype;
use serde_json::Value;
use tempfile::TempDir;

fn case_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/timm_repvgg")
}

fn train() -> PathBuf {
    case_dir().join("train.safetensors")
}

fn timm_deploy() -> PathBuf {
    case_dir().join("deploy.safetensors")
}

/// The block names timm reported when it made the fixture (case.json), sorted (the report
/// lists blocks in file order, which is by name).
fn timm_blocks() -> Vec<String> {
    let text = std::fs::read_to_string(case_dir().join("case.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    json["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Safetensors files, read and written with the safetensors crate
// ---------------------------------------------------------------------------------------------

fn f32_at(t: &Tensor, i: usize) -> f32 {
    f32::from_le_bytes(t.data[4 * i..4 * i + 4].try_into().unwrap())
}

fn set_f32(t: &mut Tensor, i: usize, v: f32) {
    assert_eq!(t.dtype, Dtype::F32);
    t.data[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
}

/// Every tensor of `file` under `from.` renamed to be under `to.`.
fn rename_block(file: &BTreeMap<String, Tensor>, from: &str, to: &str) -> BTreeMap<String, Tensor> {
    file.iter()
        .map(|(n, t)| match n.strip_prefix(&format!("{from}.")) {
            Some(rest) => (format!("{to}.{rest}"), t.clone()),
            None => (n.clone(), t.clone()),
        })
        .collect()
}

/// timm's deploy file with channel `channel` of block `block`'s fused bias moved by 1 % of the
/// largest bias (about 100× the F32 tolerance); returns the path and the change.
fn tampered_bias(dir: &Path, block: &str, channel: usize) -> (PathBuf, f64) {
    let mut deploy = read_st(&timm_deploy());
    let bias = deploy
        .get_mut(&format!("{block}.reparam_conv.bias"))
        .unwrap();
    let n = bias.shape[0];
    let largest = (0..n).map(|i| f32_at(bias, i).abs()).fold(0.0, f32::max);
    let old = f32_at(bias, channel);
    let new = old + 0.01 * largest.max(1.0);
    set_f32(bias, channel, new);
    let path = dir.join("tampered.safetensors");
    write_st(&path, &deploy, None);
    (path, f64::from(new) - f64::from(old))
}

// ---------------------------------------------------------------------------------------------
// JUnit
// ---------------------------------------------------------------------------------------------

/// A parsed JUnit file, checked against the shape the Ant JUnit schema (the one GitLab, Jenkins
/// and GitHub's reporters read) requires: root `testsuite` with name, timestamp, hostname, tests,
/// failures, errors and time; children `properties`, `testcase`*, `system-out`, `system-err`
/// in that order; each testcase with name, classname and time; each failure with a type.
struct Junit {
    suite: BTreeMap<String, String>,
    /// (classname, name, failure) in file order.
    cases: Vec<(String, String, Option<JunitFailure>)>,
}

/// A `failure` element: (type, message, text).
type JunitFailure = (String, String, String);

fn read_junit(path: &Path) -> Junit {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc = roxmltree::Document::parse(&text)
        .unwrap_or_else(|e| panic!("{}: not well-formed XML: {e}\n{text}", path.display()));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "testsuite", "{text}");
    let suite: BTreeMap<String, String> = root
        .attributes()
        .map(|a| (a.name().to_string(), a.value().to_string()))
        .collect();
    for required in [
        "name",
        "timestamp",
        "hostname",
        "tests",
        "failures",
        "errors",
        "time",
    ] {
        assert!(
            suite.contains_key(required),
            "testsuite has no {required}: {text}"
        );
    }
    assert!(!suite["name"].is_empty() && !suite["hostname"].is_empty());
    let ts = &suite["timestamp"];
    assert!(
        ts.len() == 19 && ts.as_bytes()[10] == b'T' && ts.as_bytes()[4] == b'-',
        "timestamp {ts} is not YYYY-MM-DDTHH:MM:SS"
    );
    let time: f64 = suite["time"].parse().expect("time is a decimal");
    assert!(time >= 0.0 && !suite["time"].contains('e'), "time {time}");
    let children: Vec<_> = root.children().filter(|n| n.is_element()).collect();
    let names: Vec<&str> = children.iter().map(|n| n.tag_name().name()).collect();
    assert_eq!(names.first(), Some(&"properties"), "{names:?}");
    assert_eq!(
        &names[names.len() - 2..],
        ["system-out", "system-err"],
        "{names:?}"
    );
    let mut cases = Vec::new();
    for case in &children[1..children.len() - 2] {
        assert_eq!(case.tag_name().name(), "testcase");
        let attr = |n: &str| {
            case.attribute(n)
                .unwrap_or_else(|| panic!("testcase without {n}"))
                .to_string()
        };
        let time: f64 = attr("time").parse().expect("testcase time is a decimal");
        assert!(time >= 0.0);
        let inner: Vec<_> = case.children().filter(|n| n.is_element()).collect();
        assert!(inner.len() <= 1, "at most one failure per testcase");
        let failure = inner.first().map(|f| {
            assert_eq!(f.tag_name().name(), "failure");
            (
                f.attribute("type").expect("failure has a type").to_string(),
                f.attribute("message").unwrap_or_default().to_string(),
                f.text().unwrap_or_default().to_string(),
            )
        });
        cases.push((attr("classname"), attr("name"), failure));
    }
    Junit { suite, cases }
}

fn count(j: &Junit, key: &str) -> usize {
    j.suite[key].parse().unwrap()
}

#[test]
fn junit_of_a_passing_verify_has_a_testcase_per_block_and_per_deploy_check() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("results.xml");
    let out = run(bin()
        .arg("verify")
        .arg(train())
        .arg(timm_deploy())
        .arg("--junit")
        .arg(&junit));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let j = read_junit(&junit);
    let blocks = timm_blocks();
    assert_eq!(j.suite["name"], train().display().to_string());
    assert_eq!(count(&j, "tests"), blocks.len() + 3);
    assert_eq!(count(&j, "failures"), 0);
    assert_eq!(count(&j, "errors"), 0);
    let mut block_cases: Vec<&str> = j
        .cases
        .iter()
        .filter(|c| c.0 == "timm-repvgg")
        .map(|c| c.1.as_str())
        .collect();
    block_cases.sort();
    assert_eq!(block_cases, blocks);
    let checks: Vec<&str> = j
        .cases
        .iter()
        .filter(|c| c.0 == "deploy-file")
        .map(|c| c.1.as_str())
        .collect();
    assert_eq!(
        checks,
        ["missing tensors", "extra tensors", "altered tensors"]
    );
    assert!(j.cases.iter().all(|c| c.2.is_none()));
}

#[test]
fn junit_of_a_tampered_bias_fails_that_block_with_deviation_tolerance_and_worst_element() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("results.xml");
    let report = dir.path().join("report.json");
    let (deploy, delta) = tampered_bias(dir.path(), "stages.1.0", 5);
    let out = run(bin()
        .arg("verify")
        .arg(train())
        .arg(&deploy)
        .arg("--junit")
        .arg(&junit)
        .arg("--report")
        .arg(&report));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let j = read_junit(&junit);
    assert_eq!(count(&j, "tests"), timm_blocks().len() + 3);
    assert_eq!(count(&j, "failures"), 1);
    let failed: Vec<_> = j.cases.iter().filter(|c| c.2.is_some()).collect();
    assert_eq!(failed.len(), 1);
    let (class, name, failure) = failed[0];
    assert_eq!(
        (class.as_str(), name.as_str()),
        ("timm-repvgg", "stages.1.0")
    );
    let (kind, message, text) = failure.as_ref().unwrap();
    assert_eq!(kind, "over-tolerance");
    for part in [
        "max |fused − unfused|",
        "atol 1.0e-6",
        "rtol 1.0e-5",
        "channel 5,",
    ] {
        assert!(message.contains(part), "`{part}` not in: {message}");
    }
    assert!(text.contains("over the tolerance"), "{text}");
    // Only channel 5's bias moved, by `delta`, so that is where fused and unfused part.
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let f = &json["verify"]["failures"][0];
    assert_eq!(f["kind"], "block");
    assert_eq!(f["worst_element"]["channel"], 5);
    let (fused, unfused) = (
        f["worst_element"]["fused"].as_f64().unwrap(),
        f["worst_element"]["unfused"].as_f64().unwrap(),
    );
    assert!(
        ((fused - unfused) - delta).abs() < 1e-3 * delta.abs(),
        "fused − unfused = {} at the worst element, the bias moved by {delta}",
        fused - unfused
    );
    let max_abs = f["max_abs_deviation"].as_f64().unwrap();
    assert!(
        (max_abs - delta.abs()).abs() < 1e-3 * delta.abs(),
        "{max_abs} vs {delta}"
    );
}

#[test]
fn junit_deploy_file_checks_fail_for_missing_extra_and_altered_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let mut deploy = read_st(&timm_deploy());
    let train_file = read_st(&train());
    deploy.remove("head.fc.bias");
    let leftover = "stages.0.0.conv_1x1.conv.weight";
    deploy.insert(leftover.into(), train_file[leftover].clone());
    let w = deploy.get_mut("head.fc.weight").unwrap();
    let v = f32_at(w, 3);
    set_f32(w, 3, v + 1.0);
    let path = dir.path().join("deploy.safetensors");
    write_st(&path, &deploy, None);
    let junit = dir.path().join("results.xml");
    let out = run(bin()
        .arg("verify")
        .arg(train())
        .arg(&path)
        .arg("--junit")
        .arg(&junit));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let j = read_junit(&junit);
    assert_eq!(count(&j, "failures"), 3);
    let failure = |name: &str| {
        j.cases
            .iter()
            .find(|c| c.0 == "deploy-file" && c.1 == name)
            .and_then(|c| c.2.clone())
            .unwrap_or_else(|| panic!("`{name}` did not fail"))
    };
    let (kind, message, _) = failure("missing tensors");
    assert_eq!(kind, "missing-tensors");
    assert!(message.contains("`head.fc.bias`"), "{message}");
    let (kind, message, _) = failure("extra tensors");
    assert_eq!(kind, "extra-tensors");
    assert!(message.contains(leftover), "{message}");
    let (kind, message, text) = failure("altered tensors");
    assert_eq!(kind, "altered-tensors");
    assert!(message.starts_with("1 tensor ") && message.contains("`head.fc.weight`"));
    assert!(text.contains("head.fc.weight: differs"), "{text}");
    // No block failed: the blocks' testcases pass.
    assert!(
        j.cases
            .iter()
            .filter(|c| c.0 == "timm-repvgg")
            .all(|c| c.2.is_none())
    );
}

#[test]
fn convert_with_verify_writes_junit_and_without_verify_refuses_it_writing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("deploy.safetensors");
    let junit = dir.path().join("junit.xml");
    let out = run(bin()
        .arg(train())
        .arg("-o")
        .arg(&output)
        .arg("--verify")
        .arg("--junit")
        .arg(&junit));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(output.is_file());
    let j = read_junit(&junit);
    assert_eq!(count(&j, "tests"), timm_blocks().len() + 3);
    assert_eq!(count(&j, "failures"), 0);

    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("deploy.safetensors");
    let out = run(bin()
        .arg(train())
        .arg("-o")
        .arg(&output)
        .arg("--junit")
        .arg(dir.path().join("junit.xml")));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("--junit needs --verify"),
        "{}",
        describe(&out)
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "a refused run wrote {left:?}");
}

#[test]
fn junit_path_that_is_an_input_or_stdout_is_refused_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("train.safetensors");
    std::fs::copy(train(), &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let output = dir.path().join("deploy.safetensors");
    for junit in [copy.clone(), PathBuf::from("-"), output.clone()] {
        let out = run(bin()
            .arg(&copy)
            .arg("-o")
            .arg(&output)
            .arg("--verify")
            .arg("--junit")
            .arg(&junit));
        assert_eq!(out.status.code(), Some(2), "{junit:?}: {}", describe(&out));
        assert!(stderr(&out).contains("JUnit") || stderr(&out).contains("--junit"));
        assert_eq!(std::fs::read(&copy).unwrap(), before);
        assert!(!output.exists(), "{junit:?}: the output was written");
    }
}

// ---------------------------------------------------------------------------------------------
// A block with a name full of XML, Markdown and workflow-command syntax
// ---------------------------------------------------------------------------------------------

const ODD: &str = "odd <&\"'> a:b,c%\n|`x`";

/// The fixture with its `stem` block renamed to [`ODD`], in train and (tampered) deploy form.
fn odd_case(dir: &TempDir) -> (PathBuf, PathBuf) {
    let train_path = dir.path().join("train.safetensors");
    write_st(
        &train_path,
        &rename_block(&read_st(&train()), "stem", ODD),
        None,
    );
    let (tampered, _) = tampered_bias(dir.path(), "stem", 2);
    let deploy_path = dir.path().join("deploy.safetensors");
    write_st(
        &deploy_path,
        &rename_block(&read_st(&tampered), "stem", ODD),
        None,
    );
    (train_path, deploy_path)
}

#[test]
fn odd_block_names_are_escaped_in_junit_job_summary_and_error_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (train_path, deploy_path) = odd_case(&dir);
    let junit = dir.path().join("results.xml");
    let summary = dir.path().join("summary.md");
    let out = run(bin()
        .arg("verify")
        .arg(&train_path)
        .arg(&deploy_path)
        .arg("--junit")
        .arg(&junit)
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));

    let j = read_junit(&junit);
    let failed: Vec<_> = j.cases.iter().filter(|c| c.2.is_some()).collect();
    assert_eq!(failed.len(), 1, "{:?}", j.cases);
    assert_eq!(failed[0].1, ODD, "the name survives the XML round trip");
    assert!(failed[0].2.as_ref().unwrap().1.contains(ODD));

    // One `::error` line for the one failure; the name's `:`, `,`, `%` and newline escaped in
    // the title, `%` and the newline in the message.
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("::error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    let escaped_title = "odd <&\"'> a%3Ab%2Cc%25%0A|`x`";
    assert!(
        lines[0].starts_with(&format!(
            "::error title=repvgg-fuse%3A block {escaped_title} failed verification::"
        )),
        "{}",
        lines[0]
    );
    let message = lines[0]
        .split_once("::")
        .unwrap()
        .1
        .split_once("::")
        .unwrap()
        .1;
    assert!(message.contains("odd <&\"'> a:b,c%25%0A|`x`"), "{message}");
    assert!(!message.contains('\r'));

    // The Markdown: the name in a code span longer than its backticks, `|` escaped for the
    // table, no line broken by the newline.
    let md = std::fs::read_to_string(&summary).unwrap();
    let row = md
        .lines()
        .find(|l| l.starts_with("| `` odd"))
        .unwrap_or_else(|| panic!("no failing-block row:\n{md}"));
    assert!(
        row.starts_with("| `` odd <&\"'> a:b,c% \\|`x` `` | "),
        "{row}"
    );
    assert_eq!(row.matches(" | ").count(), 4, "five cells: {row}");
}

// ---------------------------------------------------------------------------------------------
// Job summary and ::error lines
// ---------------------------------------------------------------------------------------------

/// 77848 → "77,848".
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let chunks: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    chunks.join(",")
}

#[test]
fn job_summary_of_a_failed_verify_is_appended_and_lists_the_failing_block() {
    let dir = tempfile::tempdir().unwrap();
    let (deploy, _) = tampered_bias(dir.path(), "stages.2.1", 0);
    let summary = dir.path().join("summary.md");
    std::fs::write(&summary, "from an earlier step\n").unwrap();
    let out = run(bin()
        .arg("verify")
        .arg(train())
        .arg(&deploy)
        .env("GITHUB_STEP_SUMMARY", &summary));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        !stderr(&out).contains("::error"),
        "no ::error without GITHUB_ACTIONS=true"
    );
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(md.starts_with("from an earlier step\n### repvgg-fuse verify: ❌ FAILED: 1 of 7 blocks, 0 other tensors"), "{md}");
    assert!(md.contains("- **blocks:** 7\n"), "{md}");
    assert!(md.contains("- **worst deviation:** "), "{md}");
    assert!(md.contains("block `stages.2.1`"), "{md}");
    let size = grouped(std::fs::metadata(&deploy).unwrap().len());
    assert!(md.contains(&format!("judged, {size} bytes")), "{md}");
    assert!(md.contains("#### Failing blocks"), "{md}");
    assert!(md.contains("| `stages.2.1` | "), "{md}");
    assert!(md.contains("channel 0, "), "{md}");
    assert!(!md.contains("worst blocks"), "{md}");
}

#[test]
fn job_summary_of_a_passing_convert_lists_the_five_worst_blocks_and_the_output_size() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("deploy.safetensors");
    let summary = dir.path().join("summary.md");
    let out = run(bin()
        .arg(train())
        .arg("-o")
        .arg(&output)
        .arg("--verify")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("GITHUB_ACTIONS", "true"));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(!stderr(&out).contains("::error"), "{}", describe(&out));
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(
        md.starts_with("### repvgg-fuse convert: ✅ passed\n"),
        "{md}"
    );
    let size = grouped(std::fs::metadata(&output).unwrap().len());
    assert!(md.contains(&format!("` written, {size} bytes")), "{md}");
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("deploy.report.json")).unwrap(),
    )
    .unwrap();
    let mut blocks: Vec<(f64, String)> = report["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["max_rel_deviation"].as_f64().unwrap(),
                b["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    blocks.sort_by(|a, b| b.0.total_cmp(&a.0));
    assert!(md.contains("#### The 5 worst blocks"), "{md}");
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| `")).collect();
    let names: Vec<String> = rows
        .iter()
        .map(|r| r.split('`').nth(1).unwrap().to_string())
        .collect();
    let expected: Vec<String> = blocks.iter().take(5).map(|b| b.1.clone()).collect();
    assert_eq!(names, expected, "{md}");
}

#[test]
fn error_exit_2_is_an_error_line_under_github_actions() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(bin()
        .arg(dir.path().join("absent.safetensors"))
        .arg("-o")
        .arg(dir.path().join("d.safetensors"))
        .env("GITHUB_ACTIONS", "true"));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.starts_with("::error title=repvgg-fuse::"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("absent.safetensors"), "{line}");
}

// ---------------------------------------------------------------------------------------------
// --report -
// ---------------------------------------------------------------------------------------------

#[test]
fn report_to_stdout_is_the_only_thing_on_stdout_and_no_file_is_named_dash() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(bin()
        .current_dir(dir.path())
        .arg(train())
        .arg("-o")
        .arg("deploy.safetensors")
        .arg("--verify")
        .args(["--report", "-"]));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document: {e}\n{}", describe(&out)));
    assert_eq!(json["summary"]["blocks"], timm_blocks().len());
    assert_eq!(json["verify"]["passed"], true);
    let mut names: Vec<&str> = json["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, timm_blocks());
    let err = stderr(&out);
    assert!(
        err.contains("fused 7 blocks") && err.contains("report on stdout"),
        "{err}"
    );
    assert!(dir.path().join("deploy.safetensors").is_file());
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["deploy.safetensors"], "no `-`, no report file");
}

#[test]
fn verify_report_to_stdout_carries_the_failure_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let (deploy, _) = tampered_bias(dir.path(), "stages.0.1", 3);
    let out = run(bin()
        .current_dir(dir.path())
        .arg("verify")
        .arg(train())
        .arg(&deploy)
        .args(["--report", "-", "-q"]));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let json: Value = serde_json::from_slice(&out.stdout).expect("stdout is the JSON report");
    assert_eq!(json["verify"]["passed"], false);
    assert_eq!(json["verify"]["failures"][0]["name"], "stages.0.1");
    assert_eq!(json["verify"]["failures"][0]["worst_element"]["channel"], 3);
    assert!(stderr(&out).contains("verify: FAILED `stages.0.1`"));
    assert!(!dir.path().join("-").exists());
}

// ---------------------------------------------------------------------------------------------
// The README's recipes
// ---------------------------------------------------------------------------------------------

#[test]
fn readme_ci_recipes_pass_on_timms_deploy_file_and_fail_on_a_tampered_one() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ci_recipes.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .env("REPVGG_FUSE", env!("CARGO_BIN_EXE_repvgg-fuse"))
        .env_remove("GITHUB_ACTIONS")
        .env_remove("GITHUB_STEP_SUMMARY")
        .output()
        .expect("bash runs");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ci_recipes: 4 passed, 0 failed"));
}

// ---------------------------------------------------------------------------------------------
// The worst element's position
// ---------------------------------------------------------------------------------------------

#[test]
fn worst_element_is_located_by_image_channel_row_and_column() {
    use ndarray::Array2;
    use repvgg_fuse::deviation::between;
    // 2 channels × (2 images of 3×4): columns are (image·h + y)·w + x.
    let (h, w) = (3, 4);
    let reference = Array2::<f64>::from_shape_fn((2, 2 * h * w), |(r, c)| (r * 100 + c) as f64);
    let mut candidate = reference.clone();
    let col = (h + 2) * w + 3; // image 1, y 2, x 3
    candidate[[1, col]] += 0.5;
    candidate[[0, 0]] += 0.25;
    let d = between(&reference, &candidate, 7, [h, w]);
    let e = d.worst.expect("a worst element");
    assert_eq!((e.image, e.channel, e.y, e.x), (1, 8, 2, 3));
    assert_eq!(
        (e.unfused, e.fused),
        (reference[[1, col]], reference[[1, col]] + 0.5)
    );
    assert_eq!(d.max_abs, 0.5);
    // Equal outputs have no worst element.
    assert!(between(&reference, &reference, 0, [h, w]).worst.is_none());
}
