//! Branch sets as blocks of the one block model: each [`BranchSet`] the topology finder found
//! becomes a [`Block`] whose ops name the graph's constant tensors, so that the one fusion
//! routine does the math (f64, rounded once) and `verify` runs it op by op, as for a
//! checkpoint. A set the block model cannot express yet is left as it is, with the reason.

use std::collections::BTreeSet;

use super::{BranchSet, Finding, GBranch, GOp, Graph};
use crate::block::{Block, BnTensors, Branch, Op, Role};
use crate::checkpoint::Checkpoint;
use crate::report::{EpsInfo, Skipped};

/// The blocks of a graph, each with the set it replaces.
#[derive(Debug)]
pub struct GraphBlocks {
    /// The blocks, in the graph's order.
    pub blocks: Vec<Block>,
    /// The set each block replaces (same order).
    pub sets: Vec<BranchSet>,
    /// Candidates left as they are, and why (the finder's and the block model's).
    pub skipped: Vec<Skipped>,
    /// The BN ε, for the report: every BN carries its node's own.
    pub eps: EpsInfo,
}

/// The blocks of the sets in `finding`, their tensors read from `ckpt` (the graph's tensor
/// table).
pub fn graph_blocks(ckpt: &Checkpoint, graph: &Graph, finding: &Finding) -> GraphBlocks {
    let mut out = GraphBlocks {
        blocks: Vec::new(),
        sets: Vec::new(),
        skipped: finding
            .rejected
            .iter()
            .map(|r| Skipped {
                name: r.nodes.join(", "),
                reason: r.reason.clone(),
            })
            .collect(),
        eps: EpsInfo {
            value: crate::find::DEFAULT_BN_EPS,
            source: "each BatchNormalization node's own epsilon".into(),
        },
    };
    let mut taken: BTreeSet<String> = ckpt.tensors().iter().map(|t| t.name.clone()).collect();
    for set in &finding.sets {
        let name = block_name(graph, set);
        match block_of(ckpt, graph, set, &name, &mut taken) {
            Ok(block) => {
                out.blocks.push(block);
                out.sets.push(set.clone());
            }
            Err(reason) => out.skipped.push(Skipped { name, reason }),
        }
    }
    consume_constants(ckpt, graph, &mut out);
    let first_eps = finding
        .sets
        .iter()
        .flat_map(all_ops)
        .find_map(|op| match op {
            GOp::Bn { eps, .. } => Some(*eps),
            _ => None,
        });
    if let Some(eps) = first_eps {
        out.eps.value = eps;
    }
    out
}

/// Every op of a set, branches then post-ops.
fn all_ops(set: &BranchSet) -> impl Iterator<Item = &GOp> {
    set.branches
        .iter()
        .flat_map(|b| b.ops.iter())
        .chain(&set.post)
}

/// A block's name: the longest `/`-bounded prefix its nodes' names share (the exporter's
/// module scope, e.g. `/stages.0/stages.0.1`), else its first node's name.
pub fn block_name(graph: &Graph, set: &BranchSet) -> String {
    let names: Vec<&str> = set
        .nodes
        .iter()
        .filter_map(|&i| graph.nodes.get(i))
        // An input's other Casts are named after their consumers, outside the block's scope.
        .filter(|n| !n.is("Cast"))
        .map(|n| n.name.as_str())
        .collect();
    let Some(first) = names.first() else {
        return set.output.clone();
    };
    let mut prefix: &str = first;
    for n in &names[1..] {
        while !n.starts_with(prefix) || !boundary(n, prefix.len()) {
            match prefix.rfind('/') {
                Some(at) => prefix = &prefix[..at],
                None => {
                    prefix = "";
                    break;
                }
            }
        }
    }
    match prefix.trim_end_matches('/') {
        "" => first.to_string(),
        p => p.to_string(),
    }
}

/// Whether `name` ends or has a `/` at byte `at`.
fn boundary(name: &str, at: usize) -> bool {
    name.len() == at || name.as_bytes().get(at) == Some(&b'/')
}

