//! Turning matched names into checked [`Block`]s: every kind of a layout run, blocks inside
//! larger blocks of another kind given to those, orphans (half blocks) refused unless another
//! block takes their tensors, ownership of every tensor and deploy name checked.

use std::collections::{BTreeMap, BTreeSet};

use super::names::*;
use super::schema::{Kind, Layout, LayoutError, OpKind, OpSpec, Rule};
use crate::block::{Block, BlockError, BnTensors, Branch, Op, Role};
use crate::checkpoint::Checkpoint;
use crate::report::Skipped;

/// A candidate that is not a block: half a block (a conv branch without the main conv) or a
/// block without a required branch. An error once the layout is settled, unless blocks of
/// another kind take all its tensors (at the same prefix, for a missing branch: RepViT's
/// current and legacy RepVggDw).
pub(super) struct Orphan {
    error: LayoutError,
    prefix: Option<String>,
    tensors: Vec<String>,
}

/// A candidate that did not become a block: left alone (and said so in the report), or
/// refused once the layout is settled unless other blocks take its tensors.
enum Unfit {
    Skipped(Skipped),
    Orphan(Orphan),
}

/// What blocks are assembled with beyond the layout: the BN ε, and the blocks whose
/// tensorless branches `--identity` turns on or off whatever the layout's rule says.
pub(super) struct Ctx<'a> {
    pub(super) eps: f64,
    pub(super) identity: &'a BTreeMap<String, bool>,
}

/// The blocks of one layout in a checkpoint, found in one pass, and the candidates that are
/// not blocks: while a layout is being chosen only the blocks count; the settled layout's
/// are judged by [`Finding::refusal`].
pub(super) struct Finding {
    pub(super) blocks: Vec<Block>,
    unfit: Vec<Unfit>,
}

impl Finding {
    /// Why the settled layout refuses the file: a half block or a block without a required
    /// branch whose tensors no other block takes, or a deploy name taken by a tensor no block
    /// consumes.
    pub(super) fn refusal(&self, ckpt: &Checkpoint) -> Option<LayoutError> {
        let consumed: BTreeSet<&str> = (self.blocks.iter())
            .flat_map(|b| b.consumed.iter().map(String::as_str))
            .collect();
        let untaken = self.unfit.iter().find_map(|u| match u {
            Unfit::Orphan(o) => {
                let taken = o.tensors.iter().all(|t| consumed.contains(t.as_str()))
                    && (o.prefix.as_ref()).is_none_or(|p| self.blocks.iter().any(|b| &b.name == p));
                (!taken).then(|| o.error.clone())
            }
            Unfit::Skipped(_) => None,
        });
        untaken.or_else(|| check_deploy_names(ckpt, &self.blocks).err())
    }

    /// The blocks, and the candidates left alone.
    pub(super) fn into_found(self) -> BlocksFound {
        let skipped = self.unfit.into_iter().filter_map(|u| match u {
            Unfit::Skipped(s) => Some(s),
            Unfit::Orphan(_) => None,
        });
        BlocksFound {
            skipped: skipped.collect(),
            blocks: self.blocks,
        }
    }
}

/// The blocks of every kind of `layout` in the checkpoint, blocks inside larger blocks of
/// another kind given to those, in the order of their main weights in the file.
pub(super) fn find_blocks(
    ckpt: &Checkpoint,
    names: &Names,
    layout: &Layout,
    ctx: &Ctx,
) -> Result<Finding, LayoutError> {
    let mut blocks = Vec::new();
    let mut unfit = Vec::new();
    let mut kinds_of = Vec::new();
    for (k, kind) in layout.all_kinds().iter().enumerate() {
        let before = blocks.len();
        find_kind((ckpt, names), layout, kind, (&mut blocks, &mut unfit), ctx)?;
        kinds_of.resize(kinds_of.len() + blocks.len() - before, k);
    }
    let mut blocks = drop_contained(blocks, &kinds_of);
    check_ownership(&blocks)?;
    blocks.sort_by_key(|b| ckpt.get(b.main_weight()).map_or(0, |t| t.start));
    Ok(Finding { blocks, unfit })
}

