//! Every file a run writes is finished before any is put in place: a JUnit file or job summary
//! that cannot be written at the end of a run (after the checks before it passed) exits 2 with
//! no deploy file in place and an existing one untouched. Also: the job summary keeps what
//! earlier steps wrote, warnings reach the report and stderr through one channel, and the
//! library's `Outcome` carries the whole verdict, the INT8 gate included.
//!
//! The write-time failure: a path in `/proc`. Its folder exists and the path is no directory,
//! so the checks before the run pass, but no file can be created there, not even by root
//! (the tests run as root, for whom a chmod 0555 folder is writable).

use std::path::{Path, PathBuf};

mod common;

use common::{bin, describe, run, stderr};
use repvgg_fuse::app::{CiOutputs, ReportTo};
use repvgg_fuse::progress::Hooks;
use repvgg_fuse::{Settings, convert};
use serde_json::Value;

fn train() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/timm_repvgg/train.safetensors")
}

/// A path whose folder exists but where no file can be created.
fn unwritable(name: &str) -> PathBuf {
    Path::new("/proc").join(format!("repvgg-fuse-test-{}-{name}", std::process::id()))
}

/// The names of the files in `dir`, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn junit_write_failure_leaves_no_deploy_file_and_no_report() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("deploy.safetensors");
    let junit = unwritable("junit.xml");
    let out = run(bin()
        .arg(train())
        .arg("-o")
        .arg(&output)
        .arg("--verify")
        .arg("--junit")
        .arg(&junit));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains(&junit.display().to_string()),
        "the error names the JUnit file: {}",
        describe(&out)
    );
    assert!(
        files_in(dir.path()).is_empty(),
        "nothing is put in place, no temp file is left: {:?}",
        files_in(dir.path())
    );
}

#[test]
fn junit_write_failure_leaves_an_existing_deploy_file_and_report_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("deploy.safetensors");
    let report = dir.path().join("deploy.report.json");
    std::fs::write(&output, b"the deploy file of an earlier run").unwrap();
    std::fs::write(&report, b"{\"earlier\": true}\n").unwrap();
    let out = run(bin()
        .arg(train())
        .arg("-o")
        .arg(&output)
        .arg("--verify")
        .arg("--junit")
        .arg(unwritable("junit.xml")));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert_eq!(
        std::fs::read(&output).unwrap(),
        b"the deploy file of an earlier run"
    );
    assert_eq!(std::fs::read(&report).unwrap(), b"{\"earlier\": true}\n");
    assert_eq!(
        files_in(dir.path()),
        ["deploy.report.json", "deploy.safetensors"]
    );
}

#[test]
fn job_summary_write_failure_leaves_no_deploy_file() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("deploy.safetensors");
    let summary = unwritable("summary.md");
    let out = run(bin()
        .arg(train())
        .arg("-o")
        .arg(&output)
        .arg("--verify")
        .env("GITHUB_STEP_SUMMARY", &summary));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains(&summary.display().to_string()),
        "{}",
        describe(&out)
    );
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );
}

#[test]
fn verify_with_an_unwritable_junit_file_writes_no_report() {
    let dir = tempfile::tempdir().unwrap();
    let deploy =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/timm_repvgg/deploy.safetensors");
    let report = dir.path().join("report.json");
    let out = run(bin()
        .arg("verify")
        .arg(train())
        .arg(&deploy)
        .arg("--report")
        .arg(&report)
        .arg("--junit")
        .arg(unwritable("junit.xml")));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );
}

#[test]
fn job_summary_keeps_the_bytes_earlier_steps_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.md");
    // Not UTF-8: the earlier content is kept byte for byte, whatever it is.
    let earlier: &[u8] = b"earlier step \xff\xfe\n";
    std::fs::write(&summary, earlier).unwrap();
    let output = dir.path().join("deploy.safetensors");
    let out = run(bin()
        .arg(train())
        .arg("-o")
        .arg(&output)
        .env("GITHUB_STEP_SUMMARY", &summary));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let md = std::fs::read(&summary).unwrap();
    assert!(
        md.starts_with(earlier),
        "{:?}",
        String::from_utf8_lossy(&md)
    );
    assert!(
        md[earlier.len()..].starts_with("### repvgg-fuse convert: ✅ converted".as_bytes()),
        "{:?}",
        String::from_utf8_lossy(&md)
    );
}

#[test]
fn suspicious_globals_warn_on_stderr_and_in_the_report() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/torch_payload");
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("deploy.safetensors");
    let out = run(bin().arg(case.join("train.pth")).arg("-o").arg(&output));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("deploy.report.json")).unwrap(),
    )
    .unwrap();
    let warnings = report["warnings"].as_array().expect("a warnings array");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["kind"], "suspicious_globals");
    let message = warnings[0]["message"].as_str().unwrap();
    assert!(message.contains("posix.system"), "{message}");
    let line = format!("warning: {message}");
    assert!(
        stderr(&out).lines().any(|l| l == line),
        "stderr has `{line}`: {}",
        describe(&out)
    );

    // A safetensors input has nothing to warn about: the array is there, empty.
    let out = run(bin().arg(train()).arg("-o").arg(&output));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("deploy.report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["warnings"], Value::Array(Vec::new()));
    assert!(!stderr(&out).contains("warning"), "{}", describe(&out));
}

#[test]
fn library_outcome_carries_the_int8_gate_and_the_deploy_file_is_still_written() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("deploy.safetensors");
    // No fused weight of a real model quantizes to 1000 dB: every block is below the gate.
    let settings = Settings {
        int8_min_db: Some(1000.0),
        ..Settings::default()
    };
    let outcome = convert(
        &train(),
        &output,
        ReportTo::Caller,
        &settings,
        true,
        Hooks::none(),
    )
    .unwrap();
    assert!(outcome.report.verified(), "the verification passed");
    assert!(!outcome.passed(), "the INT8 gate did not");
    let gate = outcome.int8_gate.as_ref().expect("a gate was set");
    assert_eq!(gate.low.len(), outcome.report.blocks.len());
    assert!(
        output.is_file(),
        "the gate does not hold back the deploy file"
    );

    // Without a gate the same run passes.
    let outcome = convert(
        &train(),
        &output,
        ReportTo::Caller,
        &Settings::default(),
        true,
        Hooks::none(),
    )
    .unwrap();
    assert!(outcome.passed() && outcome.int8_gate.is_none());
}

#[test]
fn library_convert_refuses_junit_without_verify_writing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("deploy.safetensors");
    let settings = Settings {
        ci: CiOutputs {
            junit: Some(dir.path().join("junit.xml")),
            ..CiOutputs::default()
        },
        ..Settings::default()
    };
    let err = convert(
        &train(),
        &output,
        ReportTo::Beside,
        &settings,
        false,
        Hooks::none(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("--junit needs --verify"), "{err}");
    assert!(files_in(dir.path()).is_empty());
}
