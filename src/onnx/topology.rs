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

use super::graph::{Constant, Graph, Node};

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
        if node.is("BatchNormalization") && !taken.contains(&i) {
            if let Some(outcome) = v.single(i, &taken) {
                match outcome {
                    Ok(set) => {
                        taken.extend(set.nodes.iter().copied());
                        finding.sets.push(set);
                    }
                    Err(r) => finding.rejected.push(r),
                }
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
        | GOp::Mul { node, .. }
        | GOp::Add { node, .. }
        | GOp::Sub { node, .. }
        | GOp::Div { node, .. } => Some(*node),
        GOp::Identity => None,
    }
}

// ---------------------------------------------------------------------------------------
// What each node is

/// ONNX float types: FLOAT, FLOAT16, DOUBLE, BFLOAT16.
const FLOAT_TYPES: [i32; 4] = [1, 10, 11, 16];

impl View<'_> {
    fn kind(&self, i: usize) -> Kind {
        let n = self.node(i);
        let extra_outputs = n.outputs.iter().skip(1).any(|o| !o.is_empty());
        if !(n.domain.is_empty() || n.domain == "ai.onnx") || n.outputs.is_empty() || extra_outputs
        {
            return Kind::Other;
        }
        match n.op_type.as_str() {
            "Add" | "Sub" | "Mul" | "Div" => self.binary(n),
            "Sum" if n.inputs.len() >= 2 && n.inputs.iter().all(|t| !self.is_const(t)) => {
                Kind::Join(n.inputs.iter().map(|t| (t.clone(), 1.0)).collect())
            }
            "Identity" => match n.inputs.first() {
                Some(t) if !self.is_const(t) => Kind::Pass(t.clone()),
                _ => Kind::Other,
            },
            "BatchNormalization" => self.bn(n),
            "Conv" => self.conv(n),
            "AveragePool" => self.avg_pool(n),
            "Pad" => self.pad(n),
            "Gemm" => self.gemm(n),
            "MatMul" => self.matmul(n),
            _ => Kind::Other,
        }
    }

    fn float_const(&self, t: &str) -> bool {
        self.constant(t)
            .is_some_and(|c| FLOAT_TYPES.contains(&c.data_type))
    }

    fn binary(&self, n: &Node) -> Kind {
        let [a, b] = n.inputs.as_slice() else {
            return Kind::Other;
        };
        let (ca, cb) = (self.is_const(a), self.is_const(b));
        let step = |data: &str, tensor: &str, make: fn(usize, String) -> GOp| {
            if !self.float_const(tensor) {
                return Kind::Other;
            }
            Kind::Step(Step {
                node: n.index,
                op: Some(make(n.index, tensor.to_string())),
                input: data.to_string(),
                problem: None,
            })
        };
        match (n.op_type.as_str(), ca, cb) {
            ("Add", false, false) => Kind::Join(vec![(a.clone(), 1.0), (b.clone(), 1.0)]),
            ("Sub", false, false) => Kind::Join(vec![(a.clone(), 1.0), (b.clone(), -1.0)]),
            ("Add", false, true) => step(a, b, |node, tensor| GOp::Add { node, tensor }),
            ("Add", true, false) => step(b, a, |node, tensor| GOp::Add { node, tensor }),
            ("Sub", false, true) => step(a, b, |node, tensor| GOp::Sub { node, tensor }),
            ("Mul", false, true) => step(a, b, |node, tensor| GOp::Mul { node, tensor }),
            ("Mul", true, false) => step(b, a, |node, tensor| GOp::Mul { node, tensor }),
            ("Div", false, true) => step(a, b, |node, tensor| GOp::Div { node, tensor }),
            _ => Kind::Other,
        }
    }

    fn bn(&self, n: &Node) -> Kind {
        let [x, scale, bias, mean, var] = n.inputs.as_slice() else {
            return Kind::Other;
        };
        if self.is_const(x) || n.int("training_mode").unwrap_or(0) != 0 {
            return Kind::Other;
        }
        let params = [scale, bias, mean, var];
        let problem = params.iter().find(|t| !self.float_const(t)).map(|t| {
            format!(
                "BatchNormalization `{}` reads `{t}`, which is not a constant",
                n.label()
            )
        });
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::Bn {
                node: n.index,
                scale: scale.clone(),
                bias: bias.clone(),
                mean: mean.clone(),
                var: var.clone(),
                eps: f64::from(n.float("epsilon").unwrap_or(1e-5)),
            }),
            input: x.clone(),
            problem,
        })
    }

    fn conv(&self, n: &Node) -> Kind {
        let (Some(x), Some(w)) = (n.inputs.first(), n.inputs.get(1)) else {
            return Kind::Other;
        };
        if self.is_const(x) {
            return Kind::Other;
        }
        let bias = n.inputs.get(2).filter(|b| !b.is_empty()).cloned();
        let mut problem = None;
        if !self.float_const(w) {
            problem = Some(format!(
                "the weight `{w}` of Conv `{}` is computed in the graph, not a constant",
                n.label()
            ));
        } else if bias.as_ref().is_some_and(|b| !self.float_const(b)) {
            problem = Some(format!(
                "the bias of Conv `{}` is computed in the graph, not a constant",
                n.label()
            ));
        }
        let dims = self.constant(w).map(|c| c.dims.clone()).unwrap_or_default();
        let kernel = n
            .ints("kernel_shape")
            .map(<[i64]>::to_vec)
            .unwrap_or_else(|| dims.get(2..).map(<[i64]>::to_vec).unwrap_or_default());
        let geo = window(n, &kernel).and_then(|g| {
            if dims.len() == 4 && dims[2..] != kernel[..] {
                Err(format!(
                    "Conv `{}` says kernel_shape {kernel:?} but its weight `{w}` is {dims:?}",
                    n.label()
                ))
            } else {
                Ok(g)
            }
        });
        let group = positive(n.int("group").unwrap_or(1));
        let (geo, problem) = match (geo, group, problem) {
            (Ok(g), Some(_), None) => (g, None),
            (Ok(g), None, None) => (g, Some(format!("Conv `{}` has group < 1", n.label()))),
            (Ok(g), _, p) => (g, p),
            (Err(e), _, p) => (Window::default(), p.or(Some(e))),
        };
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::Conv {
                node: n.index,
                weight: w.clone(),
                bias,
                kernel: geo.kernel,
                stride: geo.stride,
                dilation: geo.dilation,
                pads: geo.pads,
                group: group.unwrap_or(1),
            }),
            input: x.clone(),
            problem,
        })
    }

    fn avg_pool(&self, n: &Node) -> Kind {
        let Some(x) = n.inputs.first() else {
            return Kind::Other;
        };
        let kernel = n
            .ints("kernel_shape")
            .map(<[i64]>::to_vec)
            .unwrap_or_default();
        let (geo, mut problem) = match window(n, &kernel) {
            Ok(g) => (g, None),
            Err(e) => (Window::default(), Some(e)),
        };
        if n.int("ceil_mode").unwrap_or(0) != 0 {
            problem = Some(format!(
                "AveragePool `{}` rounds its output size up (ceil_mode=1); no convolution does",
                n.label()
            ));
        } else if geo.dilation != (1, 1) {
            problem = Some(format!("AveragePool `{}` is dilated", n.label()));
        }
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::AvgPool {
                node: n.index,
                kernel: geo.kernel,
                stride: geo.stride,
                pads: geo.pads,
                count_include_pad: n.int("count_include_pad").unwrap_or(0) != 0,
            }),
            input: x.clone(),
            problem,
        })
    }

    fn pad(&self, n: &Node) -> Kind {
        let Some(x) = n.inputs.first().filter(|x| !self.is_const(x)) else {
            return Kind::Other;
        };
        let label = n.label();
        let mode = n.string("mode").unwrap_or("constant");
        let from_inputs = n.inputs.get(1).is_some_and(|p| !p.is_empty());
        let values = |t: Option<&String>| {
            t.filter(|t| !t.is_empty())
                .map(|t| self.constant(t).and_then(|c| c.values.clone()))
        };
        let (pads, value) = if from_inputs {
            let pads = values(n.inputs.get(1))
                .flatten()
                .map(|v| v.iter().map(|&p| p as i64).collect::<Vec<_>>());
            let value = match values(n.inputs.get(2)) {
                None => Some(0.0),
                Some(v) => v.and_then(|v| v.first().copied()),
            };
            (pads, value)
        } else {
            let pads = n.ints("pads").map(<[i64]>::to_vec);
            (pads, Some(f64::from(n.float("value").unwrap_or(0.0))))
        };
        let problem = if mode != "constant" {
            Some(format!("Pad `{label}` is in {mode} mode, not constant"))
        } else if n.inputs.get(3).is_some_and(|a| !a.is_empty()) {
            Some(format!("Pad `{label}` pads chosen axes (an `axes` input)"))
        } else if pads.is_none() || value.is_none() {
            Some(format!(
                "Pad `{label}`'s pads or value are computed in the graph"
            ))
        } else {
            None
        };
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::Pad {
                node: n.index,
                pads: pads.unwrap_or_default(),
                value: value.unwrap_or(0.0),
            }),
            input: x.clone(),
            problem,
        })
    }

    fn gemm(&self, n: &Node) -> Kind {
        let (Some(a), Some(b)) = (n.inputs.first(), n.inputs.get(1)) else {
            return Kind::Other;
        };
        if self.is_const(a) || !self.float_const(b) {
            return Kind::Other;
        }
        let bias = n.inputs.get(2).filter(|c| !c.is_empty()).cloned();
        let problem = if n.int("transA").unwrap_or(0) != 0 {
            Some(format!(
                "Gemm `{}` transposes its input (transA=1)",
                n.label()
            ))
        } else if bias.as_ref().is_some_and(|c| !self.float_const(c)) {
            Some(format!(
                "the bias of Gemm `{}` is computed in the graph",
                n.label()
            ))
        } else {
            None
        };
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::Gemm {
                node: n.index,
                weight: b.clone(),
                bias,
                trans_b: n.int("transB").unwrap_or(0) != 0,
                alpha: f64::from(n.float("alpha").unwrap_or(1.0)),
                beta: f64::from(n.float("beta").unwrap_or(1.0)),
            }),
            input: a.clone(),
            problem,
        })
    }

    fn matmul(&self, n: &Node) -> Kind {
        let [a, b] = n.inputs.as_slice() else {
            return Kind::Other;
        };
        if self.is_const(a) || !self.float_const(b) {
            return Kind::Other;
        }
        let rank = self.constant(b).map_or(0, |c| c.dims.len());
        let problem = (rank != 2).then(|| {
            format!(
                "MatMul `{}` multiplies by `{b}`, a {rank}-D constant; only a 2-D weight is a Linear",
                n.label()
            )
        });
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::MatMul {
                node: n.index,
                weight: b.clone(),
            }),
            input: a.clone(),
            problem,
        })
    }
}

