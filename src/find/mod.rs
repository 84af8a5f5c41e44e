//! Finding the blocks: by their tensor names in a checkpoint — the layout table ([`schema`]),
//! matching names (`names`), assembling checked blocks (`assemble`), and choosing among
//! layouts ([`Detection::find`]) — or by topology in an ONNX graph ([`graph`]).
//!
//! A layout is data — a table of name patterns — not a code path. The built-in table lives in
//! `layouts.json`; a user can pass their own file of the same shape for an in-house fork.
//! Detection matches every tensor name against every pattern, groups the matches by block
//! prefix, and keeps the prefixes that carry a k×k conv branch.

mod assemble;
mod doctor;
mod fold;
pub mod graph;
mod names;
pub mod schema;

use std::collections::{BTreeMap, BTreeSet};

use rayon::prelude::*;

pub use schema::{
    BranchSpec, DEFAULT_BN_EPS, DeployNames, Kind, Layout, LayoutError, OpKind, OpSpec,
};

use crate::block::Block;
use crate::checkpoint::Checkpoint;
use crate::report::{EpsInfo, Skipped};
use assemble::{Ctx, Finding, depth, find_blocks};
use names::{BlocksFound, Names, split_names};

/// The blocks of one layout found in a checkpoint, and what happens to every other tensor.
#[derive(Debug)]
pub struct Detection {
    /// The layout the blocks follow.
    pub layout: Layout,
    /// The blocks, in the order their main weight appears in the file.
    pub blocks: Vec<Block>,
    /// Candidates left alone because their shapes do not fit (generic layouts only).
    pub skipped: Vec<Skipped>,
    /// The ε of the blocks' BNs, and where it came from.
    pub bn_eps: EpsInfo,
}

/// What detection is told beyond the layouts (the command line's `--bn-eps`, `--identity`,
/// `--fold-bn`).
#[derive(Debug, Clone, Default)]
pub struct FindRules {
    /// BN ε for every BN instead of the layout's.
    pub bn_eps: Option<f64>,
    /// Block prefix → whether its tensorless branches (QARepVGG's identity and average)
    /// exist, whatever the layout's rule says.
    pub identity: BTreeMap<String, bool>,
    /// Also fold every Conv→BN pair that no block consumed, by the fold layout of the
    /// detected one (or the fold layout that finds pairs, when no layout finds blocks).
    pub fold_bn: bool,
}

impl Detection {
    /// Finds the blocks in `ckpt`.
    ///
    /// With `forced`, only that layout is tried; otherwise every layout in `layouts` is, and
    /// exactly one of them must find blocks. Every BN gets the layout's ε, or `eps` where given
    /// (`--bn-eps`).
    pub fn find(
        ckpt: &Checkpoint,
        layouts: &[Layout],
        forced: Option<&str>,
        eps: Option<f64>,
    ) -> Result<Detection, LayoutError> {
        let rules = FindRules {
            bn_eps: eps,
            ..FindRules::default()
        };
        Detection::find_with(ckpt, layouts, forced, &rules)
    }

    /// [`Detection::find`] with every rule of [`FindRules`]: `--identity` overrides (each must
    /// name a block whose identity a rule decides), and with `fold_bn` the Conv→BN folds.
    pub fn find_with(
        ckpt: &Checkpoint,
        layouts: &[Layout],
        forced: Option<&str>,
        rules: &FindRules,
    ) -> Result<Detection, LayoutError> {
        let names = split_names(ckpt);
        let (main, folds): (Vec<Layout>, Vec<Layout>) =
            layouts.iter().cloned().partition(|l| !l.fold);
        let found = detect(ckpt, &names, &main, forced, rules);
        let mut detection = if rules.fold_bn {
            let found = match found {
                // A file with Conv→BN pairs only (YOLO11): the folds are the blocks.
                Err(LayoutError::NoBlocks { .. }) if forced.is_none() => None,
                found => Some(found?),
            };
            fold::add_folds(ckpt, &names, &folds, found, rules)?
        } else {
            found?
        };
        check_identity_overrides(&detection, rules)?;
        if let Some(e) = doctor::mixed_forms(ckpt, &detection, None) {
            return Err(e);
        }
        doctor::refuse_initial_bns(ckpt, &detection)?;
        detection
            .blocks
            .sort_by_key(|b| ckpt.get(b.main_weight()).map_or(0, |t| t.start));
        Ok(detection)
    }

