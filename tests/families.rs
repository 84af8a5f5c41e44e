//! The re-parameterization families (fixtures/fam_*, made by `make_family_fixtures.py` with
//! the frameworks' own code: timm's `reparameterize_model`, the official ACNet / DBB /
//! RepLKNet / UniRepLKNet blocks). Every case is converted with `--verify` by the real binary
//! and the output is held to the framework's deploy file: the exact key set with shapes (what
//! `load_state_dict(strict=True)` needs), every fused tensor within 1 ulp of the framework's
//! float64 fusion, every other tensor byte for byte. Expected values come from the fixture
//! files only, read here with the `safetensors` crate, never with this crate's reader.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::{Converted, bin, describe, read_st, to_f64, write_st};
use half::{bf16, f16};
use safetensors::Dtype;
use serde_json::Value;
use tempfile::TempDir;

/// The family cases this build converts, and the layout each must be detected as.
const CASES: &[(&str, &str)] = &[
    ("fam_fastvit", "timm-fastvit"),
    ("fam_fastvit_nols", "timm-fastvit"),
    ("fam_fastvit_f16", "timm-fastvit"),
    ("fam_fastvit_f64", "timm-fastvit"),
    ("fam_repghostnet", "timm-repghostnet"),
    ("fam_ghostnetv3", "timm-ghostnetv3"),
    ("fam_lcnetv2", "timm-lcnetv2"),
    ("fam_replknet", "replknet"),
    ("fam_unireplknet", "unireplknet"),
    ("fam_repvit", "timm-repvit"),
    ("fam_repvit_legacy", "timm-repvit"),
    ("fam_repvit_f64", "timm-repvit"),
    ("fam_repvit_bf16", "timm-repvit"),
    ("fam_acnet", "acnet"),
    ("fam_levit", "timm-levit"),
    ("fam_tinyvit", "timm-tinyvit"),
    ("fam_efficientvit_msra", "timm-efficientvit-msra"),
    ("fam_shvit", "timm-shvit"),
    ("fam_iformer", "timm-iformer"),
    ("fam_dbb", "dbb"),
];

/// Deploy tensors whose dtype we choose differently from the framework, and why (README,
/// "dtype of fused tensors"): `(case, our dtype, the framework's)`.
/// timm's RepViT `fuse()` builds its Conv2d/Linear without a dtype, so a BF16 model's fused
/// tensors come out F32 (holding values computed in BF16 arithmetic); we keep the model's dtype,
/// rounded once from f64, which `load_state_dict(strict=True)` casts into either.
const DTYPE_CHOICES: &[(&str, Dtype, Dtype)] = &[("fam_repvit_bf16", Dtype::BF16, Dtype::F32)];

// ---------------------------------------------------------------------------------------------
// Fixture access

fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(case)
}

type StFile = common::Tensors;

fn case_json(case: &str) -> Value {
    let path = fixture_dir(case).join("case.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{case}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: case.json: {e}"))
}

/// Every train key some block of case.json consumes, and every deploy key one produces.
fn consumed_produced(json: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut consumed, mut produced) = (BTreeSet::new(), BTreeSet::new());
    for b in json["blocks"].as_array().expect("blocks[]") {
        consumed.extend(b["consumes"].as_object().expect("consumes").keys().cloned());
        produced.extend(b["produces"].as_object().expect("produces").keys().cloned());
    }
    (consumed, produced)
}

/// A float's bits mapped to an integer monotone in its value (±0 both at 0): the difference of
/// two is their distance in ulps.
fn ordered(v: f64, dtype: Dtype) -> i64 {
    let (bits, width) = match dtype {
        Dtype::F64 => (v.to_bits(), 64),
        Dtype::F32 => ((v as f32).to_bits() as u64, 32),
        Dtype::F16 => (f16::from_f64(v).to_bits() as u64, 16),
        Dtype::BF16 => (bf16::from_f64(v).to_bits() as u64, 16),
        d => panic!("no ulps for {d:?}"),
    };
    let sign = 1u64 << (width - 1);
    if bits & sign != 0 {
        -((bits & !sign) as i64)
    } else {
        bits as i64
    }
}

// ---------------------------------------------------------------------------------------------
// Running the binary

fn convert(case: &str) -> Converted {
    common::convert_verified(case)
}

