//! Layouts as data: a user layout file, checkpoints that mix layouts, `--layout`, and what
//! `inspect` prints. Inputs are the framework-made fixtures with their keys renamed or merged
//! here; expected fused values are the framework's own (`deploy_f64.safetensors`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn fixture(case: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(case)
        .join(file)
}

/// Owned copy of a safetensors file's tensors: name → (dtype, shape, bytes).
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn read(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).expect("fixture readable");
    let st = SafeTensors::deserialize(&bytes).expect("fixture is safetensors");
    let mut v: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn write(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write");
}

/// Renames the timm branch names to an in-house fork's.
fn fork_name(name: &str) -> String {
    name.replace(".conv_kxk.", ".dense.")
        .replace(".conv_1x1.", ".point.")
        .replace(".identity.", ".skip.")
        .replace(".reparam_conv.", ".fused.")
}

fn bin() -> Command {
    Command::cargo_bin("repvgg-fuse").expect("binary built")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn user_layout_file_converts_an_in_house_fork_like_the_framework() {
    let dir = tempfile::tempdir().unwrap();
    let train: Tensors = read(&fixture("timm_repvgg", "train.safetensors"))
        .into_iter()
        .map(|(n, d, s, b)| (fork_name(&n), d, s, b))
        .collect();
    let input = dir.path().join("fork.safetensors");
    write(&input, &train);
    let layout = dir.path().join("fork.json");
    std::fs::write(
        &layout,
        r#"{ "name": "my-fork",
             "branches": [
               { "role": "kxk", "path": "dense", "conv": "conv", "bn": "bn" },
               { "role": "scale", "path": "point", "conv": "conv", "bn": "bn" },
               { "role": "identity", "path": "skip" } ],
             "deploy": { "weight": "fused.weight", "bias": "fused.bias" } }"#,
    )
    .unwrap();

    // Without the layout file nothing is recognised: exit 2, naming the file.
    let out = dir.path().join("out.safetensors");
    let assert = bin().arg(&input).arg("-o").arg(&out).assert().code(2);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(stderr.contains("fork.safetensors"), "{stderr}");
    assert!(stderr.contains("no re-parameterizable block"), "{stderr}");
    assert!(!out.exists());

    bin()
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .arg("--layout-file")
        .arg(&layout)
        .arg("--verify")
        .assert()
        .code(0);
    let got: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = read(&out)
        .into_iter()
        .map(|(n, d, s, b)| (n, (d, s, b)))
        .collect();
    let reference = read(&fixture("timm_repvgg", "deploy_f64.safetensors"));
    assert_eq!(got.len(), reference.len());
    for (name, _, shape, bytes) in reference {
        let name = fork_name(&name);
        let (dtype, got_shape, got_bytes) =
            got.get(&name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(*dtype, Dtype::F32, "{name}");
        assert_eq!(got_shape, &shape, "{name}");
        let expected: Vec<f32> = bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect();
        let actual = f32s(got_bytes);
        for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
            let ulps = (a.to_bits() as i64 - e.to_bits() as i64).abs();
            assert!(ulps <= 1 || a == e, "{name}[{i}]: {a} vs timm's {e}");
        }
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out.report.json")).unwrap())
            .unwrap();
    assert_eq!(report["layout"]["name"], "my-fork");
    assert_eq!(report["layout"]["chosen_by"], "--layout-file");
}

#[test]
fn checkpoint_mixing_two_layouts_is_refused_naming_both_unless_one_is_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let mut mixed: Tensors = read(&fixture("timm_repvgg", "train.safetensors"))
        .into_iter()
        .map(|(n, d, s, b)| (format!("a.{n}"), d, s, b))
        .collect();
    mixed.extend(
        read(&fixture("official_repvgg", "train.safetensors"))
            .into_iter()
            .map(|(n, d, s, b)| (format!("b.{n}"), d, s, b)),
    );
    let input = dir.path().join("mixed.safetensors");
    write(&input, &mixed);
    let out = dir.path().join("out.safetensors");

    let assert = bin().arg(&input).arg("-o").arg(&out).assert().code(2);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    for needle in [
        "mixed.safetensors",
        "mixes layouts",
        "timm-repvgg",
        "official",
        "--layout",
    ] {
        assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "nothing written"
    );

    // Choosing one converts its blocks and carries the other's tensors over untouched.
    bin()
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .args(["--layout", "official", "--verify", "-q"])
        .assert()
        .code(0);
    let got: HashMap<String, Vec<u8>> = read(&out).into_iter().map(|(n, _, _, b)| (n, b)).collect();
    let official_deploy = read(&fixture("official_repvgg", "deploy.safetensors"));
    for (name, ..) in &official_deploy {
        assert!(got.contains_key(&format!("b.{name}")), "b.{name} missing");
    }
    for (name, _, _, bytes) in read(&fixture("timm_repvgg", "train.safetensors")) {
        assert_eq!(
            got.get(&format!("a.{name}")),
            Some(&bytes),
            "a.{name} not carried over"
        );
    }
}

