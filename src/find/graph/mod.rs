//! Finding re-parameterizable blocks in an ONNX graph by its topology alone: sets of linear
//! branches on one input tensor, joined by `Add`/`Sub` (chains or trees) or `Sum`, that one
//! convolution (or one `Gemm`) computes exactly; and single `Conv`→`BatchNormalization` (or
//! `BatchNormalization`→`Gemm`) pairs an exporter left unfolded.
//!
//! A set is only reported when merging it gives exactly the same function; every candidate
//! that fails a rule is reported in [`Finding::rejected`] with the reason, naming the node.
//!
//! # The shape of a set
//! A [`BranchSet`] is `post(Σ coef·branch(input))`. Each [`GBranch`] is a chain of [`GOp`]s in
//! the graph's order, the first reading the set's input:
//! - optional per-channel ops on the input (a `BatchNormalization` before a `Gemm`/`MatMul`,
//!   LeViT's and RepViT's NormLinear; before a `Conv` only when that conv has no padding);
//! - a source: [`GOp::Conv`], [`GOp::Gemm`], [`GOp::MatMul`], [`GOp::AvgPool`], or
//!   [`GOp::Identity`] (the input itself; then it is the first op);
//! - per-channel ops ([`GOp::Bn`], [`GOp::Mul`], [`GOp::Add`], [`GOp::Sub`], [`GOp::Div`] by
//!   constants with one value per channel, or a scalar);
//! - after a 1×1, stride-1, unpadded `Conv` source only: optionally a [`GOp::Pad`], then a
//!   second `Conv` or `AveragePool` and its per-channel ops (DBB's 1×1 → k×k sequence).
//!
//! Per-channel ops that act on a partial sum (FastViT's `γ·(mixer(x) − norm(x))`) are
//! distributed: they appear in every branch under them, and a `Sub` gives its right side
//! `coef = −1`. Ops after the whole sum are [`BranchSet::post`].
//!
//! For 4-D tensors a constant of shape `[C]` broadcasts over the *width* axis (ONNX follows
//! numpy), so it is per-channel only for linear (2-D) sets; for convs `[C,1,1]`, `[1,C,1,1]`
//! or a scalar are.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

pub mod blocks;
mod channels;
mod exact;
mod ops;
mod sums;
mod tokens;

use exact::*;
use ops::*;

pub use crate::onnx::graph::{Constant, Graph, Node};

/// What the finder found in a graph.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Finding {
    /// The sets that merge exactly, in the graph's order of their first node.
    pub sets: Vec<BranchSet>,
    /// The candidates that do not, with why.
    pub rejected: Vec<Rejected>,
}

/// A set of linear branches on one input that one conv (or Gemm) with bias computes exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchSet {
    /// The tensor every branch reads.
    pub input: String,
    /// The tensor the merged node writes (the last node of the set).
    pub output: String,
    /// Every node the merge replaces, by index, ascending.
    pub nodes: Vec<usize>,
    /// The branches, in the order the sum reads them.
    pub branches: Vec<GBranch>,
    /// Per-channel ops after the sum (RepViT's BN, the classifier's `Div` by 2).
    pub post: Vec<GOp>,
    /// The merged kernel (height, width): the largest effective extent of any branch.
    pub kernel: (usize, usize),
    /// The stride every branch has.
    pub stride: (usize, usize),
    /// The merged conv's pads, ONNX order `[h_begin, w_begin, h_end, w_end]`.
    pub pads: [usize; 4],
    /// The groups every conv of the set has (1 for a linear set).
    pub group: usize,
    /// Input channels (a linear set: input features).
    pub in_channels: usize,
    /// Output channels (a linear set: output features).
    pub out_channels: usize,
    /// Whether the set is made of `Gemm`/`MatMul` (its merge is one `Gemm`), not `Conv`.
    pub linear: bool,
}

/// One branch: `coef · ops(input)`.
#[derive(Debug, Clone, PartialEq)]
pub struct GBranch {
    /// The branch's weight in the sum: 1, or −1 under the right side of a `Sub`.
    pub coef: f64,
    /// The chain, in the graph's order (see the module docs for its shape).
    pub ops: Vec<GOp>,
}

