//! RIFormer and OREPA (fixtures/fam2_riformer, fixtures/fam2_orepa, made by
//! `make_family2_fixtures.py`: mmpretrain 1.2.0's own `RIFormer.switch_to_deploy()`, and OREPA's
//! `blocks.py` re-implemented and checked train = deploy in float64). Each is converted by the
//! real binary with `--verify` and held to the framework's deploy file: the same keys, shapes
//! and dtypes, the fused tensors within 1 ulp of `deploy_f64`, every other tensor byte for byte,
//! the report naming each block's ops. The expected values are the fixture files', read with
//! the `safetensors` crate.

use std::path::{Path, PathBuf};

mod common;

use common::{Tensors, bin, describe, ordered, read_st, run, stderr, to_f64, write_st};
use safetensors::Dtype;
use serde_json::Value;

/// A fixture, the layout it is detected as, and the ops the report gives each of its blocks.
struct Family {
    dir: &'static str,
    layout: &'static str,
    ops: &'static [&'static str],
}

const FAMILIES: [Family; 2] = [
    Family {
        dir: "fam2_riformer",
        layout: "mmpretrain-riformer",
        ops: &["identity+affine+affine", "-(identity+affine)"],
    },
    Family {
        dir: "fam2_orepa",
        layout: "orepa",
        ops: &["orepa3x3+bn"],
    },
];

fn fixture(dir: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(dir)
        .join(file)
}

/// The deploy keys case.json says each block produces.
fn produced(dir: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture(dir, "case.json")).expect("case.json");
    let json: Value = serde_json::from_str(&text).expect("case.json is JSON");
    let blocks = json["blocks"].as_array().expect("blocks[]");
    blocks
        .iter()
        .flat_map(|b| b["produces"].as_object().expect("produces").keys().cloned())
        .collect()
}

/// `repvgg-fuse train -o deploy --verify` in a fresh folder: the deploy file and the report.
fn convert(dir: &str, train: &Path) -> (tempfile::TempDir, Tensors, Value) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (out, report) = (tmp.path().join("d.safetensors"), tmp.path().join("r.json"));
    let done = run(bin()
        .arg(train)
        .arg("-o")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .arg("--verify"));
    assert_eq!(done.status.code(), Some(0), "{dir}: {}", describe(&done));
    let report = std::fs::read_to_string(&report).expect("report written");
    let report = serde_json::from_str(&report).expect("report is JSON");
    (tmp, read_st(&out), report)
}

/// The largest distance in F32 ulps between the two tensors' values.
fn worst_f32_ulps(ours: &[f64], exact: &[f64]) -> i64 {
    let bits = |v: f64| ordered(u64::from((v as f32).to_bits()), 32);
    let each = ours
        .iter()
        .zip(exact)
        .map(|(a, b)| (bits(*a) - bits(*b)).abs());
    each.max().unwrap_or(i64::MAX)
}

#[test]
fn riformer_and_orepa_match_the_framework_deploy_file() {
    for f in &FAMILIES {
        let train_path = fixture(f.dir, "train.safetensors");
        let (_tmp, ours, report) = convert(f.dir, &train_path);
        let theirs = read_st(&fixture(f.dir, "deploy.safetensors"));
        let exact = read_st(&fixture(f.dir, "deploy_f64.safetensors"));
        let train = read_st(&train_path);
        let keys = |t: &Tensors| t.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&ours), keys(&theirs), "{}: key set", f.dir);
        let fused = produced(f.dir);
        for (name, t) in &ours {
            let r = &theirs[name];
            assert_eq!(
                (t.dtype, &t.shape),
                (r.dtype, &r.shape),
                "{}: `{name}`",
                f.dir
            );
            if fused.contains(name) {
                assert_eq!(t.dtype, Dtype::F32, "{}: `{name}`", f.dir);
                let ulps = worst_f32_ulps(&to_f64(t), &to_f64(&exact[name]));
                assert!(
                    ulps <= 1,
                    "{}: `{name}` is {ulps} ulp off the f64 fusion",
                    f.dir
                );
            } else {
                assert_eq!(Some(t), train.get(name), "{}: pass-through `{name}`", f.dir);
            }
        }
        assert_eq!(report["layout"]["name"], f.layout, "{}", f.dir);
        let blocks = report["blocks"].as_array().expect("report blocks[]");
        assert_eq!(
            blocks.len() * 2,
            fused.len(),
            "{}: one block per fused pair",
            f.dir
        );
        for b in blocks {
            assert_eq!(
                b["ops"],
                serde_json::json!(f.ops),
                "{}: {}",
                f.dir,
                b["name"]
            );
        }
    }
}

