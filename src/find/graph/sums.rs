//! Following a sum down: `Add`/`Sub` trees and chains, `Sum` nodes, the chains of ops under
//! each leaf.

use super::*;

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
                _ => break,
            }
        }
        chain.reverse();
        chain
    }

    /// The shallowest tensor every branch can read, and where each branch is cut for it.
    pub(super) fn common_input(raws: &[Raw]) -> Option<(String, Vec<usize>)> {
        let first = raws.first()?;
        (0..=first.lower.len()).rev().find_map(|j| {
            let t = first.input_at(j);
            let cuts: Option<Vec<usize>> = raws.iter().map(|r| r.cut_for(t)).collect();
            cuts.map(|c| (t.to_string(), c))
        })
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
        if let Some((input, cuts)) = Self::common_input(&tree.raws) {
            let branches: Vec<(f64, Vec<Step>)> = tree
                .raws
                .iter()
                .zip(&cuts)
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
            return vec![self.validate(&tree.joins, &input, &branches, &out)];
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

    pub(super) fn labels(&self, nodes: &[usize]) -> Vec<String> {
        nodes.iter().map(|&i| self.node(i).label()).collect()
    }

    /// A single unfolded pair around BatchNormalization `bn`: `Conv`/`Gemm` → BN, or BN →
    /// `Gemm`/`MatMul`/unpadded `Conv`.
    pub(super) fn single(
        &self,
        bn: usize,
        taken: &HashSet<usize>,
    ) -> Option<Result<BranchSet, Rejected>> {
        let Kind::Step(bn_step) = self.kind(bn) else {
            return None;
        };
        if bn_step.problem.is_some() {
            return None;
        }
        let source_ok = |s: &Step| {
            s.problem.is_none()
                && !taken.contains(&s.node)
                && matches!(
                    s.op,
                    Some(GOp::Conv { .. } | GOp::Gemm { .. } | GOp::MatMul { .. })
                )
        };
        if let Some((_, Kind::Step(src))) = self.producer_kind(&bn_step.input)
            && source_ok(&src)
            && self.single_use(&bn_step.input)
        {
            let input = src.input.clone();
            let out = self.node(bn).outputs.first().cloned().unwrap_or_default();
            return Some(self.validate(&[], &input, &[(1.0, vec![src, bn_step])], &out));
        }
        let out = self.node(bn).outputs.first()?;
        if !self.single_use(out) {
            return None;
        }
        let Kind::Step(next) = self.kind(self.consumers_of(out)[0]) else {
            return None;
        };
        let unpadded = match &next.op {
            Some(GOp::Conv { pads, .. }) => *pads == [0; 4],
            _ => true,
        };
        if !source_ok(&next) || !unpadded || next.input != *out {
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
}

// ---------------------------------------------------------------------------------------