fn dtype_choice(case: &str) -> Option<(Dtype, Dtype)> {
    DTYPE_CHOICES
        .iter()
        .find(|(c, _, _)| *c == case)
        .map(|(_, ours, theirs)| (*ours, *theirs))
}

/// Everything wrong with one converted case, one line each.
fn problems(case: &str, layout: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut say = |p: String| problems.push(format!("{case}: {p}"));
    let dir = fixture_dir(case);
    let conv = convert(case);
    let ours = read_st(&conv.output);
    let theirs = read_st(&dir.join("deploy.safetensors"));
    let f64_ref = read_st(&dir.join("deploy_f64.safetensors"));
    let train = read_st(&dir.join("train.safetensors"));
    let json = case_json(case);
    let (consumed, produced) = consumed_produced(&json);
    if conv.report["layout"]["name"] != layout {
        say(format!("detected as {}", conv.report["layout"]["name"]));
    }
    // The key set, shapes and dtypes: what a strict load of the deploy model needs.
    let keys = |f: &StFile| f.keys().cloned().collect::<BTreeSet<_>>();
    if keys(&ours) != keys(&theirs) {
        let missing: Vec<_> = keys(&theirs).difference(&keys(&ours)).cloned().collect();
        let extra: Vec<_> = keys(&ours).difference(&keys(&theirs)).cloned().collect();
        say(format!(
            "keys differ: missing {missing:?}, unexpected {extra:?}"
        ));
    }
    for (k, t) in ours.iter().filter(|(k, _)| theirs.contains_key(*k)) {
        let r = &theirs[k];
        let choice = dtype_choice(case).filter(|_| produced.contains(k));
        let dtype_ok = match choice {
            Some((o, f)) => t.dtype == o && r.dtype == f,
            None => t.dtype == r.dtype,
        };
        if t.shape != r.shape || !dtype_ok {
            say(format!(
                "`{k}` is {:?} {:?}; the framework's deploy has {:?} {:?}",
                t.dtype, t.shape, r.dtype, r.shape
            ));
        }
    }
    // Fused tensors: within 1 ulp of the float64 fusion rounded to the output dtype.
    for k in &produced {
        let (Some(t), Some(r)) = (ours.get(k), f64_ref.get(k)) else {
            say(format!("fused `{k}` missing here or in deploy_f64"));
            continue;
        };
        let (got, want) = (to_f64(t), to_f64(r));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (ordered(g, t.dtype) - ordered(w, t.dtype)).abs())
            .max()
            .unwrap_or(0);
        if t.dtype == Dtype::F64 {
            // Both sides are f64 sums in different orders: 1 ulp per element is not defined;
            // held to a few ulps of the tensor's largest value instead.
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let off = got
                .iter()
                .zip(&want)
                .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
            if off > 4.0 * f64::EPSILON * scale || got.len() != want.len() {
                say(format!(
                    "fused `{k}` is {off:e} from the f64 fusion (scale {scale:e})"
                ));
            }
        } else if worst > 1 || got.len() != want.len() {
            say(format!("fused `{k}` is {worst} ulp from the f64 fusion"));
        }
    }
    // Pass-through tensors: byte for byte.
    for (k, t) in ours.iter().filter(|(k, _)| !produced.contains(*k)) {
        if consumed.contains(k) || train.get(k) != Some(t) {
            say(format!("pass-through `{k}` is not the train file's tensor"));
        }
    }
    problems.extend(report_problems(case, &conv.report, &json));
    problems
}

