//! RepNeXt and RepMLPNet (issue 18; fixtures/fam2_repnext, fam2_repmlpnet, made by
//! `make_family2_fixtures.py`: RepNeXt re-implemented from suous/RepNeXt and checked train =
//! deploy in float64, RepMLPNet by mmpretrain itself). Each case is converted with `--verify` by
//! the real binary and held to the framework's deploy file: the exact key set, shapes and
//! dtypes, every fused tensor within 1 ulp of the framework's float64 fusion, every other
//! tensor byte for byte the train file's, the report naming each block's kind and ops; and
//! `verify` accepts the framework's deploy file and refuses a wrong one.

use std::collections::BTreeSet;

mod common;

use common::{Converted, Tensors, bin, describe, fixture, read_st, to_f64, ulps_apart, write_st};
use serde_json::Value;

/// The fixtures and the layout each must be detected as.
const CASES: &[(&str, &str)] = &[
    ("fam2_repnext", "repnext"),
    ("fam2_repmlpnet", "mmpretrain-repmlp"),
];

fn convert(case: &str) -> Converted {
    common::convert_verified(case)
}

/// The deploy keys case.json's blocks produce.
fn produced(case: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(fixture(case).join("case.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let blocks = json["blocks"].as_array().expect("blocks[]");
    let keys = blocks
        .iter()
        .flat_map(|b| b["produces"].as_object().unwrap().keys());
    keys.cloned().collect()
}

/// Everything in `ours` that differs from the framework's deploy file.
fn problems(case: &str, ours: &Tensors) -> Vec<String> {
    let theirs = read_st(&fixture(case).join("deploy.safetensors"));
    let exact = read_st(&fixture(case).join("deploy_f64.safetensors"));
    let train = read_st(&fixture(case).join("train.safetensors"));
    let fused = produced(case);
    let mut out = Vec::new();
    let names = |t: &Tensors| t.keys().cloned().collect::<BTreeSet<_>>();
    if names(ours) != names(&theirs) {
        out.push(format!(
            "keys: ours {:?} theirs {:?}",
            names(ours),
            names(&theirs)
        ));
    }
    for (k, t) in ours {
        match theirs.get(k) {
            Some(r) if (r.dtype, &r.shape) != (t.dtype, &t.shape) => out.push(format!(
                "`{k}` is {:?} {:?}, theirs {:?} {:?}",
                t.dtype, t.shape, r.dtype, r.shape
            )),
            _ => {}
        }
        if !fused.contains(k) {
            if train.get(k) != Some(t) {
                out.push(format!("pass-through `{k}` differs from the train file's"));
            }
            continue;
        }
        let want = exact.get(k).map(to_f64).unwrap_or_default();
        let got = to_f64(t);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(&g, &w)| ulps_apart(g, w, t.dtype));
        if got.len() != want.len() || worst.max().unwrap_or(0) > 1 {
            out.push(format!("fused `{k}` is over 1 ulp from the float64 fusion"));
        }
    }
    out
}

/// The report's (kind, ops) of block `name`.
fn kind_ops(report: &Value, name: &str) -> (String, Vec<String>) {
    let blocks = report["blocks"].as_array().unwrap();
    let b = blocks.iter().find(|b| b["name"] == name);
    let b = b.unwrap_or_else(|| panic!("no block {name} in the report"));
    let ops = b["ops"].as_array().unwrap().iter();
    let ops = ops.map(|o| o.as_str().unwrap().to_string()).collect();
    (b["kind"].as_str().unwrap_or_default().to_string(), ops)
}

#[test]
fn each_case_converts_to_the_framework_deploy_within_one_ulp() {
    for (case, layout) in CASES {
        let conv = convert(case);
        let found = problems(case, &read_st(&conv.output));
        assert!(found.is_empty(), "{case}:\n{}", found.join("\n"));
        assert_eq!(conv.report["layout"]["name"], *layout, "{case}");
        let blocks = conv.report["blocks"].as_array().unwrap();
        let named: BTreeSet<String> = (blocks.iter())
            .flat_map(|b| [&b["deploy_weight"], &b["deploy_bias"]])
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(named, produced(case), "{case}: the report's fused tensors");
    }
}

/// The report says how each RepNeXt block was fused: the stride-2 RepDWConvS (no biases on
/// conv_3_w / conv_3_h) runs them in sequence, the stride-1 one beside the others.
#[test]
fn the_report_names_each_repnext_block_and_its_ops() {
    let r = convert("fam2_repnext").report;
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases = [
        ("stem.stem.0", "ConvNorm", s(&["conv3x3+bn"])),
        (
            "stages.0.blocks.0.token_mixer.conv_s",
            "RepDWConvS",
            s(&["conv3x3", "conv1x3", "conv3x1", "conv2x2d2"]),
        ),
        (
            "stages.1.downsample.token_mixer.conv_s",
            "RepDWConvS (stride 2: conv_3_w → conv_3_h)",
            s(&["conv3x3", "conv1x3+conv3x1", "conv2x2d2"]),
        ),
        (
            "stages.1.downsample.token_mixer.conv_m",
            "RepDWConvM",
            s(&[
                "conv7x7",
                "conv5x3",
                "conv3x5",
                "conv1x7+conv7x1",
                "conv1x5+conv5x1",
            ]),
        ),
        (
            "head",
            "RepNextClassifier",
            s(&["0.5*(bn_in+linear)", "0.5*(bn_in+linear)"]),
        ),
    ];
    for (name, kind, ops) in cases {
        assert_eq!(kind_ops(&r, name), (kind.to_string(), ops), "{name}");
    }
    assert_eq!(r["blocks"].as_array().unwrap().len(), 15);
}

/// `verify` accepts the framework's own deploy file, and refuses one whose sequence branch
/// was composed the wrong way round (each 3×3 of the stride-2 RepDWConvS transposed).
#[test]
fn verify_accepts_the_framework_deploy_and_refuses_a_transposed_sequence() {
    for (case, _) in CASES {
        let out = bin()
            .arg("verify")
            .arg(fixture(case).join("train.safetensors"))
            .arg(fixture(case).join("deploy.safetensors"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{case}: {}", describe(&out));
    }
    let conv = convert("fam2_repnext");
    let mut theirs = read_st(&fixture("fam2_repnext").join("deploy.safetensors"));
    let name = "stages.1.downsample.token_mixer.conv_s.weight";
    let t = theirs.get_mut(name).unwrap();
    let mut data = t.data.clone();
    for (k, chunk) in t.data.chunks_exact(4).enumerate() {
        let (base, y, x) = (k / 9 * 9, k % 9 / 3, k % 3);
        let to = (base + x * 3 + y) * 4;
        data[to..to + 4].copy_from_slice(chunk);
    }
    t.data = data;
    let wrong = conv.dir.path().join("wrong.safetensors");
    write_st(&wrong, &theirs, None);
    let out = bin()
        .arg("verify")
        .arg(fixture("fam2_repnext").join("train.safetensors"))
        .arg(&wrong)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("stages.1.downsample.token_mixer.conv_s"),
        "{said}"
    );
}

/// Each RepMLP block folds its repconvs into fc3 as FCs, every BN one per shareset.
#[test]
fn the_report_names_each_repmlp_block_and_its_ops() {
    let r = convert("fam2_repmlpnet").report;
    let ops = [
        "conv1x1+bn_per_group",
        "conv1x1_as_fc+bn_per_group",
        "conv3x3_as_fc+bn_per_group",
    ];
    for stage in 0..4 {
        let name = format!("stages.{stage}.0.repmlp_block");
        let want = ("RepMLPBlock".to_string(), ops.map(String::from).to_vec());
        assert_eq!(kind_ops(&r, &name), want, "{name}");
    }
    assert_eq!(r["blocks"].as_array().unwrap().len(), 4);
}

/// A deploy fc3 whose conv was embedded without its zero padding at the patch border (the
/// 3×3 wrapping round the 4×4 patch) is refused by `verify`: it runs the conv on the patch.
#[test]
fn verify_refuses_a_conv_embedded_without_its_border() {
    let case = "fam2_repmlpnet";
    let conv = convert(case);
    let mut theirs = read_st(&fixture(case).join("deploy.safetensors"));
    let train = read_st(&fixture(case).join("train.safetensors"));
    let p = "stages.1.0.repmlp_block";
    // Output (g, y=0, x=0) reads input (g, 3, 3) through tap (0, 0) when the patch wraps.
    let k = to_f64(&train[&format!("{p}.repconv3.conv.weight")]);
    let t = theirs.get_mut(&format!("{p}.fc3.weight")).unwrap();
    let mut w = to_f64(t);
    w[15] += k[0];
    t.data = w.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect();
    let wrong = conv.dir.path().join("wrong.safetensors");
    write_st(&wrong, &theirs, None);
    let out = bin()
        .arg("verify")
        .arg(fixture(case).join("train.safetensors"))
        .arg(&wrong)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(p), "{said}");
}