    /// Every tensor a fused block consumes and the deploy file drops (its branches,
    /// `num_batches_tracked` included; not the branches a framework keeps).
    pub fn consumed(&self) -> BTreeSet<&str> {
        self.blocks
            .iter()
            .flat_map(|b| b.dropped().iter().map(String::as_str))
            .collect()
    }
}

/// The blocks of the one layout of `layouts` that finds them (or of `forced`).
fn detect(
    ckpt: &Checkpoint,
    names: &Names,
    layouts: &[Layout],
    forced: Option<&str>,
    rules: &FindRules,
) -> Result<Detection, LayoutError> {
    let ctx = |layout: &Layout| Ctx {
        eps: layout.bn_eps(rules.bn_eps).0,
        identity: &rules.identity,
    };
    let detection = |layout: &Layout, found: BlocksFound| Detection {
        layout: layout.clone(),
        blocks: found.blocks,
        skipped: found.skipped,
        bn_eps: layout.eps_info(rules.bn_eps),
    };
    if let Some(name) = forced {
        let Some(layout) = layouts.iter().find(|l| l.name == name) else {
            let known: Vec<_> = layouts.iter().map(|l| l.name.as_str()).collect();
            return Err(LayoutError::Unknown(name.to_string(), known.join(", ")));
        };
        let found = find_blocks(ckpt, names, layout, &ctx(layout))?;
        let found = settled(ckpt, layout, found, rules)?;
        if found.blocks.is_empty() {
            return Err(LayoutError::NoBlocks {
                hint: format!(" of layout {}{}", layout.name, deployed_hint(ckpt, layouts)),
            });
        }
        return Ok(detection(layout, found));
    }
    let mut hits = Vec::new();
    let mut errors = Vec::new();
    for (layout, found) in layouts.iter().zip(try_all(ckpt, names, layouts, &ctx)) {
        match found {
            None => {}
            // A fallback's common names may meet tensors they do not describe.
            Some(Err(_)) if layout.fallback => {}
            Some(Err(e)) => errors.push(e),
            Some(Ok(found)) if !found.blocks.is_empty() => hits.push((layout, found)),
            Some(Ok(_)) => {}
        }
    }
    // A layout that fails on a block another layout's names explain (mmpretrain's
    // `branch_3x3.norm` where super-gradients has `branch_3x3.bn`) is not what the file is.
    let explained = |e: &LayoutError| {
        let block = match e {
            LayoutError::Block(b) => &b.block,
            LayoutError::HalfBlock { block, .. } => block,
            _ => return false,
        };
        (hits.iter()).any(|(_, f)| f.blocks.iter().any(|b| &b.name == block))
    };
    if let Some(e) = errors.into_iter().find(|e| !explained(e)) {
        return Err(e);
    }
    refuse_same_names(&hits)?;
    let mut hits = settle(hits);
    match hits.len() {
        0 => Err(LayoutError::NoBlocks {
            hint: deployed_hint(ckpt, layouts),
        }),
        1 => {
            let (layout, found) = hits.remove(0);
            // Now refusing half blocks: the layout is settled.
            Ok(detection(layout, settled(ckpt, layout, found, rules)?))
        }
        _ => Err(mixed(&hits)),
    }
}

/// What each of `layouts` finds (`None` for one whose marker tensor the file lacks), every
/// layout tried at once: each is independent (repvit_m2_3's 1469 names against 37 layouts).
fn try_all<'c>(
    ckpt: &Checkpoint,
    names: &Names,
    layouts: &[Layout],
    ctx: &(impl Fn(&Layout) -> Ctx<'c> + Sync),
) -> Vec<Option<Result<Finding, LayoutError>>> {
    layouts
        .par_iter()
        .map(|layout| {
            let marked = layout.marker.as_ref().is_none_or(|marker| {
                let leaf = format!(".{marker}");
                ckpt.tensors().iter().any(|t| t.name.ends_with(&leaf))
            });
            marked.then(|| find_blocks(ckpt, names, layout, &ctx(layout)))
        })
        .collect()
}