#[test]
fn unknown_layout_name_lists_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let assert = bin()
        .arg(fixture("timm_repvgg", "train.safetensors"))
        .arg("-o")
        .arg(dir.path().join("o.safetensors"))
        .args(["--layout", "nope"])
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    assert!(stderr.contains("unknown layout `nope`"), "{stderr}");
    assert!(stderr.contains("mmpretrain-mobileone"), "{stderr}");
}

#[test]
fn inspect_prints_layout_blocks_and_what_would_be_written() {
    let case: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture("ultralytics_repconv", "case.json")).unwrap(),
    )
    .unwrap();
    let assert = bin()
        .arg("inspect")
        .arg(fixture("ultralytics_repconv", "train.safetensors"))
        .assert()
        .code(0);
    let stdout = String::from_utf8_lossy(&assert.get_output().stdout).into_owned();
    assert!(stdout.contains("layout ultralytics"), "{stdout}");
    assert!(stdout.contains("BN ε 1e-3"), "{stdout}");
    let blocks = case["blocks"].as_array().unwrap();
    assert!(
        stdout.contains(&format!("{} blocks:", blocks.len())),
        "{stdout}"
    );
    for b in blocks {
        assert!(stdout.contains(b["name"].as_str().unwrap()), "{stdout}");
    }
    assert!(stdout.contains("would write"), "{stdout}");
}

#[test]
fn bn_eps_source_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    bin()
        .arg(fixture("yolov7_repconv", "train.safetensors"))
        .arg("-o")
        .arg(&out)
        .arg("-q")
        .assert()
        .code(0);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("o.report.json")).unwrap()).unwrap();
    assert_eq!(report["bn_eps"]["value"], 1e-3);
    assert!(
        report["bn_eps"]["source"]
            .as_str()
            .unwrap()
            .contains("YOLOv7")
    );

    bin()
        .arg(fixture("yolov7_repconv", "train.safetensors"))
        .arg("-o")
        .arg(&out)
        .args(["-q", "--bn-eps", "1e-4"])
        .assert()
        .code(0);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("o.report.json")).unwrap()).unwrap();
    assert_eq!(report["bn_eps"]["value"], 1e-4);
    assert_eq!(report["bn_eps"]["source"], "--bn-eps");
}

/// `--help` names every built-in layout, so a user can find the one to force.
#[test]
fn help_names_every_builtin_layout() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_repvgg-fuse"))
        .arg("--help")
        .output()
        .expect("the binary runs");
    let help = String::from_utf8_lossy(&out.stdout).replace(['\n', ' '], "");
    for layout in repvgg_fuse::find::Layout::builtin().expect("the built-in table parses") {
        assert!(
            help.contains(&layout.name),
            "--help does not name layout `{}`",
            layout.name
        );
    }
}