/// A 2-D window's geometry, auto_pad resolved.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    kernel: (usize, usize),
    stride: (usize, usize),
    dilation: (usize, usize),
    pads: [usize; 4],
}

fn positive(v: i64) -> Option<usize> {
    usize::try_from(v).ok().filter(|&v| v > 0)
}

fn pair(v: Option<&[i64]>, default: usize) -> Option<(usize, usize)> {
    match v {
        None => Some((default, default)),
        Some([h, w]) => Some((positive(*h)?, positive(*w)?)),
        Some(_) => None,
    }
}

/// Kernel, strides, dilations and pads of a Conv or AveragePool node.
fn window(n: &Node, kernel: &[i64]) -> Result<Window, String> {
    let label = n.label();
    let bad = |what: &str| format!("{} `{label}` has {what}; only 2-D windows merge", n.op_type);
    let kernel = pair(Some(kernel), 1).ok_or_else(|| bad(&format!("kernel {kernel:?}")))?;
    let stride =
        pair(n.ints("strides"), 1).ok_or_else(|| bad("strides that are not 2 positive values"))?;
    let dilation = pair(n.ints("dilations"), 1)
        .ok_or_else(|| bad("dilations that are not 2 positive values"))?;
    let eff = (
        (kernel.0 - 1) * dilation.0 + 1,
        (kernel.1 - 1) * dilation.1 + 1,
    );
    let pads = match n.string("auto_pad").unwrap_or("NOTSET") {
        "NOTSET" | "" => match n.ints("pads") {
            None => [0; 4],
            Some(p) => {
                let p: Option<Vec<usize>> = p.iter().map(|&v| usize::try_from(v).ok()).collect();
                match p.as_deref() {
                    Some(&[a, b, c, d]) => [a, b, c, d],
                    _ => return Err(bad("pads that are not 4 values ≥ 0")),
                }
            }
        },
        "VALID" => [0; 4],
        same @ ("SAME_UPPER" | "SAME_LOWER") if stride == (1, 1) => {
            let (th, tw) = (eff.0 - 1, eff.1 - 1);
            let (hs, ws) = if same == "SAME_UPPER" {
                (th / 2, tw / 2)
            } else {
                (th - th / 2, tw - tw / 2)
            };
            [hs, ws, th - hs, tw - ws]
        }
        other => {
            return Err(format!(
                "{} `{label}` has auto_pad {other} with stride {}×{}: its pads depend on the input size",
                n.op_type, stride.0, stride.1
            ));
        }
    };
    Ok(Window {
        kernel,
        stride,
        dilation,
        pads,
    })
}

