//! The issue-18 families (fixtures/fam2_*, foldbn_*, made by `make_family2_fixtures.py` with
//! the frameworks' own code: ultralytics, transformers, super-gradients, python-doctr, and
//! re-implementations of YOLOv6's and Apple's blocks checked train = deploy in float64). Every
//! case is converted with `--verify` by the real binary and held to the framework's deploy file:
//! the exact key set with shapes and dtypes, every fused tensor within 1 ulp of the framework's
//! float64 fusion, every other tensor byte for byte, the report naming each block's ops; and
//! `verify` accepts the framework's own deploy file. Expected values come from the fixture
//! files only, read with the `safetensors` crate.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

mod common;

use common::{Tensors, bin, describe, ordered, read_st, to_f64, write_st};
use safetensors::Dtype;
use serde_json::Value;
use tempfile::TempDir;

/// One case: the fixture, the layout it must be found as, extra arguments, and block
/// prefixes left out of the comparison (with their tensors removed from the train file).
struct Case {
    dir: &'static str,
    layout: &'static str,
    args: &'static [&'static str],
    without: &'static [&'static str],
}

const fn case(dir: &'static str, layout: &'static str, args: &'static [&'static str]) -> Case {
    Case {
        dir,
        layout,
        args,
        without: &[],
    }
}

/// The identity rule (in == out, read as the kernel's `[out, in/groups]`) is wrong for the
/// fixtures' in == out blocks at stride 2 or with the residual off (`rule_wrong_blocks`), and
/// for a grouped in == out block (`[12, 6]` reads as 6 → 12): `--identity` corrects each.
const CASES: &[Case] = &[
    case("fam2_ultralytics_repvggdw", "ultralytics-repvggdw", &[]),
    case("fam2_rtdetr_repvgg", "rtdetr-repvgg", &[]),
    case("fam2_sg_alpha_repvgg", "sg-alpha-repvgg", &[]),
    case(
        "fam2_qarepvgg_sg",
        "sg-qarepvgg",
        &[
            "--layout",
            "sg-qarepvgg",
            "--identity",
            "blocks.2=off",
            "--identity",
            "blocks.4=off",
            "--identity",
            "blocks.5=on",
        ],
    ),
    case(
        "fam2_qarepvgg_sg_partial",
        "sg-qarepvgg-partial",
        &[
            "--layout",
            "sg-qarepvgg-partial",
            "--identity",
            "blocks.2=off",
            "--identity",
            "blocks.4=off",
            "--identity",
            "blocks.5=on",
        ],
    ),
    case(
        "fam2_yolov6_qarepvgg",
        "yolov6-qarepvgg",
        &[
            "--layout",
            "yolov6-qarepvgg",
            "--identity",
            "blocks.2=off",
            "--identity",
            "blocks.3=on",
        ],
    ),
    case(
        "fam2_yolov6_qarepvgg_v2",
        "yolov6-qarepvgg-v2",
        &[
            "--layout",
            "yolov6-qarepvgg-v2",
            "--identity",
            "blocks.2=off",
            "--identity",
            "blocks.3=on",
        ],
    ),
    // docTR's (1, 3), (3, 1) and (3, 5) layers and MobileCLIP's text RepMixer (1×k) fuse
    // into the framework's kh×kw deploy convs.
    case("fam2_doctr_fastconv", "doctr-fast", &[]),
    case("fam2_apple_mobileclip", "apple-mobileclip", &[]),
];

/// `--fold-bn` on whole models (fixtures/foldbn_*): the deploy file holds what the framework's
/// own fuse holds (ultralytics' `fuse()` without its head pruning, docTR's `reparameterize()`),
/// ultralytics' ConvTranspose + BN (the BN scale on dim 1 of a transposed weight) and docTR
/// FAST's kh×kw layers included.
const FOLD_CASES: &[Case] = &[
    case("foldbn_yolo11", "ultralytics-fold", &["--fold-bn"]),
    case("foldbn_yolov10", "ultralytics-repvggdw", &["--fold-bn"]),
    case("foldbn_rtdetr", "ultralytics", &["--fold-bn"]),
    case("foldbn_ultralytics_modules", "ultralytics", &["--fold-bn"]),
    case("foldbn_doctr_fast", "doctr-fast", &["--fold-bn"]),
];

