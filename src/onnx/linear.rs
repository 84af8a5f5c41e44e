//! A merged Linear keeps the form of the nodes it replaces. The caller's edit writes every
//! merged Linear as one `Gemm` (`transB` 1, PyTorch's 2-D form); where the replaced Linears
//! were `MatMul`s by an `[in, out]` constant (PyTorch's form for inputs of rank 3 and more,
//! which a `Gemm` cannot take) or `Gemm`s with `transB` 0, the block model stores the fused
//! weight `[in, out]` as they did (its output axis 1), and the node written here says so:
//! - replaced `MatMul`s: one `MatMul` by the fused weight, then one `Add` of the fused bias —
//!   exactly the train graph's and the framework's deploy graph's own two steps, on an
//!   input of any rank;
//! - replaced `Gemm`s, all `transB` 0: one `Gemm` with `transB` 0 (its input is 2-D).
//!
//! The rule that picks the form here is the one the block finder's
//! `find::graph::blocks` uses to store the weight: a `MatMul`, or a `Gemm` with `transB` 0,
//! has its output features on dim 1; a set mixing both layouts is never merged.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};

use super::proto::{GraphProto, NodeProto};
use super::write::{GraphEdit, NewAttr, NewNode};

/// How a merged Linear is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `Gemm`, `transB` 1, the weight `[out, in]`: as the caller wrote it.
    GemmT,
    /// `Gemm`, `transB` 0, the weight `[in, out]`.
    Gemm,
    /// `MatMul` by the weight `[in, out]`, then `Add` of the bias.
    MatMul,
}

/// `edit` with each merged Linear in the form of the Linears it replaces.
pub(super) fn keep_linear_forms<'e>(graph: &GraphProto, edit: &'e GraphEdit) -> Cow<'e, GraphEdit> {
    let forms: Vec<Form> = edit
        .insert
        .iter()
        .map(|n| form_of(graph, edit, n))
        .collect();
    if forms.iter().all(|&f| f == Form::GemmT) {
        return Cow::Borrowed(edit);
    }
    let mut taken: HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().chain(&n.input))
        .chain(edit.insert.iter().flat_map(|n| &n.outputs))
        .map(String::as_str)
        .collect();
    taken.extend(graph.input.iter().chain(&graph.output).map(|v| v.name()));
    let taken: HashSet<String> = taken.into_iter().map(str::to_string).collect();
    let mut names: HashSet<String> = edit.insert.iter().map(|n| n.name.clone()).collect();
    let mut out = edit.clone();
    out.insert.clear();
    for (node, form) in edit.insert.iter().zip(forms) {
        match form {
            Form::GemmT => out.insert.push(node.clone()),
            Form::Gemm => out.insert.push(NewNode {
                attrs: vec![("transB".into(), NewAttr::Int(0))],
                ..node.clone()
            }),
            Form::MatMul => out.insert.extend(matmul_add(node, &taken, &mut names)),
        }
    }
    Cow::Owned(out)
}

/// The form of the Linears new node `n` replaces: the removed nodes between its input and
/// its output.
fn form_of(graph: &GraphProto, edit: &GraphEdit, n: &NewNode) -> Form {
    let is_gemm_t = n.op_type == "Gemm"
        && n.domain.is_empty()
        && matches!(n.attrs.as_slice(), [(a, NewAttr::Int(1))] if a == "transB");
    if !is_gemm_t {
        return Form::GemmT;
    }
    let producer: HashMap<&str, usize> = (edit.remove.iter())
        .filter_map(|&i| graph.node.get(i).map(|node| (i, node)))
        .flat_map(|(i, node)| node.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let input = n.inputs.first().map_or("", String::as_str);
    let mut seen = BTreeSet::new();
    let mut todo: Vec<&str> = n.outputs.iter().map(String::as_str).collect();
    while let Some(t) = todo.pop() {
        match producer.get(t) {
            Some(&i) if t != input && seen.insert(i) => {
                todo.extend(graph.node[i].input.iter().map(String::as_str));
            }
            _ => {}
        }
    }
    let linears: Vec<&NodeProto> = (seen.iter().map(|&i| &graph.node[i]))
        .filter(|node| node.domain().is_empty() && matches!(node.op_type(), "MatMul" | "Gemm"))
        .collect();
    if linears.iter().any(|node| node.op_type() == "MatMul") {
        Form::MatMul
    } else if !linears.is_empty() && linears.iter().all(|node| !trans_b(node)) {
        Form::Gemm
    } else {
        Form::GemmT
    }
}

/// Whether a `Gemm` node transposes its `B`.
fn trans_b(node: &NodeProto) -> bool {
    node.attribute
        .iter()
        .any(|a| a.name() == "transB" && a.i() != 0)
}

/// `MatMul(x, W)` then `Add(·, b)` in place of `Gemm(x, W, b)`, named after it.
fn matmul_add(n: &NewNode, taken: &HashSet<String>, names: &mut HashSet<String>) -> [NewNode; 2] {
    let scope = n.name.strip_suffix("/Gemm").unwrap_or(&n.name).to_string();
    let product = fresh(&format!("{scope}/MatMul_output_0"), |t| taken.contains(t));
    let mut named = |op: &str| {
        let name = fresh(&format!("{scope}/{op}"), |t| names.contains(t));
        names.insert(name.clone());
        name
    };
    let (matmul, add) = (named("MatMul"), named("Add"));
    let input = |i: usize| n.inputs.get(i).cloned().unwrap_or_default();
    [
        NewNode {
            name: matmul,
            op_type: "MatMul".into(),
            inputs: vec![input(0), input(1)],
            outputs: vec![product.clone()],
            attrs: Vec::new(),
            ..n.clone()
        },
        NewNode {
            name: add,
            op_type: "Add".into(),
            inputs: vec![product, input(2)],
            attrs: Vec::new(),
            ..n.clone()
        },
    ]
}

/// `stem`, or `stem_1`, `stem_2`, … : the first that `taken` does not hold.
fn fresh(stem: &str, taken: impl Fn(&str) -> bool) -> String {
    let mut name = stem.to_string();
    let mut k = 1;
    while taken(&name) {
        name = format!("{stem}_{k}");
        k += 1;
    }
    name
}