// ---------------------------------------------------------------------------------------
// From a sum down to its branches

/// A branch as found, before the set's input is settled.
#[derive(Debug, Clone)]
struct Raw {
    coef: f64,
    /// Linear ops below the leaf, graph order (the deepest first), ending at the leaf.
    lower: Vec<Step>,
    /// Per-channel ops between the leaf and the sum (on partial sums), graph order.
    upper: Vec<Step>,
    /// The tensor the sum (or a partial sum) reads.
    leaf: String,
}

impl Raw {
    /// The tensor the branch reads when cut at `j` (it keeps `lower[j..]`).
    fn input_at(&self, j: usize) -> &str {
        self.lower
            .get(j)
            .map_or(self.leaf.as_str(), |s| s.input.as_str())
    }

    /// The position of the shallowest cut at which the branch reads `t`.
    fn cut_for(&self, t: &str) -> Option<usize> {
        (0..=self.lower.len())
            .rev()
            .find(|&j| self.input_at(j) == t)
    }
}

/// A sum and its branches.
#[derive(Debug, Default)]
struct Tree {
    /// The sum nodes, the root first.
    joins: Vec<usize>,
    /// The sums directly under the root (through per-channel ops only).
    children: Vec<usize>,
    raws: Vec<Raw>,
}

/// Deepest nesting of sums followed, and longest chain of ops below a leaf.
const MAX_DEPTH: usize = 256;
const MAX_CHAIN: usize = 12;

