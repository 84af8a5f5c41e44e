//! The block finder on the node structure PyTorch's exporters really write
//! (`fixtures/onnx_topology/*.json`, made by `fixtures/dump_onnx_topology.py`).

use std::collections::BTreeMap;
use std::path::Path;

use repvgg_fuse::find::graph::{Finding, GOp, find_branch_sets};
use repvgg_fuse::onnx::graph::Graph;
use serde::Deserialize;

#[derive(Deserialize)]
struct Family {
    variants: BTreeMap<String, Variant>,
}

#[derive(Deserialize)]
struct Variant {
    train: Form,
    deploy: Form,
}

#[derive(Deserialize)]
struct Form {
    op_counts: BTreeMap<String, usize>,
    graph: Graph,
}

const COUNTED: [&str; 7] = [
    "Conv",
    "BatchNormalization",
    "Add",
    "Sub",
    "Mul",
    "Sum",
    "Div",
];
const VARIANTS: [&str; 5] = [
    "ts11_fold",
    "ts11_nofold",
    "ts17_fold",
    "ts17_nofold",
    "dyn18",
];

fn family(name: &str) -> Family {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/onnx_topology")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Op counts of `g` once every set of `f` is one Conv (or one Gemm).
fn merged_counts(g: &Graph, f: &Finding) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let gone: std::collections::BTreeSet<usize> = f
        .sets
        .iter()
        .flat_map(|s| s.nodes.iter().copied())
        .collect();
    for n in g.nodes.iter().filter(|n| !gone.contains(&n.index)) {
        *counts.entry(n.op_type.clone()).or_default() += 1;
    }
    for s in &f.sets {
        *counts
            .entry(if s.linear { "Gemm" } else { "Conv" }.into())
            .or_default() += 1;
    }
    counts
}

fn counted(c: &BTreeMap<String, usize>) -> Vec<(String, usize)> {
    COUNTED
        .iter()
        .chain(&["Gemm", "MatMul"])
        .map(|k| (k.to_string(), c.get(*k).copied().unwrap_or(0)))
        .collect()
}

/// Finds the sets of every variant of `fam`; checks the multi-branch sets' branch counts
/// against `multi` (from the block definitions), no rejections, nothing left to merge in the
/// framework's deploy export but unfolded single pairs, and equal op counts after merging.
fn check(fam: &str, multi: &[usize]) -> BTreeMap<&'static str, Finding> {
    let f = family(fam);
    let mut out = BTreeMap::new();
    for v in VARIANTS {
        let var = &f.variants[v];
        let train = find_branch_sets(&var.train.graph).expect("train graph is well formed");
        let deploy = find_branch_sets(&var.deploy.graph).expect("deploy graph is well formed");
        for form in [&var.train, &var.deploy] {
            let none = Finding::default();
            assert_eq!(
                counted(&merged_counts(&form.graph, &none)),
                counted(&form.op_counts),
                "{fam} {v}: the view holds every node"
            );
        }
        let found: Vec<usize> = train
            .sets
            .iter()
            .map(|s| s.branches.len())
            .filter(|&n| n > 1)
            .collect();
        assert_eq!(found, multi, "{fam} {v}: branch counts of the sets");
        assert!(train.rejected.is_empty(), "{fam} {v}: {:?}", train.rejected);
        assert!(
            deploy.sets.iter().all(|s| s.branches.len() == 1),
            "{fam} {v}: deploy graph has a multi-branch set"
        );
        if v.ends_with("_fold") || v == "dyn18" {
            assert!(
                deploy.sets.is_empty(),
                "{fam} {v}: folded deploy graph has sets"
            );
            // Exporters fold Conv→BN but never BN→Gemm (a NormLinear stays two nodes).
            assert!(
                train.sets.iter().all(|s| s.branches.len() > 1 || s.linear),
                "{fam} {v}: folded train graph has a Conv→BN pair"
            );
        }
        assert_eq!(
            counted(&merged_counts(&var.train.graph, &train)),
            counted(&merged_counts(&var.deploy.graph, &deploy)),
            "{fam} {v}: op counts after merging, train vs the framework's deploy export"
        );
        out.insert(v, train);
    }
    out
}

fn ops(g: &Graph, nodes: &[usize]) -> Vec<String> {
    nodes.iter().map(|&i| g.nodes[i].op_type.clone()).collect()
}

#[test]
fn repvgg_blocks_found_in_every_export() {
    let found = check("repvgg", &[3, 2, 3]);
    let f = family("repvgg");
    let g = &f.variants["ts17_fold"].train.graph;
    let s = &found["ts17_fold"].sets[0];
    let mut kinds = ops(g, &s.nodes);
    kinds.sort();
    assert_eq!(kinds, ["Add", "Add", "BatchNormalization", "Conv", "Conv"]);
    assert_eq!(
        (s.kernel, s.stride, s.pads, s.group),
        ((3, 3), (1, 1), [1, 1, 1, 1], 1)
    );
    assert_eq!(found["ts17_fold"].sets[1].stride, (2, 2));
    assert_eq!(found["ts17_fold"].sets[2].group, 4);
    let nofold = &found["ts17_nofold"].sets[0];
    assert_eq!(
        nofold.nodes.len(),
        7,
        "two Conv→BN pairs, the identity BN and two Adds"
    );
}