/// One linear op of a branch, with the node it comes from and the constants it reads.
#[derive(Debug, Clone, PartialEq)]
pub enum GOp {
    /// A 2-D convolution.
    Conv {
        /// The node.
        node: usize,
        /// The kernel `[out, in/group, kh, kw]`.
        weight: String,
        /// The conv's bias `[out]`, if any.
        bias: Option<String>,
        /// The kernel size (height, width), without dilation.
        kernel: (usize, usize),
        /// The stride (height, width).
        stride: (usize, usize),
        /// The dilation (height, width).
        dilation: (usize, usize),
        /// Explicit pads `[h_begin, w_begin, h_end, w_end]` (auto_pad resolved).
        pads: [usize; 4],
        /// Groups.
        group: usize,
    },
    /// `alpha·A·op(B) + beta·C`, `A` the branch's tensor.
    Gemm {
        /// The node.
        node: usize,
        /// `B`: `[out, in]` when `trans_b`, else `[in, out]`.
        weight: String,
        /// `C`, if any.
        bias: Option<String>,
        /// Whether `B` is transposed.
        trans_b: bool,
        /// `alpha`.
        alpha: f64,
        /// `beta`.
        beta: f64,
    },
    /// `A·B`, `B` a constant `[in, out]`.
    MatMul {
        /// The node.
        node: usize,
        /// `B`.
        weight: String,
    },
    /// A BatchNormalization (inference): `scale·(x − mean)/√(var + eps) + bias`.
    Bn {
        /// The node.
        node: usize,
        /// γ.
        scale: String,
        /// β.
        bias: String,
        /// μ.
        mean: String,
        /// σ².
        var: String,
        /// ε, from the node.
        eps: f64,
        /// The nodes that put a token tensor's last axis where the BN normalizes and back
        /// (`Transpose`s, or `Flatten`/`Shape`/`Reshape`: see `tokens.rs`); empty for a
        /// BN on the tensor as it is.
        around: Vec<usize>,
    },
    /// The branch's input itself.
    Identity,
    /// An AveragePool, each channel on its own.
    AvgPool {
        /// The node.
        node: usize,
        /// The window (height, width).
        kernel: (usize, usize),
        /// The stride (height, width).
        stride: (usize, usize),
        /// Explicit pads `[h_begin, w_begin, h_end, w_end]`.
        pads: [usize; 4],
        /// Whether padding counts in the mean (`count_include_pad`).
        count_include_pad: bool,
    },
    /// A constant-mode Pad.
    Pad {
        /// The node.
        node: usize,
        /// The pads as ONNX gives them: all begins, then all ends, one per axis.
        pads: Vec<i64>,
        /// The fill value.
        value: f64,
    },
    /// DBB's BNAndPad as exporters write it: a `Pad`, then `ScatterND`s (dynamo: with
    /// `Transpose`/`Identity` between) that write the BN's value at zero into the border.
    /// Found so that its set is reported as what it is; it never merges (see the reason).
    BorderFill {
        /// The `Pad` node.
        node: usize,
        /// The nodes after the Pad on the data path, the last one first.
        chain: Vec<usize>,
    },
    /// Multiply by a constant.
    Mul {
        /// The node.
        node: usize,
        /// The constant.
        tensor: String,
    },
    /// Add a constant.
    Add {
        /// The node.
        node: usize,
        /// The constant.
        tensor: String,
    },
    /// Subtract a constant.
    Sub {
        /// The node.
        node: usize,
        /// The constant.
        tensor: String,
    },
    /// Divide by a constant.
    Div {
        /// The node.
        node: usize,
        /// The constant.
        tensor: String,
    },
}

/// A candidate that is left as it is, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// The candidate's node names (or `#index op` for unnamed nodes).
    pub nodes: Vec<String>,
    /// Why it does not merge, naming the node at fault.
    pub reason: String,
}

/// A graph too broken to look for blocks in.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TopologyError {
    /// The nodes depend on each other in a circle.
    #[error("the graph has a cycle through node `{node}`")]
    Cycle {
        /// A node on the cycle.
        node: String,
    },
    /// A graph output is a constant, not computed by any node.
    #[error("graph output `{output}` is a constant (an initializer), not computed by the graph")]
    ConstantOutput {
        /// The output.
        output: String,
    },
    /// Two nodes write the same tensor.
    #[error("tensor `{tensor}` is written by both node `{first}` and node `{second}`")]
    TwoProducers {
        /// The tensor.
        tensor: String,
        /// The first writer.
        first: String,
        /// The second writer.
        second: String,
    },
    /// A node reads a tensor nothing provides.
    #[error("node `{node}` reads `{tensor}`, which is no graph input, constant or node output")]
    UnknownTensor {
        /// The node.
        node: String,
        /// The tensor.
        tensor: String,
    },
    /// A node's `index` is not its position.
    #[error("node `{node}` says index {index} but is at position {position}")]
    Index {
        /// The node.
        node: String,
        /// Its stated index.
        index: usize,
        /// Its position.
        position: usize,
    },
}