/// The block of one set, or why the block model cannot express it yet.
fn block_of(
    ckpt: &Checkpoint,
    graph: &Graph,
    set: &BranchSet,
    name: &str,
    taken: &mut BTreeSet<String>,
) -> Result<Block, String> {
    let (post, post_coef) = post_ops(graph, &set.post)?;
    let mut branches = Vec::with_capacity(set.branches.len());
    for (i, b) in set.branches.iter().enumerate() {
        let (ops, coef) = branch_ops(graph, b)?;
        branches.push(Branch {
            label: format!("branch {i}"),
            role: role(&ops),
            coef: b.coef * coef * post_coef,
            ops,
        });
    }
    let deploy = [unique(taken, name, "weight"), unique(taken, name, "bias")];
    let mut block = Block::new(ckpt, name, branches, post, deploy).map_err(|e| e.what)?;
    block.kind = if set.linear { "Gemm" } else { "Conv" }.into();
    Ok(block)
}

/// The sets' other constants (a scalar the coefficients took, an `Add` of zero) go with the
/// first block whose nodes read them, unless a node that stays in the graph reads them too
/// (dynamo shares one scalar among blocks: it goes when the last of them is merged).
fn consume_constants(ckpt: &Checkpoint, graph: &Graph, out: &mut GraphBlocks) {
    let merged: BTreeSet<usize> = out
        .sets
        .iter()
        .flat_map(|s| s.nodes.iter().copied())
        .collect();
    let kept: BTreeSet<&str> = (graph.nodes.iter())
        .filter(|n| !merged.contains(&n.index))
        .flat_map(|n| n.inputs.iter().map(String::as_str))
        .collect();
    let mut given: BTreeSet<String> = (out.blocks.iter())
        .flat_map(|b| b.consumed.iter().cloned())
        .collect();
    for (block, set) in out.blocks.iter_mut().zip(&out.sets) {
        for &i in &set.nodes {
            for input in &graph.nodes[i].inputs {
                let constant = ckpt.get(input).is_some();
                if constant && !kept.contains(input.as_str()) && given.insert(input.clone()) {
                    block.consumed.push(input.clone());
                }
            }
        }
    }
}

