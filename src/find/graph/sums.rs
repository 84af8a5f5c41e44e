//! Following a sum down: `Add`/`Sub` trees and chains, `Sum` nodes, the chains of ops under
//! each leaf.

use super::*;
use crate::onnx::graph::Attr;

/// What makes two tensors one input of a set: the tensor itself or, for the output of a
/// plain `Cast` of a data tensor, that tensor and the Cast's attributes. onnxconverter-common's
/// `keep_io_types` gives each consumer of a graph input its own Cast: equal Casts of one
/// tensor hold the same values, so branches reading them read one input.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct InputKey {
    tensor: String,
    cast: Option<BTreeMap<String, Attr>>,
}

/// Deepest nesting of sums followed, and longest chain of ops below a leaf.
pub(super) const MAX_DEPTH: usize = 256;
pub(super) const MAX_CHAIN: usize = 12;

impl View<'_> {
    pub(super) fn tree(&self, root: usize) -> Tree {
        let mut tree = Tree::default();
        if let Kind::Join(inputs) = self.kind(root) {
            tree.joins.push(root);
            for (t, c) in inputs {
                self.expand(&t, c, &[], 0, &mut tree);
            }
        }
        tree
    }

    pub(super) fn expand(&self, t: &str, coef: f64, upper: &[Step], depth: usize, tree: &mut Tree) {
        let mut steps: Vec<Step> = Vec::new();
        let mut cur = t.to_string();
        while depth < MAX_DEPTH && self.single_use(&cur) {
            match self.producer_kind(&cur) {
                Some((j, Kind::Join(inputs))) => {
                    tree.joins.push(j);
                    if depth == 0 {
                        tree.children.push(j);
                    }
                    let mut up: Vec<Step> = steps.into_iter().rev().collect();
                    up.extend(upper.iter().cloned());
                    for (i, c) in inputs {
                        self.expand(&i, coef * c, &up, depth + 1, tree);
                    }
                    return;
                }
                Some((_, Kind::Step(s))) if s.op.as_ref().is_some_and(is_per_channel) => {
                    cur = s.input.clone();
                    steps.push(s);
                }
                Some((j, Kind::Pass(i))) => {
                    cur = i.clone();
                    steps.push(Step {
                        node: j,
                        op: None,
                        input: i,
                        problem: None,
                    });
                }
                _ => break,
            }
        }
        tree.raws.push(Raw {
            coef,
            lower: self.lower_chain(t),
            upper: upper.to_vec(),
            leaf: t.to_string(),
        });
    }

    /// The linear ops below `t`, at most two sources deep, graph order.
    pub(super) fn lower_chain(&self, t: &str) -> Vec<Step> {
        let mut chain = Vec::new();
        let mut cur = t.to_string();
        let mut sources = 0;
        while chain.len() < MAX_CHAIN {
            match self.producer_kind(&cur) {
                Some((_, Kind::Step(s))) => {
                    if s.op.as_ref().is_some_and(is_source) {
                        if sources == 2 {
                            break;
                        }
                        sources += 1;
                    }
                    cur = s.input.clone();
                    chain.push(s);
                }
                Some((j, Kind::Pass(i))) => {
                    cur = i.clone();
                    chain.push(Step {
                        node: j,
                        op: None,
                        input: i,
                        problem: None,
                    });
                }
                _ => match self.border_fill(&cur) {
                    Some(fill) => {
                        cur = fill.input.clone();
                        chain.push(fill);
                    }
                    None => break,
                },
            }
        }
        chain.reverse();
        chain
    }

    /// The shallowest input every branch can read, and where each branch is cut for it:
    /// one tensor, or identical `Cast`s of one tensor (see [`InputKey`]).
    pub(super) fn common_input(&self, raws: &[Raw]) -> Option<(String, Vec<usize>)> {
        let first = raws.first()?;
        (0..=first.lower.len()).rev().find_map(|j| {
            let key = self.input_key(first.input_at(j));
            let cuts: Option<Vec<usize>> = raws
                .iter()
                .map(|r| {
                    (0..=r.lower.len())
                        .rev()
                        .find(|&k| self.input_key(r.input_at(k)) == key)
                })
                .collect();
            let cuts = cuts?;
            // Of equal Casts, the set reads the earliest, so the merged node, which takes
            // the place of the set's first node, still comes after what it reads.
            let input = raws
                .iter()
                .zip(&cuts)
                .map(|(r, &k)| r.input_at(k))
                .min_by_key(|t| self.producer.get(t).copied())?;
            Some((input.to_string(), cuts))
        })
    }

    /// What makes two tensors one input of a set.
    pub(super) fn input_key(&self, t: &str) -> InputKey {
        match self.producer.get(t).map(|&i| self.node(i)) {
            Some(n) if self.is_plain_cast(n) => InputKey {
                tensor: n.inputs[0].clone(),
                cast: Some(n.attrs.clone()),
            },
            _ => InputKey {
                tensor: t.to_string(),
                cast: None,
            },
        }
    }

    /// A `Cast` of one data tensor, with only typed attributes (`to`, `saturate`).
    fn is_plain_cast(&self, n: &Node) -> bool {
        n.op_type == "Cast"
            && (n.domain.is_empty() || n.domain == "ai.onnx")
            && n.inputs.len() == 1
            && n.outputs.len() == 1
            && !self.is_const(&n.inputs[0])
            && n.attrs.values().all(|a| matches!(a, Attr::Int(_)))
    }

    /// The `Cast` nodes that give branches other copies of the set's `input`: each is part
    /// of the set when only the set's `nodes` read what it writes (else it stays).
    pub(super) fn extra_casts(
        &self,
        input: &str,
        firsts: &[&str],
        nodes: &BTreeSet<usize>,
    ) -> Vec<usize> {
        let mut out: Vec<usize> = firsts
            .iter()
            .filter(|t| **t != input && !self.outputs.contains(**t))
            .filter(|t| self.consumers_of(t).iter().all(|c| nodes.contains(c)))
            .filter_map(|t| self.producer.get(*t).copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The sets (or rejections) a sum rooted at `root` gives.
    pub(super) fn candidates(&self, root: usize) -> Vec<Result<BranchSet, Rejected>> {
        let tree = self.tree(root);
        let has_source = |r: &Raw| {
            r.lower
                .iter()
                .chain(&r.upper)
                .any(|s| s.op.as_ref().is_some_and(is_source))
        };
        if let Some((input, cuts)) = self.common_input(&tree.raws) {
            return self.whole(root, &tree, &input, &cuts);
        }
        let mut found: Vec<Result<BranchSet, Rejected>> = tree
            .children
            .iter()
            .flat_map(|&c| self.candidates(c))
            .collect();
        // Branches on one tensor among branches on others: worth a word.
        let mut reads: BTreeMap<&str, usize> = BTreeMap::new();
        for r in tree.raws.iter().filter(|r| has_source(r)) {
            for t in (0..=r.lower.len())
                .map(|j| r.input_at(j))
                .collect::<BTreeSet<_>>()
            {
                *reads.entry(t).or_default() += 1;
            }
        }
        if let Some((t, &n)) = reads
            .iter()
            .max_by_key(|(_, n)| **n)
            .filter(|(_, n)| **n >= 2)
        {
            let merged = found.iter().filter(|f| f.is_ok()).count();
            found.push(Err(Rejected {
                nodes: self.labels(&tree.joins),
                reason: format!(
                    "the sum at node `{}` adds {} branches, but only {n} of them read `{t}`; \
                     the others start from other tensors (or from ops this finder does not \
                     know as linear), so the sum as a whole is not one convolution{}",
                    self.node(root).label(),
                    tree.raws.len(),
                    if merged > 0 {
                        format!("; {merged} partial sum(s) under it merge on their own")
                    } else {
                        String::new()
                    }
                ),
            }));
        }
        found
    }

    /// The set of a sum whose branches all read `input` (cut at `cuts`): merged, or left with
    /// why; a set left for a border fill also gives the partial sums under it.
    fn whole(
        &self,
        root: usize,
        tree: &Tree,
        input: &str,
        cuts: &[usize],
    ) -> Vec<Result<BranchSet, Rejected>> {
        let branches: Vec<(f64, Vec<Step>)> = tree
            .raws
            .iter()
            .zip(cuts)
            .map(|(r, &j)| {
                (
                    r.coef,
                    r.lower[j..].iter().chain(&r.upper).cloned().collect(),
                )
            })
            .collect();
        if !branches
            .iter()
            .any(|(_, b)| b.iter().any(|s| s.op.as_ref().is_some_and(is_source)))
        {
            return Vec::new();
        }
        let out = self.node(root).outputs.first().cloned().unwrap_or_default();
        let inside: BTreeSet<usize> = (tree.joins.iter().copied())
            .chain(branches.iter().flat_map(|(_, b)| b.iter().map(|s| s.node)))
            .collect();
        let firsts: Vec<&str> = (tree.raws.iter().zip(cuts))
            .map(|(r, &j)| r.input_at(j))
            .collect();
        let mut joins = tree.joins.clone();
        joins.extend(self.extra_casts(input, &firsts, &inside));
        let whole = self.validate(&joins, input, &branches, &out);
        let fill = |s: &Step| matches!(s.op, Some(GOp::BorderFill { .. }));
        if whole.is_err() && branches.iter().any(|(_, b)| b.iter().any(fill)) {
            // DBB: the border-filled sequences stay; the plain branches under them
            // (a partial sum) still merge on their own.
            // A rejection within the rejected set's nodes says nothing new.
            let all: BTreeSet<String> = whole
                .as_ref()
                .err()
                .map(|r| r.nodes.iter().cloned().collect())
                .unwrap_or_default();
            let mut found = vec![whole];
            found.extend(
                (tree.children.iter().flat_map(|&c| self.candidates(c))).filter(|r| match r {
                    Ok(_) => true,
                    Err(e) => !e.nodes.iter().all(|n| all.contains(n)),
                }),
            );
            return found;
        }
        vec![whole]
    }

    pub(super) fn labels(&self, nodes: &[usize]) -> Vec<String> {
        nodes.iter().map(|&i| self.node(i).label()).collect()
    }

    /// A single unfolded pair around BatchNormalization `bn` (or a token BN around it):
    /// `Conv`/`Gemm`/`MatMul` (and its bias `Add`) → BN, or BN → `Gemm`/`MatMul`/unpadded
    /// `Conv` (its bias `Add` then follows as a post-op).
    pub(super) fn single(
        &self,
        bn: usize,
        taken: &HashSet<usize>,
    ) -> Option<Result<BranchSet, Rejected>> {
        let bn_step = self.bn_step(bn)?;
        let token = match &bn_step.op {
            Some(GOp::Bn { around, .. }) => around.clone(),
            _ => Vec::new(),
        };
        if let Some(reason) = &bn_step.problem {
            // A token BN this finder cannot place is said; a BN reading a computed tensor is
            // no candidate.
            let mut nodes = token.clone();
            nodes.push(bn);
            nodes.sort_unstable();
            return (!token.is_empty()).then(|| {
                Err(Rejected {
                    nodes: self.labels(&nodes),
                    reason: reason.clone(),
                })
            });
        }
        let source_ok = |s: &Step| {
            s.problem.is_none()
                && !taken.contains(&s.node)
                && matches!(
                    s.op,
                    Some(GOp::Conv { .. } | GOp::Gemm { .. } | GOp::MatMul { .. })
                )
        };
        let out = self.node(bn_step.node).outputs.first()?.clone();
        if let Some(mut chain) = self.source_below(&bn_step.input, &token)
            && chain.first().is_some_and(source_ok)
        {
            let input = chain[0].input.clone();
            chain.push(bn_step);
            return Some(self.validate(&[], &input, &[(1.0, chain)], &out));
        }
        if !self.single_use(&out) {
            return None;
        }
        let Kind::Step(next) = self.kind(self.consumers_of(&out)[0]) else {
            return None;
        };
        let unpadded = match &next.op {
            Some(GOp::Conv { pads, .. }) => *pads == [0; 4],
            _ => true,
        };
        if !source_ok(&next) || !unpadded || next.input != out {
            return None;
        }
        let end = self
            .node(next.node)
            .outputs
            .first()
            .cloned()
            .unwrap_or_default();
        let input = bn_step.input.clone();
        Some(self.validate(&[], &input, &[(1.0, vec![bn_step, next])], &end))
    }

    /// The source writing `t` through single-use per-channel ops (a `MatMul`'s bias `Add`),
    /// and those ops, graph order. `t` itself may also be read by the nodes `around` a
    /// token BN (its `Flatten` and `Shape`).
    fn source_below(&self, t: &str, around: &[usize]) -> Option<Vec<Step>> {
        let mut chain = Vec::new();
        let mut cur = t.to_string();
        let read_inside = !around.is_empty()
            && !self.outputs.contains(t)
            && self.consumers_of(t).iter().all(|c| around.contains(c));
        while chain.len() < MAX_CHAIN
            && (self.single_use(&cur) || (chain.is_empty() && read_inside))
        {
            let Some((_, Kind::Step(s))) = self.producer_kind(&cur) else {
                return None;
            };
            let source = s.op.as_ref().is_some_and(is_source);
            if !source && !s.op.as_ref().is_some_and(is_per_channel) {
                return None;
            }
            cur = s.input.clone();
            chain.push(s);
            if source {
                chain.reverse();
                return Some(chain);
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------
