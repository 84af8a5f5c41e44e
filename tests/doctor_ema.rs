//! The checkpoint doctor on files holding both raw and EMA weights (fixtures/doctor_ema_*,
//! made by `make_family2_fixtures.py`: a timm `CheckpointSaver` dict and an ultralytics
//! `last.pt` with `model` and `ema`). The tool reads what the framework's own loader reads
//! (`case.json` → `expect.framework_loader_reads`), says so in a warning on stderr and in
//! `report.warnings` naming both entries, and `--key` picks the other one.

use std::path::{Path, PathBuf};

mod common;

use common::{bin, describe, read_st};
use serde_json::Value;
use tempfile::TempDir;

/// The fixtures, with the flags a user converts them with (YOLO11 has no multi-branch block:
/// its deploy form is ultralytics' `fuse()`, `--fold-bn`).
const CASES: [(&str, &[&str]); 2] = [
    ("doctor_ema_timm", &[]),
    ("doctor_ema_ultralytics", &["--fold-bn"]),
];

fn fixture(case: &str) -> (PathBuf, Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(case);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let file = dir.join(json["file"].as_str().unwrap());
    (file, json)
}

/// Converts `input` with `args`; returns the run, the report and the deploy file's path.
fn convert(
    input: &Path,
    tmp: &TempDir,
    name: &str,
    args: &[&str],
) -> (std::process::Output, Value, PathBuf) {
    let out = tmp.path().join(format!("{name}.safetensors"));
    let report = tmp.path().join(format!("{name}.json"));
    let run = bin()
        .arg(input)
        .arg("-o")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .args(args)
        .output()
        .unwrap();
    let json = std::fs::read_to_string(&report)
        .map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or(Value::Null);
    (run, json, out)
}

#[test]
fn raw_and_ema_weights_read_what_the_framework_reads_and_say_so() {
    for (case, flags) in CASES {
        let (input, json) = fixture(case);
        let expect = &json["expect"];
        let (raw, ema) = (
            expect["raw_key"].as_str().unwrap(),
            expect["ema_key"].as_str().unwrap(),
        );
        let reads = expect["framework_loader_reads"].as_str().unwrap();
        let other = if reads == raw { ema } else { raw };
        let tmp = tempfile::tempdir().unwrap();

        let (run, report, out) = convert(&input, &tmp, "default", flags);
        assert_eq!(
            run.status.code(),
            expect["exit_code"].as_i64().map(|c| c as i32),
            "{case}: {}",
            describe(&run)
        );
        let stderr = String::from_utf8_lossy(&run.stderr);
        let warnings = report["warnings"].as_array().unwrap();
        let warning = warnings
            .iter()
            .find(|w| w["kind"] == "raw_and_ema")
            .unwrap_or_else(|| panic!("{case}: no raw_and_ema warning in {warnings:?}"));
        let message = warning["message"].as_str().unwrap();
        for needle in [format!("`{reads}`"), format!("--key {other}")] {
            assert!(
                message.contains(&needle),
                "{case}: {message:?} lacks {needle:?}"
            );
        }
        assert!(
            stderr.contains(message),
            "{case}: stderr lacks the warning: {stderr}"
        );
        assert_eq!(report["source"]["key"], reads, "{case}: {report}");

        // The default is exactly `--key <what the framework reads>`, and the other entry is
        // different weights (the fixture's two sets differ).
        let (run, chosen, same) =
            convert(&input, &tmp, "same", &[flags, &["--key", reads]].concat());
        assert!(run.status.success(), "{case}: {}", describe(&run));
        assert!(
            chosen["warnings"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["kind"] != "raw_and_ema"),
            "{case}: --key chose, no warning due"
        );
        let (run, _, differ) = convert(&input, &tmp, "other", &[flags, &["--key", other]].concat());
        assert!(run.status.success(), "{case}: {}", describe(&run));
        let (a, b, c) = (read_st(&out), read_st(&same), read_st(&differ));
        assert_eq!(a, b, "{case}: the default differs from --key {reads}");
        assert_ne!(a, c, "{case}: --key {other} gave the same weights");
    }
}