/// Finds every mergeable set in `g`, and every candidate that is not, with why.
///
/// # Errors
/// A graph with a cycle, a constant graph output, a tensor written twice or read from
/// nowhere.
pub fn find_branch_sets(g: &Graph) -> Result<Finding, TopologyError> {
    let v = View::new(g)?;
    let mut finding = Finding::default();
    let mut taken = HashSet::new();
    for root in v.roots() {
        for outcome in v.candidates(root) {
            match outcome {
                Ok(set) => {
                    taken.extend(set.nodes.iter().copied());
                    finding.sets.push(set);
                }
                Err(r) => finding.rejected.push(r),
            }
        }
    }
    for (i, node) in g.nodes.iter().enumerate() {
        if node.is("BatchNormalization")
            && !taken.contains(&i)
            && let Some(outcome) = v.single(i, &taken)
        {
            match outcome {
                Ok(set) => {
                    taken.extend(set.nodes.iter().copied());
                    finding.sets.push(set);
                }
                Err(r) => finding.rejected.push(r),
            }
        }
    }
    finding.sets.sort_by_key(|s| s.nodes.first().copied());
    Ok(finding)
}

// ---------------------------------------------------------------------------------------
// The graph, indexed

/// What one node is to the finder.
enum Kind {
    /// A sum of data tensors, each with its sign.
    Join(Vec<(String, f64)>),
    /// A linear op on one data tensor.
    Step(Step),
    /// An `Identity` on a data tensor.
    Pass(String),
    /// Anything else: a branch stops here.
    Other,
}

/// A linear op on one data tensor, with what (if anything) keeps it from merging.
#[derive(Debug, Clone)]
struct Step {
    node: usize,
    /// `None` for an `Identity` node passed through.
    op: Option<GOp>,
    input: String,
    problem: Option<String>,
}

struct View<'g> {
    g: &'g Graph,
    producer: HashMap<&'g str, usize>,
    consumers: HashMap<&'g str, Vec<usize>>,
    outputs: HashSet<&'g str>,
}

impl<'g> View<'g> {
    fn new(g: &'g Graph) -> Result<View<'g>, TopologyError> {
        let mut producer: HashMap<&str, usize> = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in g.nodes.iter().enumerate() {
            if n.index != i {
                return Err(TopologyError::Index {
                    node: n.label(),
                    index: n.index,
                    position: i,
                });
            }
            for t in n.outputs.iter().filter(|t| !t.is_empty()) {
                if let Some(&first) = producer.get(t.as_str()) {
                    return Err(TopologyError::TwoProducers {
                        tensor: t.clone(),
                        first: g.nodes[first].label(),
                        second: n.label(),
                    });
                }
                producer.insert(t.as_str(), i);
            }
            for t in n.inputs.iter().filter(|t| !t.is_empty()) {
                let list = consumers.entry(t.as_str()).or_default();
                if !list.contains(&i) {
                    list.push(i);
                }
            }
        }
        let v = View {
            g,
            producer,
            consumers,
            outputs: g.outputs.iter().map(String::as_str).collect(),
        };
        v.check()?;
        Ok(v)
    }

    /// Unknown tensors, constant outputs and cycles.
    fn check(&self) -> Result<(), TopologyError> {
        let inputs: HashSet<&str> = self.g.inputs.iter().map(String::as_str).collect();
        let known = |t: &str| {
            inputs.contains(t) || self.g.constants.contains_key(t) || self.producer.contains_key(t)
        };
        for n in &self.g.nodes {
            if let Some(t) = n.inputs.iter().find(|t| !t.is_empty() && !known(t)) {
                return Err(TopologyError::UnknownTensor {
                    node: n.label(),
                    tensor: t.clone(),
                });
            }
        }
        for o in &self.g.outputs {
            if !self.producer.contains_key(o.as_str()) && self.g.constants.contains_key(o) {
                return Err(TopologyError::ConstantOutput { output: o.clone() });
            }
        }
        self.check_acyclic()
    }

    /// Kahn's algorithm over producer → consumer edges.
    fn check_acyclic(&self) -> Result<(), TopologyError> {
        let nodes = &self.g.nodes;
        let mut pending: Vec<usize> = nodes
            .iter()
            .map(|n| {
                let deps: BTreeSet<usize> = n
                    .inputs
                    .iter()
                    .filter_map(|t| self.producer.get(t.as_str()).copied())
                    .collect();
                deps.len()
            })
            .collect();
        let mut ready: Vec<usize> = (0..nodes.len()).filter(|&i| pending[i] == 0).collect();
        let mut done = 0;
        while let Some(i) = ready.pop() {
            done += 1;
            let next: BTreeSet<usize> = nodes[i]
                .outputs
                .iter()
                .flat_map(|t| self.consumers_of(t).iter().copied())
                .collect();
            for c in next {
                pending[c] -= 1;
                if pending[c] == 0 {
                    ready.push(c);
                }
            }
        }
        if done == nodes.len() {
            return Ok(());
        }
        let stuck = pending.iter().position(|&p| p > 0).unwrap_or(0);
        Err(TopologyError::Cycle {
            node: nodes[stuck].label(),
        })
    }

    fn node(&self, i: usize) -> &'g Node {
        &self.g.nodes[i]
    }