/// `{block}.{leaf}`, or with a number where the graph has that name already.
fn unique(taken: &mut BTreeSet<String>, block: &str, leaf: &str) -> String {
    let mut name = format!("{block}.{leaf}");
    let mut n = 1;
    while taken.contains(&name) {
        name = format!("{block}.{leaf}.{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

/// The part a branch plays, from its source.
fn role(ops: &[Op]) -> Role {
    match ops.iter().find(|op| op.is_source()) {
        Some(Op::Identity | Op::AvgPool { .. }) => Role::Identity,
        _ => Role::Kxk,
    }
}

/// A branch's ops, and the factor its scalar constants make of its coefficient.
fn branch_ops(graph: &Graph, b: &GBranch) -> Result<(Vec<Op>, f64), String> {
    let mut ops = Vec::with_capacity(b.ops.len());
    let mut coef = 1.0;
    let mut sourced = false;
    for (i, op) in b.ops.iter().enumerate() {
        match source_op(op)? {
            Some(source) if sourced => {
                return Err(format!(
                    "a second source ({}) after the first: sequences are not merged from graphs yet",
                    describe(&source)
                ));
            }
            Some(source) => {
                sourced = true;
                ops.push(source);
            }
            None => {
                // The coefficient multiplies the branch's end: a scalar moves there only
                // when nothing after it adds a constant (a bias, a BN's shift, an `Add`).
                let fold = !b.ops[i + 1..].iter().any(|o| adds_constant(graph, o));
                let channel = channel_op(graph, op, fold, &mut coef)?;
                match channel {
                    Some(Op::Bn(bn)) if !sourced => ops.push(Op::InputBn(bn)),
                    Some(_) if !sourced => {
                        return Err(format!(
                            "a {} before the branch's source acts on its input channels; only a BatchNormalization there is merged",
                            describe_g(op)
                        ));
                    }
                    Some(channel) => ops.push(channel),
                    None => {}
                }
            }
        }
    }
    Ok((ops, coef))
}

/// Whether `op` adds a constant to what it reads (so that a scale before it does not
/// commute with it): a bias, a BN's shift, an `Add`/`Sub` of anything but zero.
fn adds_constant(graph: &Graph, op: &GOp) -> bool {
    match op {
        GOp::Conv { bias, .. } | GOp::Gemm { bias, .. } => bias.is_some(),
        GOp::Bn { .. } | GOp::Pad { .. } | GOp::BorderFill { .. } => true,
        GOp::Add { tensor, .. } | GOp::Sub { tensor, .. } => {
            scalar_value(graph, tensor) != Some(0.0)
        }
        GOp::MatMul { .. } | GOp::Identity | GOp::AvgPool { .. } => false,
        GOp::Mul { .. } | GOp::Div { .. } => false,
    }
}

/// The source op `op` is, if it is one.
fn source_op(op: &GOp) -> Result<Option<Op>, String> {
    Ok(Some(match op {
        GOp::Conv {
            weight,
            bias,
            dilation,
            ..
        } => {
            if dilation.0 != dilation.1 {
                return Err(format!(
                    "conv `{weight}` has dilation {dilation:?}, not the same both ways"
                ));
            }
            conv(weight, bias.clone(), dilation.0, 0)
        }
        GOp::Gemm {
            weight,
            bias,
            trans_b,
            alpha,
            beta,
            ..
        } => {
            if *alpha != 1.0 || (bias.is_some() && *beta != 1.0) {
                return Err(format!(
                    "Gemm with `{weight}` has alpha {alpha}, beta {beta}; only alpha 1, beta 1 (a Linear) is merged"
                ));
            }
            // transB 0: the weight is stored [in, out], output features on its dim 1.
            conv(weight, bias.clone(), 1, usize::from(!*trans_b))
        }
        // `x·B`, B stored [in, out]; its bias, if any, is the `Add` after it (a shift).
        GOp::MatMul { weight, .. } => conv(weight, None, 1, 1),
        GOp::Identity => Op::Identity,
        GOp::AvgPool { kernel, .. } if kernel.0 == kernel.1 => Op::AvgPool { kernel: kernel.0 },
        GOp::AvgPool { kernel, .. } => {
            return Err(format!("an AveragePool of {kernel:?} is not square"));
        }
        GOp::Pad { .. } => return Err("a Pad in a branch is not merged yet".into()),
        GOp::BorderFill { .. } => return Err("a border fill is not merged".into()),
        _ => return Ok(None),
    }))
}

/// A conv (or Linear) source whose weight holds its outputs on axis `out_axis` (1: a Linear
/// stored `[in, out]`).
fn conv(weight: &str, bias: Option<String>, dilation: usize, out_axis: usize) -> Op {
    Op::Conv {
        weight: weight.to_string(),
        bias,
        dilation,
        // The finder checked the geometry; kh×kw kernels (ACNet's) centre like square ones.
        asymmetric: true,
        plus_identity: false,
        out_axis,
    }
}

/// A per-channel op (a BN as [`Op::Bn`]); scalar multiplies and divides go to `coef` when
/// `fold` says they may move to the chain's coefficient, an `Add` of zero vanishes.
fn channel_op(graph: &Graph, op: &GOp, fold: bool, coef: &mut f64) -> Result<Option<Op>, String> {
    let scalar = |t: &str| scalar_value(graph, t);
    Ok(Some(match op {
        GOp::Bn {
            scale,
            bias,
            mean,
            var,
            eps,
            ..
        } => Op::Bn(BnTensors {
            weight: scale.clone(),
            bias: bias.clone(),
            running_mean: mean.clone(),
            running_var: var.clone(),
            num_batches_tracked: None,
            eps: *eps,
        }),
        GOp::Mul { tensor, .. } => match scalar(tensor) {
            Some(v) if fold => {
                *coef *= v;
                return Ok(None);
            }
            Some(_) => Op::Scalar {
                weight: tensor.clone(),
            },
            None => Op::Scale {
                weight: tensor.clone(),
            },
        },
        GOp::Div { tensor, .. } => match scalar(tensor) {
            Some(v) if fold && v != 0.0 => {
                *coef /= v;
                return Ok(None);
            }
            _ => Op::Divide {
                divisor: tensor.clone(),
            },
        },
        GOp::Add { tensor, .. } | GOp::Sub { tensor, .. } if scalar(tensor) == Some(0.0) => {
            return Ok(None);
        }
        GOp::Add { tensor, .. } => Op::Shift {
            bias: tensor.clone(),
            subtract: false,
        },
        GOp::Sub { tensor, .. } => Op::Shift {
            bias: tensor.clone(),
            subtract: true,
        },
        other => return Err(format!("{} is not a per-channel op", describe_g(other))),
    }))
}

/// Post-ops: per-channel ops, and the factor scalars make of every branch (they act before
/// the post-ops, so a scalar folds only while no post-op before it added a constant).
fn post_ops(graph: &Graph, post: &[GOp]) -> Result<(Vec<Op>, f64), String> {
    let mut coef = 1.0;
    let mut ops = Vec::new();
    for (i, op) in post.iter().enumerate() {
        let fold = !post[..i].iter().any(|o| adds_constant(graph, o));
        ops.extend(channel_op(graph, op, fold, &mut coef)?);
    }
    Ok((ops, coef))
}

/// A constant's value when it holds exactly one number.
fn scalar_value(graph: &Graph, tensor: &str) -> Option<f64> {
    let c = graph.constants.get(tensor)?;
    match c.values.as_deref() {
        Some([v]) => Some(*v),
        _ => None,
    }
}

/// A short name of a block op, for messages.
fn describe(op: &Op) -> &'static str {
    match op {
        Op::Conv { .. } => "a conv",
        Op::Identity => "the input",
        Op::AvgPool { .. } => "an average pool",
        _ => "an op",
    }
}

/// A short name of a graph op, for messages.
fn describe_g(op: &GOp) -> &'static str {
    match op {
        GOp::Conv { .. } => "Conv",
        GOp::Gemm { .. } => "Gemm",
        GOp::MatMul { .. } => "MatMul",
        GOp::Bn { .. } => "BatchNormalization",
        GOp::Identity => "the input",
        GOp::AvgPool { .. } => "AveragePool",
        GOp::Pad { .. } => "Pad",
        GOp::BorderFill { .. } => "Pad + ScatterND",
        GOp::Mul { .. } => "Mul",
        GOp::Add { .. } => "Add",
        GOp::Sub { .. } => "Sub",
        GOp::Div { .. } => "Div",
    }
}

impl GraphBlocks {
    /// The blocks as a [`crate::find::Detection`], as a checkpoint's would be: its "layout"
    /// says they were found by topology, and it lists what was left alone.
    pub fn detection(&self) -> crate::find::Detection {
        crate::find::Detection {
            layout: graph_layout(),
            blocks: self.blocks.clone(),
            skipped: self.skipped.clone(),
            bn_eps: self.eps.clone(),
        }
    }
}

/// The pseudo-layout of blocks found in a graph.
fn graph_layout() -> crate::find::Layout {
    crate::find::Layout {
        name: "onnx-graph".into(),
        description: "parallel linear branches found in the ONNX graph by topology".into(),
        bn_eps_reason: Some("each BatchNormalization node's own epsilon".into()),
        ..crate::find::Layout::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::graph::Constant;

    /// A graph with constants `s` (the scalar 2), `z` (the scalar 0) and `c` (`[1, 2, 1, 1]`).
    fn graph() -> Graph {
        let mut g = Graph::default();
        for (name, dims, values) in [
            ("s", vec![], vec![2.0]),
            ("z", vec![1], vec![0.0]),
            ("c", vec![1, 2, 1, 1], vec![0.5, -1.5]),
        ] {
            let values = Some(values);
            (g.constants).insert(
                name.into(),
                Constant {
                    dims,
                    data_type: 1,
                    values,
                },
            );
        }
        g
    }

    fn conv(bias: bool) -> GOp {
        GOp::Conv {
            node: 0,
            weight: "w".into(),
            bias: bias.then(|| "b".into()),
            kernel: (3, 3),
            stride: (1, 1),
            dilation: (1, 1),
            pads: [1; 4],
            group: 1,
        }
    }

    fn bin(op: &str, tensor: &str) -> GOp {
        let (node, tensor) = (1, tensor.to_string());
        match op {
            "Add" => GOp::Add { node, tensor },
            "Sub" => GOp::Sub { node, tensor },
            "Mul" => GOp::Mul { node, tensor },
            _ => GOp::Div { node, tensor },
        }
    }

    fn ops_of(ops: Vec<GOp>) -> Result<(Vec<String>, f64), String> {
        let (ops, coef) = branch_ops(&graph(), &GBranch { coef: 1.0, ops })?;
        let names = ops
            .iter()
            .map(|o| {
                format!("{:?}", o)
                    .split([' ', '{', '('])
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        Ok((names, coef))
    }

    #[test]
    fn add_sub_div_by_per_channel_constants_are_ops_in_place() {
        let got = ops_of(vec![
            conv(true),
            bin("Add", "c"),
            bin("Div", "c"),
            bin("Sub", "c"),
        ]);
        assert_eq!(
            got,
            Ok((
                vec![
                    "Conv".into(),
                    "Shift".into(),
                    "Divide".into(),
                    "Shift".into()
                ],
                1.0
            ))
        );
        let (ops, _) = branch_ops(
            &graph(),
            &GBranch {
                coef: 1.0,
                ops: vec![conv(false), bin("Sub", "c")],
            },
        )
        .expect("merges");
        assert!(matches!(&ops[1], Op::Shift { subtract: true, bias } if bias == "c"));
    }

    #[test]
    fn a_scalar_folds_into_the_coefficient_only_after_every_added_constant() {
        // conv·2 + c: the 2 must stay before the shift.
        let got = ops_of(vec![conv(false), bin("Mul", "s"), bin("Add", "c")]);
        assert_eq!(
            got,
            Ok((vec!["Conv".into(), "Scalar".into(), "Shift".into()], 1.0))
        );
        // (conv + c)/2: the whole branch is halved.
        let got = ops_of(vec![conv(false), bin("Add", "c"), bin("Div", "s")]);
        assert_eq!(got, Ok((vec!["Conv".into(), "Shift".into()], 0.5)));
        // (conv/2) + c: a Divide by the scalar, in place.
        let got = ops_of(vec![conv(false), bin("Div", "s"), bin("Add", "c")]);
        assert_eq!(
            got,
            Ok((vec!["Conv".into(), "Divide".into(), "Shift".into()], 1.0))
        );
        // An Add of zero is nothing, and does not hold a scalar back.
        let got = ops_of(vec![conv(false), bin("Mul", "s"), bin("Add", "z")]);
        assert_eq!(got, Ok((vec!["Conv".into()], 2.0)));
    }

    #[test]
    fn a_scalar_before_a_biased_conv_does_not_fold_and_is_refused() {
        // W(2x) + b is not 2(Wx + b).
        let err = ops_of(vec![bin("Mul", "s"), conv(true)]).expect_err("refused");
        assert!(err.contains("before the branch's source"), "{err}");
        assert_eq!(
            ops_of(vec![bin("Mul", "s"), conv(false)]),
            Ok((vec!["Conv".into()], 2.0))
        );
        assert!(ops_of(vec![bin("Add", "c"), conv(false)]).is_err());
    }

    #[test]
    fn post_scalars_fold_only_before_an_added_constant() {
        let g = graph();
        let (ops, coef) = post_ops(&g, &[bin("Div", "s"), bin("Add", "c")]).expect("merges");
        assert_eq!((ops.len(), coef), (1, 0.5));
        let (ops, coef) = post_ops(&g, &[bin("Add", "c"), bin("Div", "s")]).expect("merges");
        assert_eq!(coef, 1.0);
        assert!(matches!(ops[..], [Op::Shift { .. }, Op::Divide { .. }]));
    }
}