/// The report names every block's ops, and its fused tensors are case.json's.
fn report_problems(case: &str, report: &Value, json: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let (_, produced) = consumed_produced(json);
    let blocks = report["blocks"].as_array().expect("report blocks[]");
    let mut fused = BTreeSet::new();
    for b in blocks {
        let ops: Vec<&str> = b["ops"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !ops
            .iter()
            .any(|o| o.contains("conv") || o.contains("linear"))
        {
            problems.push(format!("{case}: report block {} names no ops", b["name"]));
        }
        for k in ["deploy_weight", "deploy_bias"] {
            fused.insert(b[k].as_str().unwrap_or_default().to_string());
        }
    }
    if fused != produced {
        problems.push(format!(
            "{case}: the report's fused tensors {fused:?} are not case.json's {produced:?}"
        ));
    }
    problems
}

#[test]
fn every_family_case_converts_to_the_framework_deploy() {
    let mut all = Vec::new();
    for (case, layout) in CASES {
        all.extend(problems(case, layout));
    }
    assert!(
        all.is_empty(),
        "{} problem(s):\n{}",
        all.len(),
        all.join("\n")
    );
}

#[test]
fn inspect_lists_each_blocks_ops() {
    for (case, _) in CASES {
        let train = fixture_dir(case).join("train.safetensors");
        let out = bin()
            .arg("inspect")
            .arg(&train)
            .arg("--json")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{case}: {}", describe(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("inspect --json is JSON");
        let (_, produced) = consumed_produced(&case_json(case));
        let blocks = v["blocks"].as_array().expect("blocks");
        assert_eq!(2 * blocks.len(), produced.len(), "{case}: block count");
        for b in blocks {
            assert!(
                b["ops"].as_array().is_some_and(|o| !o.is_empty()),
                "{case}: inspect block {} has no ops",
                b["name"]
            );
        }
        let text = bin().arg("inspect").arg(&train).output().unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("+bn"),
            "{case}: inspect text names no ops:\n{text}"
        );
    }
}

/// The ops the report gives for FastViT's RepMixer, in the framework's terms: the mixer's
/// three branches and the plain input, all but the input under the layer scale, the norm
/// subtracted.
#[test]
fn fastvit_repmixer_ops_are_named() {
    let conv = convert("fam_fastvit");
    let blocks = conv.report["blocks"].as_array().unwrap();
    let mixer = blocks
        .iter()
        .find(|b| b["name"] == "stages.0.blocks.0.token_mixer")
        .expect("RepMixer block");
    assert_eq!(mixer["kind"], "RepMixer");
    let ops: Vec<&str> = mixer["ops"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        ops,
        [
            "conv3x3+bn+scale",
            "conv1x1+bn+scale",
            "identity+bn+scale",
            "-(identity+bn+scale)",
            "identity"
        ]
    );
    let nols = convert("fam_fastvit_nols");
    let b = nols.report["blocks"].as_array().unwrap();
    let mixer = b
        .iter()
        .find(|b| b["name"] == "stages.0.blocks.0.token_mixer")
        .unwrap();
    assert_eq!(mixer["ops"][0], "conv5x5+bn", "no layer scale: no scale op");
}

/// Blocks of two layouts in one file are still refused, naming both.
#[test]
fn checkpoint_mixing_two_layouts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut mixed = read_st(&fixture_dir("fam_fastvit").join("train.safetensors"));
    let official = read_st(&fixture_dir("official_repvgg").join("train.safetensors"));
    mixed.extend(official.into_iter().map(|(k, t)| (format!("other.{k}"), t)));
    let path = dir.path().join("mixed.safetensors");
    write_st(&path, &mixed, None);
    let out = bin()
        .arg(&path)
        .arg("-o")
        .arg(dir.path().join("out.safetensors"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mixes layouts") && err.contains("timm-fastvit") && err.contains("official"),
        "{err}"
    );
    assert!(!dir.path().join("out.safetensors").exists());
}

/// Half a RepMixer (its norm branch gone) is refused, not fused as the mixer alone.
#[test]
fn repmixer_without_its_norm_is_refused() {
    let err = refused_without("fam_fastvit", "stages.0.blocks.0.token_mixer.norm.");
    assert!(
        err.contains("stages.0.blocks.0.token_mixer") && err.contains("norm.identity"),
        "{err}"
    );
}

/// Runs `repvgg-fuse IN -o OUT --layout-file LAYOUT` on `tensors`; returns the run.
fn convert_with_layout(tensors: &StFile, layout: &str) -> (TempDir, Output) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    write_st(&input, tensors, None);
    let layout_path = dir.path().join("layout.json");
    std::fs::write(&layout_path, layout).unwrap();
    let out = bin()
        .arg(&input)
        .arg("-o")
        .arg(dir.path().join("out.safetensors"))
        .arg("--layout-file")
        .arg(&layout_path)
        .output()
        .unwrap();
    (dir, out)
}