    fn constant(&self, t: &str) -> Option<&'g Constant> {
        self.g.constants.get(t)
    }

    fn is_const(&self, t: &str) -> bool {
        self.g.constants.contains_key(t)
    }

    fn consumers_of(&self, t: &str) -> &[usize] {
        self.consumers.get(t).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Read by exactly one node (which may read it twice) and not a graph output.
    fn single_use(&self, t: &str) -> bool {
        self.consumers_of(t).len() == 1 && !self.outputs.contains(t)
    }

    fn producer_kind(&self, t: &str) -> Option<(usize, Kind)> {
        let &i = self.producer.get(t)?;
        Some((i, self.kind(i)))
    }

    /// Joins whose sum is not part of a bigger sum.
    fn roots(&self) -> Vec<usize> {
        (0..self.g.nodes.len())
            .filter(|&i| matches!(self.kind(i), Kind::Join(_)) && !self.absorbed(i))
            .collect()
    }

    /// Whether join `i`'s output reaches another join through single-use per-channel ops.
    fn absorbed(&self, i: usize) -> bool {
        let Some(mut t) = self.node(i).outputs.first().map(String::as_str) else {
            return false;
        };
        loop {
            if !self.single_use(t) {
                return false;
            }
            let c = self.consumers_of(t)[0];
            match self.kind(c) {
                Kind::Join(_) => return true,
                Kind::Step(s) if s.op.as_ref().is_some_and(is_per_channel) && s.input == t => {}
                Kind::Pass(_) => {}
                _ => return false,
            }
            match self.node(c).outputs.first() {
                Some(o) => t = o,
                None => return false,
            }
        }
    }
}

fn is_per_channel(op: &GOp) -> bool {
    matches!(
        op,
        GOp::Bn { .. } | GOp::Mul { .. } | GOp::Add { .. } | GOp::Sub { .. } | GOp::Div { .. }
    )
}

fn is_source(op: &GOp) -> bool {
    matches!(
        op,
        GOp::Conv { .. } | GOp::Gemm { .. } | GOp::MatMul { .. } | GOp::AvgPool { .. }
    )
}