impl View<'_> {
    fn tree(&self, root: usize) -> Tree {
        let mut tree = Tree::default();
        if let Kind::Join(inputs) = self.kind(root) {
            tree.joins.push(root);
            for (t, c) in inputs {
                self.expand(&t, c, &[], 0, &mut tree);
            }
        }
        tree
    }

    fn expand(&self, t: &str, coef: f64, upper: &[Step], depth: usize, tree: &mut Tree) {
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
    fn lower_chain(&self, t: &str) -> Vec<Step> {
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
    fn common_input(raws: &[Raw]) -> Option<(String, Vec<usize>)> {
        let first = raws.first()?;
        (0..=first.lower.len()).rev().find_map(|j| {
            let t = first.input_at(j);
            let cuts: Option<Vec<usize>> = raws.iter().map(|r| r.cut_for(t)).collect();
            cuts.map(|c| (t.to_string(), c))
        })
    }

    /// The sets (or rejections) a sum rooted at `root` gives.
    fn candidates(&self, root: usize) -> Vec<Result<BranchSet, Rejected>> {
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

    fn labels(&self, nodes: &[usize]) -> Vec<String> {
        nodes.iter().map(|&i| self.node(i).label()).collect()
    }

    /// A single unfolded pair around BatchNormalization `bn`: `Conv`/`Gemm` → BN, or BN →
    /// `Gemm`/`MatMul`/unpadded `Conv`.
    fn single(&self, bn: usize, taken: &HashSet<usize>) -> Option<Result<BranchSet, Rejected>> {
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
        if let Some((_, Kind::Step(src))) = self.producer_kind(&bn_step.input) {
            if source_ok(&src) && self.single_use(&bn_step.input) {
                let input = src.input.clone();
                let out = self.node(bn).outputs.first().cloned().unwrap_or_default();
                return Some(self.validate(&[], &input, &[(1.0, vec![src, bn_step])], &out));
            }
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
// Whether a candidate merges exactly

/// One branch's geometry.
#[derive(Debug, Clone)]
struct Geo {
    /// How messages name the branch.
    label: String,
    /// Effective kernel (dilation included).
    kernel: (usize, usize),
    stride: (usize, usize),
    pads: [usize; 4],
    /// (input, output) channels, when a conv or Gemm says.
    io: Option<(usize, usize)>,
    group: Option<usize>,
    /// `Some(true)` for Gemm/MatMul, `Some(false)` for Conv/AveragePool.
    linear: Option<bool>,
}

impl Geo {
    fn identity() -> Geo {
        Geo {
            label: "the identity branch".into(),
            kernel: (1, 1),
            stride: (1, 1),
            pads: [0; 4],
            io: None,
            group: None,
            linear: None,
        }
    }
}

/// The merged node's shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    kernel: (usize, usize),
    stride: (usize, usize),
    pads: [usize; 4],
    c_in: usize,
    c_out: usize,
    group: usize,
    linear: bool,
}

fn eff(kernel: (usize, usize), dilation: (usize, usize)) -> (usize, usize) {
    (
        (kernel.0 - 1) * dilation.0 + 1,
        (kernel.1 - 1) * dilation.1 + 1,
    )
}

impl View<'_> {
    fn validate(
        &self,
        joins: &[usize],
        input: &str,
        branches: &[(f64, Vec<Step>)],
        sum_out: &str,
    ) -> Result<BranchSet, Rejected> {
        let mut nodes: BTreeSet<usize> = joins.iter().copied().collect();
        for (_, b) in branches {
            nodes.extend(b.iter().map(|s| s.node));
        }
        let reject = |nodes: &BTreeSet<usize>, reason: String| Rejected {
            nodes: self.labels(&nodes.iter().copied().collect::<Vec<_>>()),
            reason,
        };
        let steps = branches.iter().flat_map(|(_, b)| b);
        if let Some(p) = steps.clone().find_map(|s| s.problem.clone()) {
            return Err(reject(&nodes, p));
        }
        let geos = branches
            .iter()
            .map(|(_, b)| self.geometry(b))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| reject(&nodes, e))?;
        let shape = block_shape(&geos).map_err(|e| reject(&nodes, e))?;
        let has_matmul = steps
            .clone()
            .any(|s| matches!(s.op, Some(GOp::MatMul { .. })));
        for (_, b) in branches {
            self.check_channels(b, &shape, has_matmul)
                .map_err(|e| reject(&nodes, e))?;
        }
        let (post, output) = self.post(sum_out, &shape, has_matmul);
        nodes.extend(post.iter().map(|s| s.node));
        self.check_uses(&nodes, &output)
            .map_err(|e| reject(&nodes, e))?;
        Ok(BranchSet {
            input: input.to_string(),
            output,
            nodes: nodes.into_iter().collect(),
            branches: branches
                .iter()
                .map(|(coef, b)| GBranch {
                    coef: *coef,
                    ops: branch_ops(b),
                })
                .collect(),
            post: post.into_iter().filter_map(|s| s.op).collect(),
            kernel: shape.kernel,
            stride: shape.stride,
            pads: shape.pads,
            group: shape.group,
            in_channels: shape.c_in,
            out_channels: shape.c_out,
            linear: shape.linear,
        })
    }

    /// Per-channel ops after the sum, as long as they fit; and the set's output.
    fn post(&self, sum_out: &str, shape: &Shape, has_matmul: bool) -> (Vec<Step>, String) {
        let mut post = Vec::new();
        let mut t = sum_out.to_string();
        while self.single_use(&t) {
            let c = self.consumers_of(&t)[0];
            let step = match self.kind(c) {
                Kind::Step(s) if s.input == t && s.problem.is_none() => s,
                Kind::Pass(_) => Step {
                    node: c,
                    op: None,
                    input: t.clone(),
                    problem: None,
                },
                _ => break,
            };
            let fits = match &step.op {
                None => true,
                Some(GOp::Bn { .. }) if has_matmul => false,
                Some(op) => {
                    is_per_channel(op)
                        && self
                            .check_per_channel(op, shape.c_out, shape.linear)
                            .is_ok()
                }
            };
            let Some(out) = self.node(c).outputs.first().filter(|_| fits) else {
                break;
            };
            t = out.clone();
            post.push(step);
        }
        (post, t)
    }

    /// Every intermediate tensor is read only inside the set.
    fn check_uses(&self, nodes: &BTreeSet<usize>, output: &str) -> Result<(), String> {
        for &i in nodes {
            for t in self
                .node(i)
                .outputs
                .iter()
                .filter(|t| *t != output && !t.is_empty())
            {
                if self.outputs.contains(t.as_str()) {
                    return Err(format!(
                        "`{t}` (output of node `{}`) is also a graph output",
                        self.node(i).label()
                    ));
                }
                if let Some(&o) = self.consumers_of(t).iter().find(|c| !nodes.contains(c)) {
                    return Err(format!(
                        "`{t}` (output of node `{}`) is also read by node `{}`, outside the block",
                        self.node(i).label(),
                        self.node(o).label()
                    ));
                }
            }
        }
        Ok(())
    }

    fn dims(&self, t: &str) -> Vec<i64> {
        self.constant(t).map(|c| c.dims.clone()).unwrap_or_default()
    }

    fn label(&self, op: &GOp) -> String {
        op_node(op).map_or_else(|| "the identity".into(), |i| self.node(i).label())
    }

    /// The geometry of one branch's chain; `Err` says why the chain is not one conv.
    fn geometry(&self, steps: &[Step]) -> Result<Geo, String> {
        let ops: Vec<&GOp> = steps.iter().filter_map(|s| s.op.as_ref()).collect();
        let Some(f) = ops.iter().position(|o| is_source(o)) else {
            return Ok(Geo::identity());
        };
        let src = ops[f];
        let geo = self.source_geo(src)?;
        if let Some(pre) = ops[..f].first() {
            let unpadded = geo.pads == [0; 4] || geo.linear == Some(true);
            if !unpadded {
                return Err(format!(
                    "`{}` comes before `{}`, which pads its input with zeros: the border would not see `{}`'s shift",
                    self.label(pre),
                    geo.label,
                    self.label(pre)
                ));
            }
        }
        let rest = &ops[f + 1..];
        match rest.iter().position(|o| !is_per_channel(o)) {
            None => Ok(geo),
            Some(k) => self.sequence(src, geo, &rest[..k], &rest[k..]),
        }
    }

    fn source_geo(&self, op: &GOp) -> Result<Geo, String> {
        let label = self.label(op);
        let conv_like = |kernel, stride, pads, io, group| Geo {
            label: label.clone(),
            kernel,
            stride,
            pads,
            io,
            group,
            linear: Some(false),
        };
        match op {
            GOp::Conv {
                weight,
                kernel,
                stride,
                dilation,
                pads,
                group,
                ..
            } => {
                let d = self.dims(weight);
                let [o, i, _, _] = d.as_slice() else {
                    return Err(format!(
                        "Conv `{label}`'s weight `{weight}` has shape {d:?}; only 2-D convs merge"
                    ));
                };
                let (o, i) = (
                    usize::try_from(*o).unwrap_or(0),
                    usize::try_from(*i).unwrap_or(0),
                );
                if o == 0 || i == 0 || o % group != 0 {
                    return Err(format!(
                        "Conv `{label}`'s weight `{weight}` has shape {d:?}, which does not fit {group} groups"
                    ));
                }
                Ok(conv_like(
                    eff(*kernel, *dilation),
                    *stride,
                    *pads,
                    Some((i * group, o)),
                    Some(*group),
                ))
            }
            GOp::AvgPool {
                kernel,
                stride,
                pads,
                count_include_pad,
                ..
            } => {
                if !count_include_pad && *pads != [0; 4] {
                    return Err(format!(
                        "AveragePool `{label}` leaves the padding out of its mean (count_include_pad=0), so its border is no convolution"
                    ));
                }
                Ok(conv_like(*kernel, *stride, *pads, None, None))
            }
            GOp::Gemm { weight, .. } | GOp::MatMul { weight, .. } => linear_geo(
                &self.dims(weight),
                weight,
                label,
                matches!(op, GOp::Gemm { trans_b: true, .. }),
            ),
            _ => Err(format!("`{label}` is not a source")),
        }
    }
}

/// A Gemm's or MatMul's geometry from its weight's dims `d`.
fn linear_geo(d: &[i64], weight: &str, label: String, trans_b: bool) -> Result<Geo, String> {
    let [a, b] = d else {
        return Err(format!(
            "`{label}`'s weight `{weight}` has shape {d:?}, not 2-D"
        ));
    };
    let (a, b) = (
        usize::try_from(*a).unwrap_or(0),
        usize::try_from(*b).unwrap_or(0),
    );
    Ok(Geo {
        label,
        kernel: (1, 1),
        stride: (1, 1),
        pads: [0; 4],
        io: Some(if trans_b { (b, a) } else { (a, b) }),
        group: Some(1),
        linear: Some(true),
    })
}

fn branch_ops(steps: &[Step]) -> Vec<GOp> {
    let ops: Vec<GOp> = steps.iter().filter_map(|s| s.op.clone()).collect();
    if ops.iter().any(is_source) {
        ops
    } else {
        std::iter::once(GOp::Identity).chain(ops).collect()
    }
}

impl View<'_> {
    /// A 1×1 conv, per-channel ops `mid`, then `tail` = (Pad,) Conv or AveragePool, per-channel
    /// ops: DBB's sequence, one conv when the 1×1 is plain and the border comes out right.
    fn sequence(&self, first: &GOp, geo: Geo, mid: &[&GOp], tail: &[&GOp]) -> Result<Geo, String> {
        let plain_1x1 = matches!(first, GOp::Conv { kernel: (1, 1), stride: (1, 1), dilation: (1, 1), pads, .. } if *pads == [0; 4]);
        let (pad, second, after) = match tail {
            [p @ GOp::Pad { .. }, s, after @ ..] => (Some(*p), *s, after),
            [s, after @ ..] => (None, *s, after),
            [] => return Ok(geo),
        };
        if !matches!(second, GOp::Conv { .. } | GOp::AvgPool { .. }) || !plain_1x1 {
            let what = if matches!(second, GOp::Pad { .. }) {
                "Pad"
            } else {
                "op"
            };
            return Err(format!(
                "{what} `{}` follows `{}` in one branch; only a 1×1, stride-1, unpadded conv merges into the conv after it",
                self.label(second),
                geo.label
            ));
        }
        if let Some(op) = after.iter().find(|o| !is_per_channel(o)) {
            return Err(format!(
                "`{}` follows a 1×1 → k×k sequence in one branch",
                self.label(op)
            ));
        }
        let (value, extra) = match pad {
            Some(GOp::Pad { pads, value, .. }) => (*value, hw_pads(pads).ok_or_else(|| {
                format!("Pad `{}` pads {pads:?}: only the height and width of an N×C×H×W tensor, by ≥ 0, merge", self.label(pad.unwrap_or(first)))
            })?),
            _ => (0.0, [0; 4]),
        };
        let mut g2 = self.source_geo(second)?;
        let (c_in, mid_c) = geo.io.unwrap_or((0, 0));
        if let Some((i2, _)) = g2.io.filter(|&(i2, _)| i2 != mid_c) {
            return Err(format!(
                "`{}` reads {i2} channels but `{}` makes {mid_c}",
                g2.label, geo.label
            ));
        }
        if g2.group.is_some_and(|g| Some(g) != geo.group) {
            return Err(format!(
                "`{}` and `{}` have different groups; the sequence merges only with equal groups",
                geo.label, g2.label
            ));
        }
        let pads: [usize; 4] = std::array::from_fn(|k| g2.pads[k] + extra[k]);
        let shift = matches!(first, GOp::Conv { bias: Some(_), .. })
            || mid
                .iter()
                .any(|o| matches!(o, GOp::Bn { .. } | GOp::Add { .. } | GOp::Sub { .. }));
        if pads != [0; 4] && (shift || value != 0.0) {
            return Err(format!(
                "the 1×1 conv `{}` → `{}` sequence pads between the two after a bias or BatchNormalization: \
                 the border holds {value}, not what `{}` makes of zero input, so it is not one convolution",
                geo.label, g2.label, geo.label
            ));
        }
        let out = g2.io.map_or(mid_c, |(_, o)| o);
        g2.io = Some((c_in, out));
        g2.group = geo.group;
        g2.pads = pads;
        Ok(g2)
    }
}

/// `[h_begin, w_begin, h_end, w_end]` from an N×C×H×W Pad's `[n, c, h, w, n, c, h, w]`.
fn hw_pads(p: &[i64]) -> Option<[usize; 4]> {
    let [0, 0, hb, wb, 0, 0, he, we] = *p else {
        return None;
    };
    let u = |v: i64| usize::try_from(v).ok();
    Some([u(hb)?, u(wb)?, u(he)?, u(we)?])
}

fn dims_text(d: (usize, usize)) -> String {
    format!("{}×{}", d.0, d.1)
}

/// The merged node's shape from the branches', or why they do not add up to one.
fn block_shape(geos: &[Geo]) -> Result<Shape, String> {
    let linear = geos.iter().find_map(|g| g.linear).unwrap_or(false);
    if let Some(g) = geos.iter().find(|g| g.linear.is_some_and(|l| l != linear)) {
        return Err(format!(
            "`{}` is a {} but `{}` a {}; they do not merge",
            g.label,
            if linear { "Conv" } else { "Gemm/MatMul" },
            geos.iter()
                .find(|g| g.linear == Some(linear))
                .map_or("", |g| g.label.as_str()),
            if linear { "Gemm/MatMul" } else { "Conv" },
        ));
    }
    let mut strides: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for g in geos {
        *strides.entry(g.stride).or_default() += 1;
    }
    let stride = strides
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or((1, 1), |(s, _)| *s);
    if let Some(g) = geos.iter().find(|g| g.stride != stride) {
        return Err(format!(
            "branch through node `{}` has stride {}, the others {}",
            g.label,
            dims_text(g.stride),
            dims_text(stride)
        ));
    }
    let Some(main) = geos.iter().find(|g| g.io.is_some()) else {
        return Err("no branch has a Conv or Gemm, so the channel counts are unknown".into());
    };
    let (c_in, c_out) = main.io.unwrap_or((0, 0));
    for g in geos {
        match g.io {
            Some(io) if io != (c_in, c_out) => {
                return Err(format!(
                    "branch through node `{}` maps {} → {} channels, branch through `{}` {c_in} → {c_out}",
                    g.label, io.0, io.1, main.label
                ));
            }
            None if c_in != c_out => {
                return Err(format!(
                    "{} needs as many input as output channels, but `{}` maps {c_in} → {c_out}",
                    g.label, main.label
                ));
            }
            _ => {}
        }
    }
    let group = main.group.unwrap_or(1);
    if let Some(g) = geos.iter().find(|g| g.group.is_some_and(|x| x != group)) {
        return Err(format!(
            "`{}` has {} groups, `{}` {group}; branches merge only with equal groups",
            g.label,
            g.group.unwrap_or(1),
            main.label
        ));
    }
    let (kernel, pads) = merged_window(geos)?;
    Ok(Shape {
        kernel,
        stride,
        pads,
        c_in,
        c_out,
        group,
        linear,
    })
}

/// The largest kernel and its pads; every branch must sit centred in it.
fn merged_window(geos: &[Geo]) -> Result<((usize, usize), [usize; 4]), String> {
    let kernel = (
        geos.iter().map(|g| g.kernel.0).max().unwrap_or(1),
        geos.iter().map(|g| g.kernel.1).max().unwrap_or(1),
    );
    // Per axis (0: height, 1: width), the pads of the branches with the full extent.
    let mut pads = [0usize; 4];
    for axis in 0..2 {
        let full = |g: &&Geo| {
            if axis == 0 {
                g.kernel.0 == kernel.0
            } else {
                g.kernel.1 == kernel.1
            }
        };
        let mut widest = geos.iter().filter(full);
        let Some(first) = widest.next() else { continue };
        let (b, e) = (first.pads[axis], first.pads[axis + 2]);
        if let Some(other) = widest.find(|g| (g.pads[axis], g.pads[axis + 2]) != (b, e)) {
            return Err(format!(
                "branches through `{}` and `{}` have the same {}-tap {} but pad it differently ({:?} and {:?})",
                first.label,
                other.label,
                if axis == 0 { kernel.0 } else { kernel.1 },
                if axis == 0 { "height" } else { "width" },
                first.pads,
                other.pads
            ));
        }
        pads[axis] = b;
        pads[axis + 2] = e;
    }
    for g in geos {
        let off = (kernel.0 - g.kernel.0, kernel.1 - g.kernel.1);
        let centred = off.0 % 2 == 0
            && off.1 % 2 == 0
            && pads[0] >= off.0 / 2
            && pads[2] >= off.0 / 2
            && pads[1] >= off.1 / 2
            && pads[3] >= off.1 / 2
            && g.pads
                == [
                    pads[0] - off.0 / 2,
                    pads[1] - off.1 / 2,
                    pads[2] - off.0 / 2,
                    pads[3] - off.1 / 2,
                ];
        if !centred {
            return Err(format!(
                "branch through node `{}` has a {} kernel with pads {:?}, which does not centre it on the {} kernel with pads {pads:?}",
                g.label,
                dims_text(g.kernel),
                g.pads,
                dims_text(kernel)
            ));
        }
    }
    Ok((kernel, pads))
}

impl View<'_> {
    /// Each per-channel op has one value per channel where it acts.
    fn check_channels(
        &self,
        steps: &[Step],
        shape: &Shape,
        has_matmul: bool,
    ) -> Result<(), String> {
        let mut c = shape.c_in;
        for op in steps.iter().filter_map(|s| s.op.as_ref()) {
            match op {
                GOp::Conv { weight, .. } => {
                    c = self
                        .dims(weight)
                        .first()
                        .and_then(|&o| usize::try_from(o).ok())
                        .unwrap_or(c);
                }
                GOp::Gemm {
                    weight, trans_b, ..
                } => {
                    let d = self.dims(weight);
                    let o = if *trans_b { d.first() } else { d.get(1) };
                    c = o.and_then(|&o| usize::try_from(o).ok()).unwrap_or(c);
                }
                GOp::MatMul { weight, .. } => {
                    c = self
                        .dims(weight)
                        .get(1)
                        .and_then(|&o| usize::try_from(o).ok())
                        .unwrap_or(c);
                }
                GOp::Bn { node, .. } if has_matmul => {
                    return Err(format!(
                        "BatchNormalization `{}` normalizes axis 1, which is a MatMul's feature axis only for 2-D tensors, and the graph gives no shapes",
                        self.node(*node).label()
                    ));
                }
                op if is_per_channel(op) => self.check_per_channel(op, c, shape.linear)?,
                _ => {}
            }
        }
        if let Some(GOp::Gemm {
            bias: Some(b),
            node,
            ..
        }) = steps
            .iter()
            .filter_map(|s| s.op.as_ref())
            .find(|o| matches!(o, GOp::Gemm { .. }))
        {
            self.fits_channels(b, shape.c_out, true)
                .map_err(|e| format!("the bias of Gemm `{}`: {e}", self.node(*node).label()))?;
        }
        Ok(())
    }

    fn check_per_channel(&self, op: &GOp, c: usize, linear: bool) -> Result<(), String> {
        let label = self.label(op);
        match op {
            GOp::Bn {
                scale,
                bias,
                mean,
                var,
                ..
            } => {
                for t in [scale, bias, mean, var] {
                    let d = self.dims(t);
                    if d != [c as i64] {
                        return Err(format!(
                            "BatchNormalization `{label}`'s `{t}` has shape {d:?}, expected [{c}]"
                        ));
                    }
                }
                Ok(())
            }
            GOp::Mul { tensor, .. }
            | GOp::Add { tensor, .. }
            | GOp::Sub { tensor, .. }
            | GOp::Div { tensor, .. } => {
                let zero = self
                    .constant(tensor)
                    .and_then(|k| k.values.as_ref())
                    .is_some_and(|v| v.contains(&0.0));
                if matches!(op, GOp::Div { .. }) && zero {
                    return Err(format!("Div `{label}` divides by zero"));
                }
                self.fits_channels(tensor, c, linear).map_err(|e| {
                    format!(
                        "{} `{label}`: {e}",
                        self.node(op_node(op).unwrap_or(0)).op_type
                    )
                })
            }
            _ => Ok(()),
        }
    }

    /// A scalar, or one value per channel laid out so that it broadcasts over channels.
    fn fits_channels(&self, t: &str, c: usize, linear: bool) -> Result<(), String> {
        let d = self.dims(t);
        let c = c as i64;
        let ok = d.iter().all(|&x| x == 1)
            || if linear {
                d.last() == Some(&c) && d.iter().rev().skip(1).all(|&x| x == 1)
            } else {
                matches!(d.as_slice(), [x, 1, 1] | [1, x, 1, 1] if *x == c)
            };
        if ok {
            Ok(())
        } else if !linear && d == [c] {
            Err(format!(
                "`{t}` has shape [{c}], which broadcasts over the width of an N×C×H×W tensor, not over its channels"
            ))
        } else {
            let want = if linear {
                format!("[{c}]")
            } else {
                format!("[{c},1,1] or [1,{c},1,1]")
            };
            Err(format!(
                "`{t}` has shape {d:?}; one value per channel is {want}, or a scalar"
            ))
        }
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