#[test]
fn mobileone_blocks_found_in_every_export() {
    let found = check("mobileone", &[4, 2, 2]);
    assert_eq!(found["dyn18"].sets[1].group, 8, "depthwise stride-2 block");
}

#[test]
fn fastvit_repmixer_sub_and_layer_scale() {
    let found = check("fastvit_repmixer", &[5, 5]);
    for v in VARIANTS {
        let s = &found[v].sets[0];
        let coefs: Vec<f64> = s.branches.iter().map(|b| b.coef).collect();
        assert_eq!(
            coefs.iter().filter(|&&c| c == -1.0).count(),
            1,
            "{v}: the norm branch is subtracted"
        );
        let scaled = s
            .branches
            .iter()
            .filter(|b| b.ops.iter().any(|o| matches!(o, GOp::Mul { .. })))
            .count();
        assert_eq!(
            scaled, 4,
            "{v}: γ applies to the four branches under it, not to x"
        );
        assert!(
            found[v].sets[1]
                .branches
                .iter()
                .all(|b| !b.ops.iter().any(|o| matches!(o, GOp::Mul { .. })))
        );
    }
}

#[test]
fn fastvit_conditional_pos_enc_and_large_kernel_conv() {
    check("fastvit_cpe", &[2]);
    let found = check("fastvit_lkc", &[2, 2]);
    assert_eq!(found["ts11_fold"].sets[0].kernel, (7, 7));
    assert!(
        found["ts11_fold"].sets[1].post.is_empty(),
        "GELU's Div is not taken as a post op"
    );
}

#[test]
fn repvit_token_mixer_post_bn() {
    let found = check("repvit_dw", &[3, 3]);
    for v in VARIANTS {
        let sets = &found[v].sets;
        assert!(
            matches!(sets[0].post.as_slice(), [GOp::Bn { .. }]),
            "{v}: post-sum BN"
        );
        assert!(
            sets[1].post.is_empty(),
            "{v}: legacy RepVggDw has no post BN"
        );
    }
}

#[test]
fn repvit_classifier_is_one_gemm() {
    let found = check("repvit_head", &[2]);
    for v in VARIANTS {
        let s = &found[v].sets[0];
        assert!(s.linear, "{v}");
        assert!(
            matches!(s.post.as_slice(), [GOp::Div { .. }]),
            "{v}: the average of the two heads"
        );
        for b in &s.branches {
            assert!(
                matches!(b.ops.as_slice(), [GOp::Bn { .. }, GOp::Gemm { .. }]),
                "{v}: {:?}",
                b.ops
            );
        }
    }
    let nodist = check("repvit_head_nodist", &[]);
    for v in VARIANTS {
        assert_eq!(nodist[v].sets.len(), 1, "{v}: BN → Gemm, one branch");
    }
}

#[test]
fn repghost_ghostnetv3_lcnetv2() {
    check("repghost", &[2, 2]);
    check("ghostnetv3", &[3, 5, 3, 5, 3, 5, 4, 3, 5]);
    check("lcnetv2", &[3, 2]);
}

#[test]
fn acnet_asymmetric_kernels() {
    let found = check("acnet", &[3, 3, 3, 3]);
    assert_eq!(found["dyn18"].sets[2].kernel, (5, 5));
}

#[test]
fn replknet_and_unireplknet_dilated() {
    check("replknet", &[2, 2, 2]);
    let found = check("unireplknet", &[3, 4, 5, 6]);
    let sets = &found["ts17_fold"].sets;
    assert_eq!(
        sets.iter().map(|s| s.kernel.0).collect::<Vec<_>>(),
        [5, 7, 9, 13]
    );
}

/// DBB's BNAndPadLayer fills the border with the BN's response to zero by index assignment,
/// which every exporter writes as Pad + ScatterND nodes, not as a linear op: each whole set is
/// reported as that border fill, and only the origin + 1×1 (dense block) and origin +
/// AveragePool (depthwise block) parts merge.
#[test]
fn dbb_bn_and_pad_border_is_reported_not_merged() {
    let f = family("dbb");
    for v in VARIANTS {
        let var = &f.variants[v];
        let found = find_branch_sets(&var.train.graph).expect("well formed");
        let multi: Vec<usize> = found
            .sets
            .iter()
            .map(|s| s.branches.len())
            .filter(|&n| n > 1)
            .collect();
        assert_eq!(multi, [2, 2], "{v}");
        assert!(
            !found.rejected.is_empty(),
            "{v}: the whole sums are reported"
        );
        assert!(
            found
                .rejected
                .iter()
                .all(|r| r.reason.starts_with("DBB's BNAndPad border fill")),
            "{v}: {:?}",
            found.rejected
        );
        let deploy = find_branch_sets(&var.deploy.graph).expect("well formed");
        assert_ne!(
            counted(&merged_counts(&var.train.graph, &found)),
            counted(&merged_counts(&var.deploy.graph, &deploy)),
            "{v}: if this matches, DBB is recognized: update the README"
        );
    }
}