/// The error for blocks of several layouts in one file: each with a count and an example.
fn mixed(hits: &[(&Layout, Finding)]) -> LayoutError {
    let found: Vec<String> = hits
        .iter()
        .map(|(l, f)| {
            let example = f.blocks.first().map_or("", |b| b.name.as_str());
            format!("{} ({} blocks, e.g. `{example}`)", l.name, f.blocks.len())
        })
        .collect();
    LayoutError::Mixed {
        found: found.join(", "),
    }
}

/// The blocks of the settled `layout`, half blocks and taken deploy names refused; a taken
/// deploy name in a file with blocks in deploy form already is what the doctor says it is.
fn settled(
    ckpt: &Checkpoint,
    layout: &Layout,
    found: Finding,
    rules: &FindRules,
) -> Result<BlocksFound, LayoutError> {
    match found.refusal(ckpt) {
        None => Ok(found.into_found()),
        Some(LayoutError::DeployNameTaken { block, tensor }) => {
            let d = Detection {
                layout: layout.clone(),
                blocks: found.blocks,
                skipped: Vec::new(),
                bn_eps: layout.eps_info(rules.bn_eps),
            };
            Err(doctor::mixed_forms(ckpt, &d, Some(&block))
                .unwrap_or(LayoutError::DeployNameTaken { block, tensor }))
        }
        Some(e) => Err(e),
    }
}

/// Two layouts that declare the same names (`same_names_as`) and both found blocks: the
/// names cannot tell which fusion the framework does.
fn refuse_same_names(hits: &[(&Layout, Finding)]) -> Result<(), LayoutError> {
    for (a, _) in hits {
        let twins: Vec<&str> = hits
            .iter()
            .map(|(b, _)| b.name.as_str())
            .filter(|b| a.same_names_as.iter().any(|n| n == b))
            .collect();
        if !twins.is_empty() {
            let all: Vec<&str> = std::iter::once(a.name.as_str()).chain(twins).collect();
            return Err(LayoutError::Ambiguous {
                found: all.join(", "),
            });
        }
    }
    Ok(())
}

/// Every `--identity` prefix names a block whose tensorless branches a rule decides.
fn check_identity_overrides(detection: &Detection, rules: &FindRules) -> Result<(), LayoutError> {
    for prefix in rules.identity.keys() {
        let ruled = |b: &&Block| !b.assumed.is_empty();
        if !detection
            .blocks
            .iter()
            .filter(ruled)
            .any(|b| &b.name == prefix)
        {
            let known: Vec<&str> = (detection.blocks.iter().filter(ruled))
                .map(|b| b.name.as_str())
                .take(5)
                .collect();
            return Err(LayoutError::UnusedIdentity {
                prefix: prefix.clone(),
                known: if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                },
            });
        }
    }
    Ok(())
}

/// Of the layouts that found blocks, the ones left to choose from: fallbacks only when
/// nothing else found blocks, and not a layout whose blocks take only tensors that another
/// layout's take too (a FastViT file holds timm MobileOne blocks). Of layouts that take the
/// same tensors, the one whose blocks are outer modules (iFormer's RepCPE around what RepViT
/// would fuse as a ConvNorm), then the earlier in the table (a pure MobileOne file matches
/// FastViT's MobileOne kind as well).
fn settle(mut hits: Vec<(&Layout, Finding)>) -> Vec<(&Layout, Finding)> {
    if hits.iter().any(|(l, _)| !l.fallback) {
        hits.retain(|(l, _)| !l.fallback);
    }
    let sets: Vec<BTreeSet<&str>> = hits
        .iter()
        .map(|(_, f)| {
            f.blocks
                .iter()
                .flat_map(|b| b.consumed.iter().map(String::as_str))
                .collect()
        })
        .collect();
    let depths: Vec<usize> = hits
        .iter()
        .map(|(_, f)| f.blocks.iter().map(|b| depth(&b.name)).sum())
        .collect();
    let subsumed: Vec<bool> = (0..sets.len())
        .map(|i| {
            (0..sets.len()).any(|j| {
                let outer = depths[j] < depths[i] || depths[j] == depths[i] && j < i;
                j != i && sets[i].is_subset(&sets[j]) && (sets[j].len() > sets[i].len() || outer)
            })
        })
        .collect();
    let mut keep = subsumed.into_iter().map(|s| !s);
    hits.retain(|_| keep.next().unwrap_or(true));
    hits
}