/// ACNet's k×1 and 1×k kernels are fused only where the layout asks for them: the same
/// branches in a layout without `asymmetric` are refused, naming the tensor.
#[test]
fn asymmetric_kernels_only_where_the_layout_allows_them() {
    let train = read_st(&fixture_dir("fam_acnet").join("train.safetensors"));
    let layout = r#"{ "name": "square-only", "kinds": [ { "branches": [
        { "role": "kxk", "path": "", "ops": [ { "conv": "square_conv" }, { "bn": "square_bn" } ] },
        { "role": "kxk", "path": "", "ops": [ { "conv": "ver_conv" }, { "bn": "ver_bn" } ] },
        { "role": "kxk", "path": "", "ops": [ { "conv": "hor_conv" }, { "bn": "hor_bn" } ] } ],
      "deploy": { "weight": "fused_conv.weight", "bias": "fused_conv.bias" } } ] }"#;
    let (dir, out) = convert_with_layout(&train, layout);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("blocks.0.ver_conv.weight") && err.contains("square kernel"),
        "{err}"
    );
    assert!(!dir.path().join("out.safetensors").exists());
}

/// A BN on the input folds exactly only into a 1×1 kernel (a larger one would see the
/// zero padding un-normalized): before a 3×3 conv it is refused.
#[test]
fn input_bn_before_a_larger_kernel_is_refused() {
    let train = read_st(&fixture_dir("fam_repvit").join("train.safetensors"));
    // RepViT's stem conv1 is 3×3 with its BN after it; call that BN an input BN.
    let mut stem: StFile = train
        .into_iter()
        .filter(|(k, _)| k.starts_with("stem.conv1."))
        .collect();
    let n_in = stem["stem.conv1.c.weight"].shape[1];
    for leaf in ["weight", "bias", "running_mean", "running_var"] {
        let t = stem.get_mut(&format!("stem.conv1.bn.{leaf}")).unwrap();
        t.data.truncate(4 * n_in);
        t.shape = vec![n_in];
    }
    let layout = r#"{ "name": "bn-first", "kinds": [ { "branches": [
        { "role": "kxk", "path": "", "ops": [ { "bn_in": "bn" }, { "conv": "c" } ] } ],
      "deploy": { "weight": "weight", "bias": "bias" } } ] }"#;
    let (_dir, out) = convert_with_layout(&stem, layout);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stem.conv1") && err.contains("BN on its input"),
        "{err}"
    );
}

/// The ConvNorm-only layouts need their marker: the same conv + BN names without an
/// `attention_biases` tensor are no block at all (an unknown fork is not folded as TinyViT),
/// and `--layout` still forces them.
#[test]
fn convnorm_layouts_need_their_marker() {
    let mut train = read_st(&fixture_dir("fam_tinyvit").join("train.safetensors"));
    train.retain(|k, _| !k.ends_with("attention_biases"));
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    write_st(&input, &train, None);
    let out = bin()
        .arg(&input)
        .arg("-o")
        .arg(dir.path().join("out.safetensors"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no re-parameterizable block"));
    let forced = bin()
        .arg(&input)
        .arg("-o")
        .arg(dir.path().join("out.safetensors"))
        .args(["--layout", "timm-tinyvit", "--verify"])
        .output()
        .unwrap();
    assert_eq!(forced.status.code(), Some(0), "{}", describe(&forced));
}

/// RepViT's RepVggDw without its post-sum BN is half a block: refused, naming the BN, not
/// fused as a ConvNorm with the 1×1 and the skip left out.
#[test]
fn repvggdw_without_its_bn_is_refused() {
    let err = refused_without("fam_repvit", "stages.0.blocks.0.token_mixer.bn.");
    assert!(
        err.contains("stages.0.blocks.0.token_mixer") && err.contains("token_mixer.bn"),
        "{err}"
    );
}

/// Converts `case`'s train file without the tensors under `dropped`: asserts exit 2 and no
/// output written; returns stderr.
fn refused_without(case: &str, dropped: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut train = read_st(&fixture_dir(case).join("train.safetensors"));
    train.retain(|k, _| !k.starts_with(dropped));
    let path = dir.path().join("half.safetensors");
    write_st(&path, &train, None);
    let out = bin()
        .arg(&path)
        .arg("-o")
        .arg(dir.path().join("out.safetensors"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(!dir.path().join("out.safetensors").exists());
    String::from_utf8_lossy(&out.stderr).into_owned()
}