fn op_node(op: &GOp) -> Option<usize> {
    match op {
        GOp::Conv { node, .. }
        | GOp::Gemm { node, .. }
        | GOp::MatMul { node, .. }
        | GOp::Bn { node, .. }
        | GOp::AvgPool { node, .. }
        | GOp::Pad { node, .. }
        | GOp::BorderFill { node, .. }
        | GOp::Mul { node, .. }
        | GOp::Add { node, .. }
        | GOp::Sub { node, .. }
        | GOp::Div { node, .. } => Some(*node),
        GOp::Identity => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::graph::Attr;

    /// Builds small graphs: float constants and nodes named after their op and position.
    struct B {
        g: Graph,
    }

    fn ints(v: &[i64]) -> Attr {
        Attr::Ints(v.to_vec())
    }

    impl B {
        fn new() -> B {
            let mut g = Graph::default();
            g.inputs.push("x".into());
            B { g }
        }

        fn konst(&mut self, dims: &[i64]) -> String {
            let name = format!("c{}", self.g.constants.len());
            let numel = dims.iter().product::<i64>() as usize;
            let values = (numel <= 16).then(|| vec![0.5; numel]);
            self.g.constants.insert(
                name.clone(),
                Constant {
                    dims: dims.to_vec(),
                    data_type: 1,
                    values,
                },
            );
            name
        }

        fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
            let index = self.g.nodes.len();
            let out = format!("{op}{index}");
            self.g.nodes.push(Node {
                index,
                name: format!("{op}_{index}"),
                op_type: op.into(),
                domain: String::new(),
                inputs: inputs.iter().map(|s| s.to_string()).collect(),
                outputs: vec![out.clone()],
                attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            });
            out
        }

        /// A conv `[o, i/g, kh, kw]` with bias.
        fn conv(
            &mut self,
            x: &str,
            (o, i): (i64, i64),
            k: (i64, i64),
            s: i64,
            pads: [i64; 4],
            (g, d): (i64, i64),
        ) -> String {
            let w = self.konst(&[o, i / g, k.0, k.1]);
            let b = self.konst(&[o]);
            self.node(
                "Conv",
                &[x, &w, &b],
                vec![
                    ("kernel_shape", ints(&[k.0, k.1])),
                    ("strides", ints(&[s, s])),
                    ("pads", ints(&pads)),
                    ("group", Attr::Int(g)),
                    ("dilations", ints(&[d, d])),
                ],
            )
        }

        fn conv3(&mut self, x: &str, c: i64) -> String {
            self.conv(x, (c, c), (3, 3), 1, [1; 4], (1, 1))
        }

        fn conv1(&mut self, x: &str, c: i64) -> String {
            self.conv(x, (c, c), (1, 1), 1, [0; 4], (1, 1))
        }

        fn bn(&mut self, x: &str, c: i64) -> String {
            let p: Vec<String> = (0..4).map(|_| self.konst(&[c])).collect();
            self.node(
                "BatchNormalization",
                &[x, &p[0], &p[1], &p[2], &p[3]],
                vec![("epsilon", Attr::Float(1e-3))],
            )
        }

        fn bin(&mut self, op: &str, a: &str, b: &str) -> String {
            self.node(op, &[a, b], vec![])
        }

        fn finish(mut self, out: &str) -> Graph {
            self.g.outputs.push(out.into());
            self.g
        }
    }

    fn find(g: &Graph) -> Finding {
        find_branch_sets(g).expect("well formed")
    }

    fn one_rejection(g: &Graph, needle: &str) {
        let f = find(g);
        assert!(f.sets.iter().all(|s| s.branches.len() == 1), "{:?}", f.sets);
        assert_eq!(f.rejected.len(), 1, "{:?}", f.rejected);
        assert!(
            f.rejected[0].reason.contains(needle),
            "{}",
            f.rejected[0].reason
        );
    }

    /// RepVGG: Conv 3×3 + Conv 1×1 + BN(x), then a Relu.
    fn repvgg(b: &mut B) -> String {
        let a = b.conv3("x", 8);
        let c = b.conv1("x", 8);
        let s = b.bin("Add", &a, &c);
        let i = b.bn("x", 8);
        let s = b.bin("Add", &s, &i);
        b.node("Relu", &[&s], vec![])
    }

    #[test]
    fn conv_conv_identity_bn_merges() {
        let mut b = B::new();
        let y = repvgg(&mut b);
        let f = find(&b.finish(&y));
        assert_eq!(f.sets.len(), 1);
        let s = &f.sets[0];
        assert_eq!(
            (s.branches.len(), s.kernel, s.pads, s.nodes.len()),
            (3, (3, 3), [1; 4], 5)
        );
        assert!(
            matches!(s.branches[2].ops.as_slice(), [GOp::Identity, GOp::Bn { eps, .. }] if (*eps - 1e-3).abs() < 1e-9)
        );
        assert_eq!(s.input, "x");
        assert!(f.rejected.is_empty());
    }

    /// keep_io_types: each branch reads its own `Cast` of `x`, to f16 (10) or to `to`.
    fn cast_branches(b: &mut B, to: i64) -> String {
        let c1 = b.node("Cast", &["x"], vec![("to", Attr::Int(10))]);
        let a = b.conv3(&c1, 4);
        let c2 = b.node("Cast", &["x"], vec![("to", Attr::Int(to))]);
        let c = b.conv1(&c2, 4);
        b.bin("Add", &a, &c)
    }

    #[test]
    fn equal_casts_of_one_tensor_are_one_input() {
        let mut b = B::new();
        let y = cast_branches(&mut b, 10);
        let f = find(&b.finish(&y));
        assert_eq!(f.sets.len(), 1, "{f:?}");
        let s = &f.sets[0];
        // The first Cast stays and feeds the merged conv; the second goes with the set.
        assert_eq!(
            (s.input.as_str(), s.nodes.as_slice()),
            ("Cast0", &[1, 2, 3, 4][..])
        );
    }

    #[test]
    fn casts_to_different_types_are_different_inputs() {
        let mut b = B::new();
        let y = cast_branches(&mut b, 1);
        assert!(find(&b.finish(&y)).sets.is_empty());
    }

    #[test]
    fn a_cast_read_outside_the_set_stays() {
        let mut b = B::new();
        let y = cast_branches(&mut b, 10);
        let r = b.node("Relu", &["Cast2"], vec![]);
        let mut g = b.finish(&y);
        g.outputs.push(r);
        let s = &find(&g).sets[0];
        assert_eq!(
            (s.input.as_str(), s.nodes.as_slice()),
            ("Cast0", &[1, 3, 4][..])
        );
    }

    #[test]
    fn sum_with_three_inputs_joins() {
        let mut b = B::new();
        let (p, q, r) = (b.conv3("x", 4), b.conv1("x", 4), b.bn("x", 4));
        let s = b.node("Sum", &[&p, &q, &r], vec![]);
        let f = find(&b.finish(&s));
        assert_eq!(f.sets[0].branches.len(), 3);
    }

    #[test]
    fn sub_is_a_negative_branch_and_a_scale_on_a_partial_sum_distributes() {
        // FastViT RepMixer: x + γ·((conv(x) + BN(x)) − BN(x))
        let mut b = B::new();
        let (c, m) = (b.conv3("x", 4), b.bn("x", 4));
        let mixer = b.bin("Add", &c, &m);
        let n = b.bn("x", 4);
        let d = b.bin("Sub", &mixer, &n);
        let g = b.konst(&[4, 1, 1]);
        let scaled = b.bin("Mul", &d, &g);
        let y = b.bin("Add", "x", &scaled);
        let f = find(&b.finish(&y));
        let s = &f.sets[0];
        assert_eq!(
            s.branches.iter().map(|b| b.coef).collect::<Vec<_>>(),
            [1.0, 1.0, 1.0, -1.0]
        );
        assert!(
            s.branches[1..]
                .iter()
                .all(|b| matches!(b.ops.last(), Some(GOp::Mul { .. })))
        );
        assert_eq!(s.nodes.len(), 7);
    }

    #[test]
    fn dilated_branch_counts_with_its_effective_size() {
        let mut b = B::new();
        let big = b.conv("x", (4, 4), (5, 5), 1, [2; 4], (4, 1));
        let dil = b.conv("x", (4, 4), (3, 3), 1, [2; 4], (4, 2));
        let y = b.bin("Add", &big, &dil);
        let f = find(&b.finish(&y));
        assert_eq!((f.sets[0].kernel, f.sets[0].group), ((5, 5), 4));
    }

    #[test]
    fn asymmetric_kx1_and_1xk_centre_on_the_square_kernel() {
        let mut b = B::new();
        let sq = b.conv3("x", 4);
        let ver = b.conv("x", (4, 4), (3, 1), 1, [1, 0, 1, 0], (1, 1));
        let hor = b.conv("x", (4, 4), (1, 3), 1, [0, 1, 0, 1], (1, 1));
        let s = b.bin("Add", &sq, &ver);
        let y = b.bin("Add", &s, &hor);
        assert_eq!(find(&b.finish(&y)).sets[0].branches.len(), 3);
    }

    #[test]
    fn average_pool_counting_its_padding_is_a_branch() {
        let mut b = B::new();
        let c = b.conv("x", (4, 4), (3, 3), 1, [1; 4], (4, 1));
        let a = b.node(
            "AveragePool",
            &["x"],
            vec![
                ("kernel_shape", ints(&[3, 3])),
                ("pads", ints(&[1; 4])),
                ("count_include_pad", Attr::Int(1)),
            ],
        );
        let a = b.bn(&a, 4);
        let y = b.bin("Add", &c, &a);
        assert_eq!(find(&b.finish(&y)).sets[0].branches.len(), 2);
    }

    #[test]
    fn average_pool_leaving_padding_out_of_the_mean_is_rejected() {
        let mut b = B::new();
        let c = b.conv("x", (4, 4), (3, 3), 1, [1; 4], (4, 1));
        let a = b.node(
            "AveragePool",
            &["x"],
            vec![("kernel_shape", ints(&[3, 3])), ("pads", ints(&[1; 4]))],
        );
        let y = b.bin("Add", &c, &a);
        one_rejection(&b.finish(&y), "count_include_pad=0");
    }

    /// DBB's 1×1 → k×k: the 1×1 without bias, a zero Pad, the k×k unpadded.
    fn sequence(b: &mut B, bias_bn: bool) -> String {
        let w = b.konst(&[4, 4, 1, 1]);
        let one = b.node("Conv", &["x", &w], vec![("kernel_shape", ints(&[1, 1]))]);
        let one = if bias_bn { b.bn(&one, 4) } else { one };
        let pads = b.konst(&[8]);
        b.g.constants.get_mut(&pads).expect("just made").values =
            Some(vec![0., 0., 1., 1., 0., 0., 1., 1.]);
        b.g.constants.get_mut(&pads).expect("just made").data_type = 7;
        let p = b.bin("Pad", &one, &pads);
        let k = b.conv(&p, (4, 4), (3, 3), 1, [0; 4], (1, 1));
        let origin = b.conv3("x", 4);
        b.bin("Add", &origin, &k)
    }

    #[test]
    fn sequence_1x1_pad_kxk_merges_when_the_border_is_zero() {
        let mut b = B::new();
        let y = sequence(&mut b, false);
        let f = find(&b.finish(&y));
        let s = &f.sets[0];
        assert_eq!((s.branches.len(), s.pads), (2, [1; 4]));
        assert!(matches!(
            s.branches[1].ops.as_slice(),
            [GOp::Conv { .. }, GOp::Pad { .. }, GOp::Conv { .. }]
        ));
    }

    #[test]
    fn sequence_padded_after_a_bn_is_rejected() {
        let mut b = B::new();
        let y = sequence(&mut b, true);
        one_rejection(&b.finish(&y), "not what");
    }

    /// DBB as dynamo writes it: conv3 + conv1, and a 1×1 conv whose map is padded, its
    /// border filled by `ScatterND`s of constants holding `fill`, then averaged.
    fn border_filled(b: &mut B, fill: f64) -> String {
        let (c, d) = (b.conv3("x", 4), b.conv1("x", 4));
        let s = b.bin("Add", &c, &d);
        let one = b.conv1("x", 4);
        let pads = b.konst(&[8]);
        b.g.constants.get_mut(&pads).expect("just made").values =
            Some(vec![0., 0., 1., 1., 0., 0., 1., 1.]);
        let p = b.bin("Pad", &one, &pads);
        let t = b.node("Transpose", &[&p], vec![("perm", ints(&[2, 1, 0, 3]))]);
        let idx = b.konst(&[1, 1]);
        let upd = b.konst(&[1, 4, 1, 4]);
        b.g.constants.get_mut(&upd).expect("just made").values = Some(vec![fill; 16]);
        let f = b.node("ScatterND", &[&t, &idx, &upd], vec![]);
        let back = b.node("Transpose", &[&f], vec![("perm", ints(&[2, 1, 0, 3]))]);
        let a = b.node(
            "AveragePool",
            &[&back],
            vec![
                ("kernel_shape", ints(&[3, 3])),
                ("count_include_pad", Attr::Int(1)),
            ],
        );
        b.bin("Add", &s, &a)
    }

    #[test]
    fn border_fill_is_left_with_why_and_the_plain_branches_merge() {
        let mut b = B::new();
        let y = border_filled(&mut b, 0.25);
        let f = find(&b.finish(&y));
        assert_eq!((f.sets.len(), f.sets[0].branches.len()), (1, 2), "{f:?}");
        assert_eq!(f.rejected.len(), 1, "{:?}", f.rejected);
        let why = &f.rejected[0].reason;
        assert!(
            why.contains("BNAndPad") && why.contains("differ by up to 2.5e-1"),
            "{why}"
        );
        // The fill's nodes are named with the set it would be part of.
        assert!(
            f.rejected[0]
                .nodes
                .iter()
                .any(|n| n.starts_with("ScatterND"))
        );
    }

    #[test]
    fn border_fill_equal_to_the_bias_is_still_left() {
        let mut b = B::new();
        let y = border_filled(&mut b, 0.5);
        let f = find(&b.finish(&y));
        assert!(
            f.rejected[0].reason.contains("not merged from graphs"),
            "{f:?}"
        );
    }

    #[test]
    fn bn_after_the_sum_is_a_post_op() {
        let mut b = B::new();
        let (c, d) = (b.conv3("x", 4), b.conv1("x", 4));
        let s = b.bin("Add", &c, &d);
        let s = b.bin("Add", &s, "x");
        let y = b.bn(&s, 4);
        let f = find(&b.finish(&y));
        assert!(matches!(f.sets[0].post.as_slice(), [GOp::Bn { .. }]));
        assert_eq!(f.sets[0].output, y);
    }

    #[test]
    fn single_unfolded_conv_bn_is_a_set() {
        let mut b = B::new();
        let c = b.conv3("x", 4);
        let y = b.bn(&c, 4);
        let f = find(&b.finish(&y));
        assert_eq!(
            (
                f.sets.len(),
                f.sets[0].branches.len(),
                f.sets[0].nodes.len()
            ),
            (1, 1, 2)
        );
    }

    #[test]
    fn bn_before_gemm_heads_averaged_is_one_linear_set() {
        let mut b = B::new();
        let head = |b: &mut B| {
            let n = b.bn("x", 16);
            let w = b.konst(&[10, 16]);
            let c = b.konst(&[10]);
            b.node("Gemm", &[&n, &w, &c], vec![("transB", Attr::Int(1))])
        };
        let (h1, h2) = (head(&mut b), head(&mut b));
        let s = b.bin("Add", &h1, &h2);
        let two = b.konst(&[]);
        let y = b.bin("Div", &s, &two);
        let f = find(&b.finish(&y));
        let s = &f.sets[0];
        assert!(s.linear);
        assert_eq!((s.in_channels, s.out_channels, s.nodes.len()), (16, 10, 6));
    }

    #[test]
    fn different_strides_are_rejected() {
        let mut b = B::new();
        let a = b.conv("x", (4, 4), (3, 3), 2, [1; 4], (1, 1));
        let c = b.conv1("x", 4);
        let y = b.bin("Add", &a, &c);
        one_rejection(&b.finish(&y), "has stride 1×1, the others 2×2");
    }

    #[test]
    fn pads_that_do_not_centre_are_rejected() {
        let mut b = B::new();
        let a = b.conv3("x", 4);
        let c = b.conv("x", (4, 4), (1, 1), 1, [1, 1, 0, 0], (1, 1));
        let y = b.bin("Add", &a, &c);
        one_rejection(&b.finish(&y), "does not centre");
    }

    #[test]
    fn different_groups_are_rejected() {
        let mut b = B::new();
        let a = b.conv3("x", 4);
        let c = b.conv("x", (4, 4), (1, 1), 1, [0; 4], (4, 1));
        let y = b.bin("Add", &a, &c);
        one_rejection(&b.finish(&y), "groups");
    }

    #[test]
    fn channel_counts_that_disagree_are_rejected() {
        let mut b = B::new();
        let a = b.conv("x", (8, 4), (3, 3), 1, [1; 4], (1, 1));
        let y = b.bin("Add", &a, "x");
        one_rejection(&b.finish(&y), "as many input as output channels");
    }

    #[test]
    fn intermediate_read_elsewhere_is_rejected() {
        let mut b = B::new();
        let a = b.conv3("x", 4);
        let c = b.conv1("x", 4);
        let y = b.bin("Add", &a, &c);
        let z = b.node("Relu", &[&a], vec![]);
        let mut g = b.finish(&y);
        g.outputs.push(z);
        one_rejection(&g, "outside the block");
    }

    #[test]
    fn intermediate_graph_output_is_rejected() {
        let mut b = B::new();
        let a = b.conv3("x", 4);
        let c = b.conv1("x", 4);
        let y = b.bin("Add", &a, &c);
        let mut g = b.finish(&y);
        g.outputs.push(a);
        one_rejection(&g, "graph output");
    }

    #[test]
    fn weight_computed_in_the_graph_is_rejected() {
        let mut b = B::new();
        let a = b.conv3("x", 4);
        let w = b.konst(&[4, 4, 1, 1]);
        let w = b.node("Relu", &[&w], vec![]);
        let c = b.node("Conv", &["x", &w], vec![]);
        let y = b.bin("Add", &a, &c);
        one_rejection(&b.finish(&y), "not a constant");
    }

    #[test]
    fn per_channel_constant_over_the_width_is_rejected() {
        let mut b = B::new();
        let a = b.conv3("x", 4);
        let g = b.konst(&[4]);
        let a = b.bin("Mul", &a, &g);
        let y = b.bin("Add", &a, "x");
        one_rejection(&b.finish(&y), "broadcasts over the width");
    }

    #[test]
    fn residual_over_a_nonlinear_branch_is_no_candidate() {
        let mut b = B::new();
        let a = b.conv3("x", 4);
        let r = b.node("Relu", &[&a], vec![]);
        let c = b.conv3(&r, 4);
        let y = b.bin("Add", &c, "x");
        let f = find(&b.finish(&y));
        assert!(f.sets.is_empty() && f.rejected.is_empty(), "{f:?}");
    }

    #[test]
    fn cycle_is_an_error() {
        let mut b = B::new();
        let a = b.bin("Add", "x", "Relu1");
        let r = b.node("Relu", &[&a], vec![]);
        assert_eq!(r, "Relu1");
        let g = b.finish(&r);
        assert!(matches!(
            find_branch_sets(&g),
            Err(TopologyError::Cycle { .. })
        ));
    }

    #[test]
    fn constant_graph_output_is_an_error() {
        let mut b = B::new();
        let k = b.konst(&[4]);
        let g = b.finish(&k);
        assert_eq!(
            find_branch_sets(&g),
            Err(TopologyError::ConstantOutput { output: k })
        );
    }

    #[test]
    fn unknown_tensor_and_two_writers_are_errors() {
        let mut b = B::new();
        let _ = b.bin("Add", "x", "nowhere");
        let g = b.finish("x");
        assert!(matches!(
            find_branch_sets(&g),
            Err(TopologyError::UnknownTensor { .. })
        ));
        let mut b = B::new();
        let r = b.node("Relu", &["x"], vec![]);
        let _ = b.node("Relu", &["x"], vec![]);
        b.g.nodes[1].outputs = vec![r.clone()];
        assert!(matches!(
            find_branch_sets(&b.finish(&r)),
            Err(TopologyError::TwoProducers { .. })
        ));
    }
}
