//! Finding the blocks: by their tensor names in a checkpoint — the layout table ([`schema`]),
//! matching names (`names`), assembling checked blocks (`assemble`), and choosing among
//! layouts ([`Detection::find`]) — or by topology in an ONNX graph ([`graph`]).
//!
//! A layout is data — a table of name patterns — not a code path. The built-in table lives in
//! `layouts.json`; a user can pass their own file of the same shape for an in-house fork.
//! Detection matches every tensor name against every pattern, groups the matches by block
//! prefix, and keeps the prefixes that carry a k×k conv branch.

mod assemble;
pub mod graph;
mod names;
pub mod schema;

use std::collections::BTreeSet;

pub use schema::{
    BranchSpec, DEFAULT_BN_EPS, DeployNames, Kind, Layout, LayoutError, OpKind, OpSpec,
};

use crate::block::Block;
use crate::checkpoint::Checkpoint;
use crate::report::{EpsInfo, Skipped};
use assemble::{depth, find_blocks};
use names::{BlocksFound, split_names};

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
        let names = split_names(ckpt);
        if let Some(name) = forced {
            let Some(layout) = layouts.iter().find(|l| l.name == name) else {
                let known: Vec<_> = layouts.iter().map(|l| l.name.as_str()).collect();
                return Err(LayoutError::Unknown(name.to_string(), known.join(", ")));
            };
            let found = find_blocks(ckpt, &names, layout, true, layout.bn_eps(eps).0)?;
            if found.blocks.is_empty() {
                return Err(LayoutError::NoBlocks {
                    hint: format!(" of layout {}{}", layout.name, deployed_hint(ckpt, layouts)),
                });
            }
            return Ok(Detection {
                layout: layout.clone(),
                blocks: found.blocks,
                skipped: found.skipped,
                bn_eps: layout.eps_info(eps),
            });
        }
        let mut hits = Vec::new();
        for layout in layouts {
            if let Some(marker) = &layout.marker {
                let leaf = format!(".{marker}");
                if !ckpt.tensors().iter().any(|t| t.name.ends_with(&leaf)) {
                    continue;
                }
            }
            let found = match find_blocks(ckpt, &names, layout, false, layout.bn_eps(eps).0) {
                // A fallback's common names may meet tensors they do not describe.
                Err(_) if layout.fallback => continue,
                found => found?,
            };
            if !found.blocks.is_empty() {
                hits.push((layout, found));
            }
        }
        let hits = settle(hits);
        match hits.len() {
            0 => Err(LayoutError::NoBlocks {
                hint: deployed_hint(ckpt, layouts),
            }),
            1 => {
                let (layout, _) = hits
                    .into_iter()
                    .next()
                    .ok_or_else(|| LayoutError::NoBlocks {
                        hint: String::new(),
                    })?;
                // Again, now refusing half blocks: the layout is settled.
                let found = find_blocks(ckpt, &names, layout, true, layout.bn_eps(eps).0)?;
                Ok(Detection {
                    layout: layout.clone(),
                    blocks: found.blocks,
                    skipped: found.skipped,
                    bn_eps: layout.eps_info(eps),
                })
            }
            _ => Err(LayoutError::Mixed {
                found: hits
                    .iter()
                    .map(|(l, f)| {
                        format!(
                            "{} ({} blocks, e.g. `{}`)",
                            l.name,
                            f.blocks.len(),
                            f.blocks[0].name
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Every tensor consumed by a fused block (its branches, `num_batches_tracked` included).
    pub fn consumed(&self) -> BTreeSet<&str> {
        self.blocks
            .iter()
            .flat_map(|b| b.consumed.iter().map(String::as_str))
            .collect()
    }
}

/// Of the layouts that found blocks, the ones left to choose from: fallbacks only when
/// nothing else found blocks, and not a layout whose blocks take only tensors that another
/// layout's take too (a FastViT file holds timm MobileOne blocks). Of layouts that take the
/// same tensors, the one whose blocks are outer modules (iFormer's RepCPE around what RepViT
/// would fuse as a ConvNorm), then the earlier in the table (a pure MobileOne file matches
/// FastViT's MobileOne kind as well).
fn settle(mut hits: Vec<(&Layout, BlocksFound)>) -> Vec<(&Layout, BlocksFound)> {
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
                plus_identity: false
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