/// Every case, layouts and folds.
fn all_cases() -> impl Iterator<Item = &'static Case> {
    CASES.iter().chain(FOLD_CASES)
}

fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(case)
}

fn case_json(case: &str) -> Value {
    let path = fixture_dir(case).join("case.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{case}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: case.json: {e}"))
}

/// Every train key some block of case.json consumes, and every deploy key one produces, of
/// the blocks not left out.
fn consumed_produced(json: &Value, without: &[&str]) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut consumed, mut produced) = (BTreeSet::new(), BTreeSet::new());
    let kept = |k: &String| !without.iter().any(|w| k.starts_with(w));
    for b in json["blocks"].as_array().expect("blocks[]") {
        let keys = |what: &str| -> Vec<String> {
            b[what].as_object().expect(what).keys().cloned().collect()
        };
        consumed.extend(keys("consumes").into_iter().filter(kept));
        produced.extend(keys("produces").into_iter().filter(kept));
    }
    (consumed, produced)
}

/// The distance in ulps of `dtype` between two values.
fn ulps(a: f64, b: f64, dtype: Dtype) -> i64 {
    let bits = |v: f64| match dtype {
        Dtype::F32 => ordered((v as f32).to_bits() as u64, 32),
        Dtype::F64 => ordered(v.to_bits(), 64),
        d => panic!("no ulps for {d:?}"),
    };
    (bits(a) - bits(b)).abs()
}

/// A fixture's file without the tensors under `without`.
fn without(tensors: Tensors, without: &[&str]) -> Tensors {
    tensors
        .into_iter()
        .filter(|(k, _)| !without.iter().any(|w| k.starts_with(w)))
        .collect()
}

struct Converted {
    _dir: TempDir,
    input: PathBuf,
    output: PathBuf,
    report: Value,
}

/// `repvgg-fuse train -o … --verify` with the case's arguments, which must exit 0.
fn convert(c: &Case, extra: &[&str]) -> Converted {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("train.safetensors");
    let train = read_st(&fixture_dir(c.dir).join("train.safetensors"));
    write_st(&input, &without(train, c.without), None);
    let output = dir.path().join("deploy.safetensors");
    let report = dir.path().join("report.json");
    let out = bin()
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .arg("--report")
        .arg(&report)
        .arg("--verify")
        .args(c.args)
        .args(extra)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}: convert --verify failed:\n{}",
        c.dir,
        describe(&out)
    );
    let text = std::fs::read_to_string(&report).expect("report written");
    Converted {
        _dir: dir,
        input,
        output,
        report: serde_json::from_str(&text).expect("report is JSON"),
    }
}

/// Everything wrong with `ours` against the framework's deploy file: the key set, shapes,
/// dtypes, fused values (1 ulp of deploy_f64), pass-through bytes.
fn file_problems(
    c: &Case,
    ours: &Tensors,
    consumed: &BTreeSet<String>,
    produced: &BTreeSet<String>,
) -> Vec<String> {
    let dir = fixture_dir(c.dir);
    let theirs = without(read_st(&dir.join("deploy.safetensors")), c.without);
    let f64_ref = read_st(&dir.join("deploy_f64.safetensors"));
    let train = read_st(&dir.join("train.safetensors"));
    let mut problems = Vec::new();
    let mut say = |p: String| problems.push(format!("{}: {p}", c.dir));
    let keys = |f: &Tensors| f.keys().cloned().collect::<BTreeSet<_>>();
    if keys(ours) != keys(&theirs) {
        let missing: Vec<_> = keys(&theirs).difference(&keys(ours)).cloned().collect();
        let extra: Vec<_> = keys(ours).difference(&keys(&theirs)).cloned().collect();
        say(format!(
            "keys differ: missing {missing:?}, unexpected {extra:?}"
        ));
    }
    for (k, t) in ours.iter().filter(|(k, _)| theirs.contains_key(*k)) {
        let r = &theirs[k];
        if t.shape != r.shape || t.dtype != r.dtype {
            say(format!(
                "`{k}` is {:?} {:?}; the framework's deploy has {:?} {:?}",
                t.dtype, t.shape, r.dtype, r.shape
            ));
        }
    }
    for k in produced {
        let (Some(t), Some(r)) = (ours.get(k), f64_ref.get(k)) else {
            say(format!("fused `{k}` missing here or in deploy_f64"));
            continue;
        };
        let (got, want) = (to_f64(t), to_f64(r));
        let worst = (got.iter().zip(&want))
            .map(|(&g, &w)| ulps(g, w, t.dtype))
            .max()
            .unwrap_or(0);
        if worst > 1 || got.len() != want.len() {
            say(format!("fused `{k}` is {worst} ulp from the f64 fusion"));
        }
    }
    for (k, t) in ours.iter().filter(|(k, _)| !produced.contains(*k)) {
        if consumed.contains(k) || train.get(k) != Some(t) {
            say(format!("pass-through `{k}` is not the train file's tensor"));
        }
    }
    problems
}