/// `verify` passes the framework's own deploy file and fails it (exit 1, naming the block)
/// with one fused value off by a little more than the tolerance.
#[test]
fn verify_passes_the_framework_deploy_and_catches_a_changed_value() {
    for (f, name) in FAMILIES.iter().zip([
        "network.2.0.norm_reparam.bias",
        "blocks.1.orepa_reparam.weight",
    ]) {
        let train = fixture(f.dir, "train.safetensors");
        let theirs = fixture(f.dir, "deploy.safetensors");
        let ok = run(bin().arg("verify").arg(&train).arg(&theirs));
        assert_eq!(ok.status.code(), Some(0), "{}: {}", f.dir, describe(&ok));
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut changed = read_st(&theirs);
        let t = changed.get_mut(name).expect("fused tensor");
        let v = f32::from_le_bytes(t.data[12..16].try_into().expect("4 bytes"));
        t.data[12..16].copy_from_slice(&(v + 1e-3).to_le_bytes());
        let bad = tmp.path().join("bad.safetensors");
        write_st(&bad, &changed, None);
        let out = run(bin().arg("verify").arg(&train).arg(&bad));
        assert_eq!(out.status.code(), Some(1), "{}: {}", f.dir, describe(&out));
        let block = name.rsplitn(3, '.').nth(2).expect("block prefix");
        assert!(
            stderr(&out).contains(block),
            "{}: {}",
            f.dir,
            describe(&out)
        );
    }
}

/// A train file whose tensors do not fit together is refused (exit 2) naming the tensor, and
/// nothing is written.
#[test]
fn malformed_riformer_and_orepa_blocks_are_refused_naming_the_tensor() {
    let cases: [(&str, &str, Option<Vec<usize>>); 3] = [
        // OREPA's per-branch weights must be [6, out], not [out, 6].
        ("fam2_orepa", "blocks.0.vector", Some(vec![8, 6])),
        // Its prior must be [out, k, k] (read as stored, never rebuilt).
        (
            "fam2_orepa",
            "blocks.3.weight_orepa_prior",
            Some(vec![8, 9]),
        ),
        // A RIFormer mixer without its bias is half an affine.
        ("fam2_riformer", "network.0.0.token_mixer.affine.bias", None),
    ];
    for (dir, name, shape) in cases {
        let mut train = read_st(&fixture(dir, "train.safetensors"));
        let reshaped = shape.is_some();
        match shape {
            Some(shape) => train.get_mut(name).expect("tensor").shape = shape,
            None => drop(train.remove(name)),
        }
        let tmp = tempfile::tempdir().expect("temp dir");
        let input = tmp.path().join("train.safetensors");
        write_st(&input, &train, None);
        let output = tmp.path().join("d.safetensors");
        let out = run(bin().arg(&input).arg("-o").arg(&output));
        assert_eq!(out.status.code(), Some(2), "{name}: {}", describe(&out));
        let shown = if reshaped { name } else { "network.0.0" };
        assert!(stderr(&out).contains(shown), "{name}: {}", describe(&out));
        assert!(!output.exists(), "{name}: a failed run wrote its output");
    }
}

#[test]
fn layout_help_lists_riformer_and_orepa() {
    let out = run(bin().arg("--help"));
    let help = String::from_utf8_lossy(&out.stdout);
    for name in ["mmpretrain-riformer", "orepa"] {
        assert!(help.contains(name), "--help does not list {name}:\n{help}");
    }
}