/// The blocks of one kind of `layout` into `blocks`; candidates that are not blocks into
/// `unfit`.
fn find_kind(
    (ckpt, names): (&Checkpoint, &Names),
    layout: &Layout,
    kind: &Kind,
    (blocks, unfit): (&mut Vec<Block>, &mut Vec<Unfit>),
    ctx: &Ctx,
) -> Result<(), LayoutError> {
    let several = layout.kinds.len() + usize::from(!layout.branches.is_empty()) > 1;
    let is_main = |f: &Found| {
        let spec = &kind.branches[f.spec];
        // A main branch that reads the input as it is (RIFormer's mixer) has no kernel: any
        // of its own tensors makes it present; OREPA's kernel, its origin.
        let plain = spec.op_specs().first().map(|op| &op.kind) == Some(&OpKind::Identity);
        spec.role == Role::Kxk
            && f.slots
                .keys()
                .any(|(_, leaf)| plain || matches!(leaf, Leaf::ConvWeight | Leaf::Orepa(0)))
    };
    let skip = |prefix: &str, why: String| Unfit::Skipped(skipped(prefix, why));
    for (prefix, branches) in &candidates(names, kind) {
        if !kind.applies_at(prefix) {
            continue;
        }
        let orphan = |error: LayoutError, at: Option<&String>| Orphan {
            error,
            prefix: at.cloned(),
            tensors: (branches.values())
                .flat_map(|f| f.slots.values().cloned())
                .collect(),
        };
        if !branches.values().any(is_main) {
            if !layout.generic_names
                && let Err(error) = refuse_half_block(layout, kind, prefix, branches)
            {
                unfit.push(Unfit::Orphan(orphan(error, None)));
            }
            continue;
        }
        let missing_required = kind
            .branches
            .iter()
            .enumerate()
            .find(|(i, spec)| spec.required && !branches.values().any(|f| f.spec == *i));
        if let Some((_, spec)) = missing_required {
            let why = format!("no `{}` branch", spec.path);
            unfit.push(match layout.generic_names {
                true => skip(prefix, why),
                false => Unfit::Orphan(orphan(BlockError::new(prefix, why).into(), Some(prefix))),
            });
            continue;
        }
        match assemble(ckpt, kind, prefix, branches, ctx) {
            Ok(block) => match other_kernel(kind, &block) {
                Some(s) => unfit.push(Unfit::Skipped(s)),
                None => blocks.push(block),
            },
            Err(e) if layout.generic_names => unfit.push(skip(prefix, e.what)),
            // Another kind may be what the block is (DBB's four forms share most names).
            Err(e) if several => unfit.push(Unfit::Orphan(orphan(e.into(), Some(prefix)))),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A candidate at `prefix` left alone, and why.
fn skipped(prefix: &str, reason: String) -> Skipped {
    Skipped {
        name: prefix.to_string(),
        reason,
    }
}

/// A kind with one main kernel size (RT-DETR's 3×3) does not take a block with another.
fn other_kernel(kind: &Kind, block: &Block) -> Option<Skipped> {
    let k = kind.kernel.filter(|&k| (k, k) != block.kernel)?;
    Some(Skipped {
        name: block.name.clone(),
        reason: format!(
            "a {}×{} main kernel; a {} block has {k}×{k}",
            block.kernel.0, block.kernel.1, kind.name
        ),
    })
}

/// Drops a block whose tensors all belong to a larger block of another kind (the mixer
/// inside FastViT's RepMixer, the ConvNorm inside RepViT's RepVggDw: the framework converts
/// the outer module); of two blocks with the same tensors, the inner one (SHViT's Residual
/// around a Conv2dNorm is converted, not the Conv2dNorm), at the same prefix the later kind's.
pub(super) fn drop_contained(blocks: Vec<Block>, kinds_of: &[usize]) -> Vec<Block> {
    let sets: Vec<BTreeSet<&str>> = blocks
        .iter()
        .map(|b| b.consumed.iter().map(String::as_str).collect())
        .collect();
    let mut owners: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, set) in sets.iter().enumerate() {
        for t in set {
            owners.entry(t).or_default().push(i);
        }
    }
    let inside = |i: usize| {
        let Some(first) = sets[i].first() else {
            return false;
        };
        let outer = |j: usize| {
            let (a, b) = (depth(&blocks[j].name), depth(&blocks[i].name));
            a < b || a == b && kinds_of[j] < kinds_of[i]
        };
        owners[first].iter().any(|&j| {
            j != i
                && kinds_of[j] != kinds_of[i]
                && (sets[j].len() > sets[i].len() || sets[j].len() == sets[i].len() && outer(j))
                && sets[i].is_subset(&sets[j])
        })
    };
    let keep: Vec<bool> = (0..blocks.len()).map(|i| !inside(i)).collect();
    blocks
        .into_iter()
        .zip(keep)
        .filter_map(|(b, k)| k.then_some(b))
        .collect()
}

/// How deep a block prefix is: its number of dot-separated names.
pub(super) fn depth(prefix: &str) -> usize {
    if prefix.is_empty() {
        0
    } else {
        prefix.split('.').count()
    }
}

/// A conv branch without its block's k×k conv is half a block.
pub(super) fn refuse_half_block(
    layout: &Layout,
    kind: &Kind,
    prefix: &str,
    branches: &BTreeMap<String, Found>,
) -> Result<(), LayoutError> {
    let Some(tensor) = branches.values().find_map(|f| {
        f.slots
            .iter()
            .find_map(|((_, leaf), t)| (*leaf == Leaf::ConvWeight).then_some(t))
    }) else {
        return Ok(());
    };
    let main = kind
        .branches
        .iter()
        .find(|b| b.role == Role::Kxk)
        .map_or("k×k".to_string(), |b| format!("`{}` branch", b.path));
    Err(LayoutError::HalfBlock {
        layout: layout.name.clone(),
        block: prefix.to_string(),
        tensor: tensor.clone(),
        missing: main,
    })
}

/// Refuses a deploy name that is taken by a tensor no block consumes.
pub(super) fn check_deploy_names(ckpt: &Checkpoint, blocks: &[Block]) -> Result<(), LayoutError> {
    for block in blocks {
        for tensor in [&block.deploy_weight, &block.deploy_bias] {
            // UniRepLKNet writes its fused kernel under the name of a kernel it consumes.
            if ckpt.get(tensor).is_some() && !block.consumed.contains(tensor) {
                return Err(LayoutError::DeployNameTaken {
                    block: block.name.clone(),
                    tensor: tensor.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Refuses a tensor that two blocks both claim (blocks nest only if a layout's names are
/// ambiguous).
pub(super) fn check_ownership(blocks: &[Block]) -> Result<(), LayoutError> {
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    for block in blocks {
        let own: BTreeSet<&str> = block.consumed.iter().map(String::as_str).collect();
        for t in own {
            if let Some(other) = owner.insert(t, &block.name) {
                return Err(BlockError::new(
                    &block.name,
                    format!("tensor `{t}` also belongs to block `{other}`"),
                )
                .into());
            }
        }
    }
    Ok(())
}

/// Joins a prefix and a name relative to it.
pub(super) fn join(prefix: &str, leaf: &str) -> String {
    let leaf = leaf.trim_start_matches('/');
    if prefix.is_empty() {
        leaf.to_string()
    } else {
        format!("{prefix}.{leaf}")
    }
}

/// Turns the tensors found under one prefix into a checked [`Block`].
pub(super) fn assemble(
    ckpt: &Checkpoint,
    kind: &Kind,
    prefix: &str,
    found: &BTreeMap<String, Found>,
    ctx: &Ctx,
) -> Result<Block, BlockError> {
    let (tensorless, assumed) = tensorless_branches(ckpt, kind, prefix, found, ctx);
    let mut order: Vec<(&String, &Found)> = found
        .iter()
        .chain(tensorless.iter().map(|(l, f)| (l, f)))
        .collect();
    // Branch order: by role (k×k first), then label — so the main branch is first.
    order.sort_by_key(|(label, f)| (kind.branches[f.spec].role, f.spec, natural_key(label)));
    let mut branches = Vec::new();
    for (label, f) in order {
        let spec = &kind.branches[f.spec];
        let base = if spec.path.is_empty() {
            prefix.to_string()
        } else {
            join(prefix, label)
        };
        let at = Place {
            prefix,
            base,
            label,
            identity: spec.role == Role::Identity,
            eps: ctx.eps,
        };
        let ops = at.ops(ckpt, f, &spec.op_specs())?;
        branches.push(Branch {
            label: label.clone(),
            role: spec.role,
            coef: spec.coef,
            ops,
        });
    }
    let at = Place {
        prefix,
        base: prefix.to_string(),
        label: "(post-ops)",
        identity: false,
        eps: ctx.eps,
    };
    let post = at.ops(ckpt, &Found::default(), &kind.post)?;
    let deploy = [
        join(prefix, &kind.deploy.weight),
        join(prefix, &kind.deploy.bias),
    ];
    let mut block = Block::new(ckpt, prefix, branches, post, deploy)?;
    block.kind = kind.name.clone();
    block.keeps_branches = kind.keeps_branches;
    block.assumed = assumed;
    // A placeholder the conversion overwrites (super-gradients' `rbr_reparam`) is consumed.
    let placeholders = kind.overwrites.iter().map(|t| join(prefix, t));
    block
        .consumed
        .extend(placeholders.filter(|t| ckpt.get(t).is_some()));
    Ok(block)
}

/// The branches of `kind` without tensors of their own (RepMixer's and RepViT's plain skip,
/// QARepVGG's identity): in every block of the kind, or where the branch's rule (or
/// `--identity`) says; with what decided each ruled one, for the report.
fn tensorless_branches(
    ckpt: &Checkpoint,
    kind: &Kind,
    prefix: &str,
    found: &BTreeMap<String, Found>,
    ctx: &Ctx,
) -> (Vec<(String, Found)>, Vec<String>) {
    let main_shape = found
        .values()
        .filter(|f| kind.branches[f.spec].role == Role::Kxk)
        .find_map(|f| f.slots.get(&(0, Leaf::ConvWeight)))
        .and_then(|w| ckpt.get(w))
        .map(|t| t.shape.clone())
        .unwrap_or_default();
    let mut assumed = Vec::new();
    let mut branches = Vec::new();
    for (i, spec) in kind.branches.iter().enumerate() {
        let ops = spec.op_specs();
        if !slot_patterns(spec).is_empty() || ops.is_empty() {
            continue;
        }
        if !ops.iter().all(|op| op_leaves(op).is_empty()) {
            continue;
        }
        if let Some(rule) = spec.only_if {
            let (present, why) = match (ctx.identity.get(prefix), rule) {
                (Some(&on), _) => (on, "--identity".to_string()),
                (None, Rule::InEqOut) => match main_shape[..] {
                    [out, inp, ..] => (out == inp, format!("rule in == out: {inp} → {out}")),
                    _ => (false, "rule in == out: no main kernel".to_string()),
                },
            };
            let yes = if present { "yes" } else { "no" };
            assumed.push(format!("{}: {yes} ({why})", spec.label()));
            if !present {
                continue;
            }
        }
        let found = Found {
            spec: i,
            ..Found::default()
        };
        branches.push((spec.label(), found));
    }
    (branches, assumed)
}

/// Where an op's tensors are: the block prefix, the branch's own path and label.
pub(super) struct Place<'a> {
    prefix: &'a str,
    base: String,
    label: &'a str,
    identity: bool,
    /// The ε of every BN the place builds.
    eps: f64,
}

impl Place<'_> {
    /// A chain of ops; optional ones whose tensors are absent left out.
    fn ops(&self, ckpt: &Checkpoint, f: &Found, specs: &[OpSpec]) -> Result<Vec<Op>, BlockError> {
        let mut ops = Vec::with_capacity(specs.len());
        for (i, op) in specs.iter().enumerate() {
            ops.extend(self.op(ckpt, f, i, op)?);
        }
        Ok(ops)
    }

    /// Op `i` of a branch whose branch-relative tensors matched as `f`; block-relative ones
    /// (and the post-ops') are looked up by name.
    fn op(
        &self,
        ckpt: &Checkpoint,
        f: &Found,
        i: usize,
        op: &OpSpec,
    ) -> Result<Option<Op>, BlockError> {
        let looked_up;
        let slots = if block_relative(op) || f.slots.is_empty() {
            let root = if block_relative(op) {
                self.prefix
            } else {
                &self.base
            };
            looked_up = op_leaves(op)
                .into_iter()
                .map(|(leaf, name)| ((i, leaf), join(root, &name)))
                .filter(|(_, name)| ckpt.get(name).is_some())
                .collect();
            &looked_up
        } else {
            &f.slots
        };
        if op.optional && !slots.keys().any(|(j, _)| *j == i) {
            return Ok(None);
        }
        self.build(slots, f, i, op).map(Some)
    }

    fn err<T>(&self, what: String) -> Result<T, BlockError> {
        Err(BlockError::new(self.prefix, what))
    }

    /// Op `i` from `slots`, refusing one that is incomplete; `f` is all the branch matched.
    fn build(
        &self,
        slots: &BTreeMap<Slot, String>,
        f: &Found,
        i: usize,
        op: &OpSpec,
    ) -> Result<Op, BlockError> {
        let label = self.label;
        let slot = |leaf| slots.get(&(i, leaf)).cloned();
        match &op.kind {
            OpKind::Conv { .. } => self.conv(slot(Leaf::ConvWeight), slot(Leaf::ConvBias), f, op),
            OpKind::ThenConv(conv) => match slot(Leaf::ConvWeight2) {
                Some(weight) => Ok(Op::ThenConv { weight }),
                None => self.err(format!(
                    "branch `{label}` has {} but no second conv weight `{}`",
                    describe_slots(f),
                    join(&self.base, &format!("{conv}.weight"))
                )),
            },
            OpKind::ConvFc(conv) => match slot(Leaf::ConvWeight) {
                Some(weight) => Ok(Op::ConvFc { weight }),
                None => self.err(format!(
                    "branch `{label}` has {} but no conv weight `{}`",
                    describe_slots(f),
                    join(&self.base, &format!("{conv}.weight"))
                )),
            },
            OpKind::GroupBn(path) => match self.bn(slots, f, i, path)? {
                Op::Bn(bn) => Ok(Op::GroupBn(bn)),
                other => Ok(other),
            },
            OpKind::ThenAvgPool(side) => Ok(Op::ThenAvgPool { kernel: *side }),
            OpKind::Identity => Ok(Op::Identity),
            OpKind::AvgPool(side) => Ok(Op::AvgPool { kernel: *side }),
            OpKind::Scalar(scale) => match slot(Leaf::Scale) {
                Some(weight) => Ok(Op::Scalar { weight }),
                None => self.err(format!(
                    "branch `{label}` has no scalar tensor `{}`",
                    join(&self.base, scale)
                )),
            },
            OpKind::Scale(scale) => match slot(Leaf::Scale) {
                Some(weight) => Ok(Op::Scale { weight }),
                None => self.err(format!(
                    "branch `{label}` has no scale tensor `{}`",
                    join(&self.base, scale)
                )),
            },
            OpKind::BnIn(path) => match self.bn(slots, f, i, path)? {
                Op::Bn(bn) => Ok(Op::InputBn(bn)),
                other => Ok(other),
            },
            OpKind::Bn(path) => self.bn(slots, f, i, path),
            OpKind::Affine(path) => self.affine(slots, f, i, path),
            OpKind::Orepa(path) => self.orepa(slots, f, i, path),
        }
    }

    /// A conv op of `op`'s spec from its weight and bias slots, refusing one without a weight.
    fn conv(
        &self,
        weight: Option<String>,
        bias: Option<String>,
        f: &Found,
        op: &OpSpec,
    ) -> Result<Op, BlockError> {
        let OpKind::Conv {
            name: conv,
            dilation,
            asymmetric,
            plus_identity,
            out_axis,
        } = &op.kind
        else {
            return self.err(format!("branch `{}`: not a conv op", self.label));
        };
        match weight {
            Some(weight) => Ok(Op::Conv {
                weight,
                bias,
                dilation: *dilation,
                asymmetric: *asymmetric,
                plus_identity: *plus_identity,
                out_axis: *out_axis,
            }),
            None => self.err(format!(
                "branch `{}` has {} but no conv weight `{}`",
                self.label,
                describe_slots(f),
                join(&self.base, &format!("{conv}.weight"))
            )),
        }
    }

    /// A per-channel affine `{path}.weight`, `{path}.bias` (op `i`), refusing one without both.
    fn affine(
        &self,
        slots: &BTreeMap<Slot, String>,
        f: &Found,
        i: usize,
        path: &str,
    ) -> Result<Op, BlockError> {
        let slot = |leaf| slots.get(&(i, leaf)).cloned();
        if let (Some(weight), Some(bias)) = (slot(Leaf::BnWeight), slot(Leaf::BnBias)) {
            return Ok(Op::Affine { weight, bias });
        }
        let root = if path.starts_with('/') {
            self.prefix
        } else {
            &self.base
        };
        self.err(format!(
            "branch `{}` has {} but not both `{}` and `{}` of its affine",
            self.label,
            describe_slots(f),
            join(root, &join(path, "weight")),
            join(root, &join(path, "bias"))
        ))
    }

    /// An OREPA source: all its stored tensors, or an error naming the first missing one.
    fn orepa(
        &self,
        slots: &BTreeMap<Slot, String>,
        f: &Found,
        i: usize,
        path: &str,
    ) -> Result<Op, BlockError> {
        let leaves = crate::block::OrepaTensors::LEAVES;
        let mut names = Vec::with_capacity(leaves.len());
        for (j, leaf) in leaves.iter().enumerate() {
            match slots.get(&(i, Leaf::Orepa(j))) {
                Some(name) => names.push(name.clone()),
                None => {
                    return self.err(format!(
                        "branch `{}` has {} but no OREPA tensor `{}`",
                        self.label,
                        describe_slots(f),
                        join(&self.base, &join(path, leaf))
                    ));
                }
            }
        }
        let names: [String; 12] = names
            .try_into()
            .map_err(|_| BlockError::new(self.prefix, "OREPA: twelve tensors expected"))?;
        Ok(Op::Orepa(Box::new(crate::block::OrepaTensors::from_names(
            names,
        ))))
    }

    /// A BN op: all four tensors, or an error that says which are missing.
    fn bn(
        &self,
        slots: &BTreeMap<Slot, String>,
        f: &Found,
        i: usize,
        bn_path: &str,
    ) -> Result<Op, BlockError> {
        let label = self.label;
        let missing: Vec<&str> = BN_LEAVES[..4]
            .iter()
            .filter(|(l, _)| !slots.contains_key(&(i, *l)))
            .map(|(_, name)| *name)
            .collect();
        if missing.len() == 4 {
            if self.identity {
                return self.err(format!("identity branch `{label}` has no BN tensors"));
            }
            // The layout puts a BN here; without it the branch would be fused as a bare conv,
            // silently wrong.
            let path = join(&self.base, bn_path);
            return self.err(format!(
                "branch `{label}` has {} but no BN: expected `{path}.weight`, `.bias`, `.running_mean` and `.running_var`",
                describe_slots(f)
            ));
        }
        if !missing.is_empty() {
            return self.err(format!(
                "branch `{label}`: its BN is missing {} (found {})",
                missing.join(", "),
                describe_slots(f)
            ));
        }
        let get = |leaf| slots[&(i, leaf)].clone();
        Ok(Op::Bn(BnTensors {
            weight: get(Leaf::BnWeight),
            bias: get(Leaf::BnBias),
            running_mean: get(Leaf::BnMean),
            running_var: get(Leaf::BnVar),
            num_batches_tracked: slots.get(&(i, Leaf::BnCount)).cloned(),
            eps: self.eps,
        }))
    }
}

pub(super) fn describe_slots(f: &Found) -> String {
    let names: Vec<&str> = f.slots.values().map(String::as_str).collect();
    names.join(", ")
}

/// Sorts `conv_kxk.10` after `conv_kxk.2`.
pub(super) fn natural_key(label: &str) -> Vec<(u64, String)> {
    label
        .split('.')
        .map(|s| match s.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, s.to_string()),
        })
        .collect()
}