/// The report names every block's ops and its kernel's `[kh, kw]` as the framework's deploy
/// weight has it, and its fused tensors are case.json's.
fn report_problems(c: &Case, report: &Value, produced: &BTreeSet<String>) -> Vec<String> {
    let theirs = read_st(&fixture_dir(c.dir).join("deploy.safetensors"));
    let mut problems = Vec::new();
    if report["layout"]["name"] != c.layout {
        problems.push(format!(
            "{}: detected as {}",
            c.dir, report["layout"]["name"]
        ));
    }
    let mut fused = BTreeSet::new();
    for b in report["blocks"].as_array().expect("report blocks[]") {
        let ops: Vec<&str> = (b["ops"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        if !ops.iter().any(|o| o.contains("conv")) {
            problems.push(format!(
                "{}: report block {} names no ops",
                c.dir, b["name"]
            ));
        }
        for k in ["deploy_weight", "deploy_bias"] {
            fused.insert(b[k].as_str().unwrap_or_default().to_string());
        }
        let weight = theirs.get(b["deploy_weight"].as_str().unwrap_or_default());
        let hw = weight
            .and_then(|t| t.shape.get(2..4))
            .map(<[usize]>::to_vec);
        if let Some(hw) = hw
            && b["kernel_shape"] != serde_json::json!(hw)
        {
            problems.push(format!(
                "{}: report block {} has kernel_shape {}; the framework's deploy weight has {hw:?}",
                c.dir, b["name"], b["kernel_shape"]
            ));
        }
    }
    if &fused != produced {
        problems.push(format!(
            "{}: the report's fused tensors {fused:?} are not case.json's {produced:?}",
            c.dir
        ));
    }
    problems
}

#[test]
fn every_family2_case_converts_to_the_framework_deploy() {
    let mut all = Vec::new();
    for c in all_cases() {
        let conv = convert(c, &[]);
        let (consumed, produced) = consumed_produced(&case_json(c.dir), c.without);
        all.extend(file_problems(
            c,
            &read_st(&conv.output),
            &consumed,
            &produced,
        ));
        all.extend(report_problems(c, &conv.report, &produced));
    }
    assert!(
        all.is_empty(),
        "{} problem(s):\n{}",
        all.len(),
        all.join("\n")
    );
}

/// `verify` accepts the framework's own deploy file (without the left-out blocks).
#[test]
fn verify_accepts_each_framework_deploy() {
    for c in all_cases() {
        let conv = convert(c, &[]);
        let deploy = conv.input.with_file_name("theirs.safetensors");
        let theirs = read_st(&fixture_dir(c.dir).join("deploy.safetensors"));
        write_st(&deploy, &without(theirs, c.without), None);
        let out = verify_with(c, &conv.input, &deploy);
        assert_eq!(out.status.code(), Some(0), "{}: {}", c.dir, describe(&out));
    }
}

/// `repvgg-fuse verify TRAIN DEPLOY` with the case's arguments.
fn verify_with(c: &Case, train: &Path, deploy: &Path) -> std::process::Output {
    bin()
        .arg("verify")
        .arg(train)
        .arg(deploy)
        .args(c.args)
        .output()
        .unwrap()
}

/// Runs the binary on a fixture's train file with `args`; returns the run.
fn run_on(dir: &str, args: &[&str]) -> (TempDir, std::process::Output) {
    let tmp = tempfile::tempdir().unwrap();
    let out = bin()
        .arg(fixture_dir(dir).join("train.safetensors"))
        .arg("-o")
        .arg(tmp.path().join("out.safetensors"))
        .args(args)
        .output()
        .unwrap();
    (tmp, out)
}

/// YOLOv6's V1 and V2 (and super-gradients' full and partial fusion) have the same names:
/// detection refuses to choose, naming both, and writes nothing.
#[test]
fn same_names_different_fusions_are_refused_naming_both() {
    for (dir, a, b) in [
        (
            "fam2_yolov6_qarepvgg",
            "yolov6-qarepvgg",
            "yolov6-qarepvgg-v2",
        ),
        ("fam2_qarepvgg_sg", "sg-qarepvgg", "sg-qarepvgg-partial"),
    ] {
        let (tmp, out) = run_on(dir, &[]);
        assert_eq!(out.status.code(), Some(2), "{dir}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(a) && err.contains(b) && err.contains("--layout"),
            "{err}"
        );
        assert!(!tmp.path().join("out.safetensors").exists());
    }
}

/// The report says for each QARepVGG block what decided its identity: the rule, or
/// `--identity`; without the override the rule's wrong block fuses an identity the framework
/// does not have, and the file differs from the framework's.
#[test]
fn the_report_says_what_decided_each_identity() {
    let c = &CASES[5];
    assert_eq!(c.dir, "fam2_yolov6_qarepvgg");
    let conv = convert(c, &[]);
    let blocks = conv.report["blocks"].as_array().unwrap();
    let assumed = |i: usize| {
        blocks[i]["assumed"][0]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(assumed(0), "rbr_identity: yes (rule in == out: 8 → 8)");
    assert_eq!(assumed(1), "rbr_identity: no (rule in == out: 8 → 12)");
    assert_eq!(assumed(2), "rbr_identity: no (--identity)");
    assert_eq!(assumed(3), "rbr_identity: yes (--identity)");
    let rule_only = Case {
        args: &["--layout", "yolov6-qarepvgg"],
        ..case(c.dir, c.layout, &[])
    };
    let conv = convert(&rule_only, &[]);
    let (consumed, produced) = consumed_produced(&case_json(c.dir), &[]);
    let problems = file_problems(&rule_only, &read_st(&conv.output), &consumed, &produced);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("blocks.2.rbr_reparam.weight"))
            && problems
                .iter()
                .any(|p| p.contains("blocks.3.rbr_reparam.weight")),
        "{problems:?}"
    );
}

/// `--identity` for a block with no rule-decided identity is a usage error.
#[test]
fn identity_for_an_unknown_block_is_refused() {
    let (_tmp, out) = run_on(
        "fam2_yolov6_qarepvgg",
        &["--layout", "yolov6-qarepvgg", "--identity", "blocks.9=on"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--identity blocks.9"));
    let (_tmp, out) = run_on("fam2_yolov6_qarepvgg", &["--identity", "blocks.0"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

/// A kh×kw kernel fuses where every branch centres in it; a branch with an even extent
/// cannot be centred (it would sit half a tap off), so it is refused, naming the tensor, and
/// nothing is written. Here docTR's (1, 3) layer with its 1×1 `ver_conv` stretched to 2×1.
#[test]
fn a_branch_with_an_even_extent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut train = read_st(&fixture_dir("fam2_doctr_fastconv").join("train.safetensors"));
    let ver = train
        .get_mut("blocks.2.ver_conv.weight")
        .expect("the fixture's (1, 3) layer has a 1×1 ver_conv");
    assert_eq!(ver.shape, [12, 12, 1, 1]);
    let width = ver.data.len() / 144;
    ver.data = (ver.data.chunks(width))
        .flat_map(|e| e.iter().chain(e).copied().collect::<Vec<u8>>())
        .collect();
    ver.shape = vec![12, 12, 2, 1];
    let input = dir.path().join("train.safetensors");
    write_st(&input, &train, None);
    let output = dir.path().join("out.safetensors");
    let out = bin().arg(&input).arg("-o").arg(&output).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("blocks.2.ver_conv.weight") && err.contains("2×1 kernel"),
        "{err}"
    );
    assert!(!output.exists());
}

/// `verify` reads a ConvTranspose's output channels on dim 1 of its weight: the framework's
/// fold passes, and the same BN scale applied along dim 0 (the input channels, as a conv's
/// fold would) is a deviation, exit 1.
#[test]
fn verify_refuses_a_conv_transpose_scaled_on_dim_0() {
    let c = &FOLD_CASES[3];
    let conv = convert(c, &[]);
    let train = read_st(&conv.input);
    let mut theirs = read_st(&fixture_dir(c.dir).join("deploy.safetensors"));
    let v = |k: &str| to_f64(&train[&format!("model.2.{k}")]);
    let (w, g, var) = (
        v("conv_transpose.weight"),
        v("bn.weight"),
        v("bn.running_var"),
    );
    let per_row = w.len() / g.len();
    let wrong: Vec<u8> = (w.iter().enumerate())
        .flat_map(|(i, w)| {
            let r = i / per_row;
            ((w * g[r] / (var[r] + 1e-3).sqrt()) as f32).to_le_bytes()
        })
        .collect();
    let weight = theirs.get_mut("model.2.conv_transpose.weight").unwrap();
    assert_eq!((weight.shape[0], weight.data.len()), (g.len(), wrong.len()));
    weight.data = wrong;
    let deploy = conv.input.with_file_name("wrong.safetensors");
    write_st(&deploy, &theirs, None);
    let out = verify_with(c, &conv.input, &deploy);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("model.2"),
        "{}",
        describe(&out)
    );
}

/// Without `--fold-bn` nothing changes: a YOLO11 file (Conv→BN pairs only) has no block, and
/// a YOLOv10 file's Conv pairs pass through beside its RepVGGDW.
#[test]
fn without_fold_bn_nothing_is_folded() {
    let (_tmp, out) = run_on("foldbn_yolo11", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no re-parameterizable block"));
    let c = case("foldbn_yolov10", "ultralytics-repvggdw", &[]);
    let conv = convert(&c, &[]);
    let blocks = conv.report["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 1, "only the RepVGGDW");
    let ours = read_st(&conv.output);
    assert!(ours.contains_key("model.0.bn.running_var") && !ours.contains_key("model.0.conv.bias"));
}

/// Each fold is reported as a block of its kind, with its ops.
#[test]
fn folds_are_reported_by_kind() {
    let conv = convert(&FOLD_CASES[3], &[]);
    let blocks = conv.report["blocks"].as_array().unwrap();
    let of = |name: &str| {
        blocks
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    assert_eq!(
        (
            of("model.0")["kind"].as_str(),
            of("model.0")["ops"][0].as_str()
        ),
        (Some("Conv"), Some("conv3x3+bn"))
    );
    assert_eq!(of("model.1")["kind"], "Conv2");
    assert_eq!(
        of("model.1")["ops"],
        serde_json::json!(["conv3x3", "conv1x1", "post:bn"])
    );
    assert!(
        of("model.4").get("kind").is_none(),
        "RepConv is the ultralytics layout's block"
    );
}

/// The doctor: BNs at their initial statistics (16 of 17 in the fixture) and a file mixing
/// fused and unfused blocks are refused (exit 2, nothing written), naming them; the legitimate
/// forms beside each other (super-gradients' placeholder, RT-DETR's kept branches) are not.
#[test]
fn the_doctor_refuses_what_would_make_the_output_wrong() {
    let json = case_json("doctor_bn_initial");
    let (tmp, out) = run_on("doctor_bn_initial", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("16 of the 17 BN layers"), "{err}");
    for name in json["expect"]["bn_at_initial_stats"].as_array().unwrap() {
        assert!(err.contains(name.as_str().unwrap()), "{name}: {err}");
    }
    assert!(!err.contains("stem.conv_kxk.bn"), "{err}");
    assert!(!tmp.path().join("out.safetensors").exists());
    let json = case_json("doctor_mixed");
    let (tmp, out) = run_on("doctor_mixed", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mixes fused and unfused"), "{err}");
    let expect = &json["expect"];
    for key in ["fused_blocks", "unfused_blocks", "both_forms_in_one_block"] {
        for name in expect[key].as_array().unwrap() {
            assert!(err.contains(name.as_str().unwrap()), "{name}: {err}");
        }
    }
    assert!(!tmp.path().join("out.safetensors").exists());
}