/// Says so when the file looks like it is in deploy form already.
fn deployed_hint(ckpt: &Checkpoint, layouts: &[Layout]) -> String {
    for layout in layouts {
        if layout.generic_names || layout.fallback {
            continue;
        }
        for kind in layout.all_kinds() {
            let weight = &kind.deploy.weight;
            if !weight.contains('.') {
                continue;
            }
            let suffix = format!(".{weight}");
            let n = ckpt
                .tensors()
                .iter()
                .filter(|t| t.name.ends_with(&suffix) || &t.name == weight)
                .count();
            if n > 0 {
                return format!(
                    "; it has {n} `{weight}` tensors, so it looks like a deploy file already"
                );
            }
        }
    }
    "; expected tensors named like `<block>.rbr_dense.conv.weight` (see --layout for the known layouts)".to_string()
}

/// Which tensor of an op a name fills.
#[cfg(test)]
mod tests {
    use super::names::{match_suffix, slot_patterns};
    use super::schema::BUILTIN;
    use super::*;
    use crate::block::Role;

    #[test]
    fn builtin_layouts_parse_and_check() {
        let layouts: Vec<Layout> = serde_json::from_str(BUILTIN).expect("layouts.json parses");
        assert!(layouts.len() >= 9);
        for l in &layouts {
            l.check().expect("built-in layout is consistent");
        }
    }

    #[test]
    fn pattern_with_index_matches_digits_only() {
        let spec = BranchSpec {
            role: Role::Kxk,
            path: "conv_kxk.{n}".into(),
            conv: Some("conv".into()),
            bn: Some("bn".into()),
            ops: Vec::new(),
            coef: 1.0,
            required: false,
            only_if: None,
        };
        let pats = slot_patterns(&spec);
        let (_, weight) = &pats[0];
        let name: Vec<&str> = "stages.1.0.conv_kxk.12.conv.weight".split('.').collect();
        assert_eq!(
            match_suffix(&name, weight, 2),
            Some(("stages.1.0".to_string(), "conv_kxk.12".to_string()))
        );
        let name: Vec<&str> = "stages.1.0.conv_kxk.conv.weight".split('.').collect();
        assert_eq!(match_suffix(&name, weight, 2), None);
    }

    #[test]
    fn an_op_names_exactly_one_kind_and_conv_options_go_with_conv() {
        let parse = |json: &str| serde_json::from_str::<OpSpec>(json);
        let conv = parse(r#"{"conv": "c", "dilation": 2}"#).expect("a dilated conv");
        assert_eq!(
            conv.kind,
            OpKind::Conv {
                name: "c".into(),
                dilation: 2,
                asymmetric: false,
                plus_identity: false,
                out_axis: 0
            }
        );
        let two = parse(r#"{"conv": "c", "bn": "b"}"#).expect_err("two kinds");
        assert!(two.to_string().contains("exactly one of"), "{two}");
        let none = parse(r#"{"optional": true}"#).expect_err("no kind");
        assert!(none.to_string().contains("exactly one of"), "{none}");
        let stray = parse(r#"{"bn": "b", "dilation": 2}"#).expect_err("dilation without conv");
        assert!(
            stray.to_string().contains("go with \"conv\" only"),
            "{stray}"
        );
        let back = serde_json::to_string(&conv).expect("serializes");
        assert_eq!(parse(&back).expect("reads back"), conv);
    }
}
