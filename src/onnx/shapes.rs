//! Static tensor shapes of a graph, as far as one forward pass over common ops tells them from
//! the graph inputs' declared shapes, the declared `value_info`/outputs and the constants' dims:
//! what `lint` needs to turn a branch set's multiply-adds per output position into the graph's
//! figures. A shape that rests on a symbolic dim, an op not listed here, or a value computed at
//! run time is left out (never guessed). No values are computed and no weight is read.

use std::collections::HashMap;

use safetensors::Dtype;

use super::model::OnnxModel;
use super::proto::{NodeProto, ValueInfoProto};

/// Ops whose first output has their first input's shape.
const SAME_SHAPE: &[&str] = &[
    "Abs",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Celu",
    "Clip",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "Floor",
    "Gelu",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "LRN",
    "Mish",
    "Neg",
    "Not",
    "Reciprocal",
    "Relu",
    "Round",
    "Selu",
    "Sigmoid",
    "Sign",
    "Softmax",
    "Softplus",
    "Softsign",
    "Sqrt",
    "Tanh",
    "ThresholdedRelu",
    "QuantizeLinear",
    "DequantizeLinear",
];

/// Ops whose output is their inputs broadcast together (numpy rules).
const BROADCAST: &[&str] = &[
    "Add",
    "And",
    "Div",
    "Equal",
    "Greater",
    "GreaterOrEqual",
    "Less",
    "LessOrEqual",
    "Max",
    "Mean",
    "Min",
    "Mod",
    "Mul",
    "Or",
    "Pow",
    "PRelu",
    "Sub",
    "Sum",
    "Where",
    "Xor",
];

/// Every tensor whose shape is static and known: `name → dims`.
pub fn static_shapes(model: &OnnxModel) -> HashMap<String, Vec<usize>> {
    let graph = model.graph();
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    for entry in model.tensors() {
        shapes.insert(entry.name.clone(), entry.shape.clone());
    }
    let declared = (graph.input.iter())
        .chain(&graph.value_info)
        .chain(&graph.output);
    for v in declared {
        if let Some(dims) = declared_dims(v) {
            shapes.entry(v.name().to_string()).or_insert(dims);
        }
    }
    for node in &graph.node {
        let Some(out) = node.output.first().filter(|o| !o.is_empty()) else {
            continue;
        };
        if shapes.contains_key(out) {
            continue;
        }
        if let Some(dims) = infer(model, node, &shapes) {
            shapes.insert(out.clone(), dims);
        }
    }
    shapes
}

/// A value's declared dims, if every one is a number.
fn declared_dims(v: &ValueInfoProto) -> Option<Vec<usize>> {
    let tensor = v.type_.as_ref()?.tensor_type.as_ref()?;
    let shape = tensor.shape.as_ref()?;
    (shape.dim.iter())
        .map(|d| d.dim_value.and_then(|v| usize::try_from(v).ok()))
        .collect()
}

/// The shape of `node`'s first output, where its op and inputs settle it.
fn infer(
    model: &OnnxModel,
    node: &NodeProto,
    shapes: &HashMap<String, Vec<usize>>,
) -> Option<Vec<usize>> {
    let input = |i: usize| {
        (node.input.get(i))
            .filter(|n| !n.is_empty())
            .and_then(|n| shapes.get(n))
    };
    let op = node.op_type();
    if SAME_SHAPE.contains(&op) {
        return input(0).cloned();
    }
    if BROADCAST.contains(&op) {
        let all: Option<Vec<&Vec<usize>>> = (0..node.input.len()).map(input).collect();
        return broadcast(&all?);
    }
    match op {
        "Conv" => window(node, input(0)?, Some(input(1)?)),
        "MaxPool" | "AveragePool" | "LpPool" => window(node, input(0)?, None),
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => {
            let x = input(0)?;
            let spatial = x.len().checked_sub(2)?;
            Some([&x[..2], &vec![1; spatial][..]].concat())
        }
        "Gemm" => gemm(node, input(0)?, input(1)?),
        "MatMul" => matmul(input(0)?, input(1)?),
        "Flatten" => {
            let x = input(0)?;
            let rank = i64::try_from(x.len()).ok()?;
            let a = int(node, "axis").unwrap_or(1);
            let a = if a < 0 { a + rank } else { a };
            let axis = usize::try_from(a).ok().filter(|&a| a <= x.len())?;
            Some(vec![numel(&x[..axis])?, numel(&x[axis..])?])
        }
        "Concat" => concat(
            node,
            &(0..node.input.len())
                .map(input)
                .collect::<Option<Vec<_>>>()?,
        ),
        "Transpose" => {
            let x = input(0)?;
            let perm = match ints(node, "perm") {
                Some(p) => p
                    .iter()
                    .map(|&a| axis(a, x.len()))
                    .collect::<Option<Vec<_>>>()?,
                None => (0..x.len()).rev().collect(),
            };
            perm.iter().map(|&a| x.get(a).copied()).collect()
        }
        "Reshape" => reshape(node, input(0)?, &constant_ints(model, node.input.get(1)?)?),
        "Squeeze" | "Unsqueeze" | "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin"
        | "ReduceL2" => axes_op(model, node, input(0)?),
        _ => None,
    }
}

/// numpy broadcasting of `shapes`.
fn broadcast(shapes: &[&Vec<usize>]) -> Option<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max()?;
    let mut out = vec![1; rank];
    for s in shapes {
        for (o, &d) in out[rank - s.len()..].iter_mut().zip(s.iter()) {
            match (*o, d) {
                (a, b) if a == b || b == 1 => {}
                (1, b) => *o = b,
                _ => return None,
            }
        }
    }
    Some(out)
}

/// A Conv's (with its weight's shape) or pool's output: `[N, C_out, spatial…]`.
fn window(node: &NodeProto, x: &[usize], weight: Option<&Vec<usize>>) -> Option<Vec<usize>> {
    let spatial = x.len().checked_sub(2).filter(|&s| s > 0)?;
    let kernel: Vec<usize> = match weight {
        Some(w) => w.get(2..)?.to_vec(),
        None => to_usizes(ints(node, "kernel_shape")?)?,
    };
    let channels = weight.map_or(Some(x[1]), |w| w.first().copied())?;
    let ones = vec![1; spatial];
    let strides = ints(node, "strides").map_or(Some(ones.clone()), to_usizes)?;
    let dilations = ints(node, "dilations").map_or(Some(ones), to_usizes)?;
    let pads = ints(node, "pads").map_or(Some(vec![0; 2 * spatial]), to_usizes)?;
    let auto_pad = string(node, "auto_pad").unwrap_or("NOTSET");
    let ceil = int(node, "ceil_mode") == Some(1);
    if [kernel.len(), strides.len(), dilations.len()] != [spatial; 3] || pads.len() != 2 * spatial {
        return None;
    }
    let mut out = vec![x[0], channels];
    for i in 0..spatial {
        let (size, s) = (x[2 + i], strides[i].max(1));
        let extent = kernel[i]
            .checked_sub(1)?
            .checked_mul(dilations[i])?
            .checked_add(1)?;
        let o = match auto_pad {
            "SAME_UPPER" | "SAME_LOWER" => size.div_ceil(s),
            "VALID" => (size.checked_sub(extent)? / s).checked_add(1)?,
            "NOTSET" | "" => {
                let padded = size.checked_add(pads[i])?.checked_add(pads[spatial + i])?;
                let span = padded.checked_sub(extent)?;
                let steps = if ceil { span.div_ceil(s) } else { span / s };
                steps.checked_add(1)?
            }
            _ => return None,
        };
        out.push(o);
    }
    Some(out)
}

/// `Gemm`: `[M, N]` of `A` (or `Aᵀ`) times `B` (or `Bᵀ`).
fn gemm(node: &NodeProto, a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let [a0, a1] = <[usize; 2]>::try_from(a).ok()?;
    let [b0, b1] = <[usize; 2]>::try_from(b).ok()?;
    let m = if int(node, "transA") == Some(1) {
        a1
    } else {
        a0
    };
    let n = if int(node, "transB") == Some(1) {
        b0
    } else {
        b1
    };
    Some(vec![m, n])
}

/// `MatMul`: numpy's matmul of two tensors of rank 2 or more (batch dims broadcast).
fn matmul(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let (ra, rb) = (a.len().checked_sub(2)?, b.len().checked_sub(2)?);
    let batch = broadcast(&[&a[..ra].to_vec(), &b[..rb].to_vec()])?;
    Some([&batch[..], &[a[ra], b[rb + 1]]].concat())
}

/// `Concat` along its axis.
fn concat(node: &NodeProto, inputs: &[&Vec<usize>]) -> Option<Vec<usize>> {
    let first = inputs.first()?;
    let axis = axis(int(node, "axis")?, first.len())?;
    let mut out = (*first).clone();
    out[axis] = (inputs.iter()).try_fold(0usize, |sum, s| sum.checked_add(*s.get(axis)?))?;
    Some(out)
}

/// `Reshape` to a constant shape (`0` copies the input's dim unless `allowzero`, `-1` is
/// what is left).
fn reshape(node: &NodeProto, x: &[usize], target: &[i64]) -> Option<Vec<usize>> {
    let allow_zero = int(node, "allowzero") == Some(1);
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 if infer_at.is_none() => {
                infer_at = Some(i);
                out.push(1);
            }
            0 if !allow_zero => out.push(*x.get(i)?),
            d => out.push(usize::try_from(d).ok()?),
        }
    }
    let total = numel(x)?;
    if let Some(i) = infer_at {
        out[i] = total.checked_div(numel(&out)?)?;
    }
    (numel(&out)? == total).then_some(out)
}

/// `Squeeze`, `Unsqueeze` and the reductions: axes from the attribute (older opsets) or the
/// second input (a constant).
fn axes_op(model: &OnnxModel, node: &NodeProto, x: &[usize]) -> Option<Vec<usize>> {
    let axes = match (
        ints(node, "axes"),
        node.input.get(1).filter(|n| !n.is_empty()),
    ) {
        (Some(a), _) => Some(a.to_vec()),
        (None, Some(name)) => Some(constant_ints(model, name)?),
        (None, None) => None,
    };
    match node.op_type() {
        "Unsqueeze" => {
            let rank = x.len() + axes.as_ref()?.len();
            let at: Vec<usize> = (axes?.iter())
                .map(|&a| axis(a, rank))
                .collect::<Option<_>>()?;
            let mut rest = x.iter();
            (0..rank)
                .map(|i| {
                    if at.contains(&i) {
                        Some(1)
                    } else {
                        rest.next().copied()
                    }
                })
                .collect()
        }
        "Squeeze" => {
            let at: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&a| axis(a, x.len())).collect::<Option<_>>()?,
                None => (0..x.len()).filter(|&i| x[i] == 1).collect(),
            };
            Some(
                (0..x.len())
                    .filter(|i| !at.contains(i))
                    .map(|i| x[i])
                    .collect(),
            )
        }
        _ => {
            let keep = int(node, "keepdims").unwrap_or(1) == 1;
            let at: Vec<usize> = match axes {
                Some(a) if !a.is_empty() => {
                    a.iter().map(|&a| axis(a, x.len())).collect::<Option<_>>()?
                }
                _ if int(node, "noop_with_empty_axes") == Some(1) => return Some(x.to_vec()),
                _ => (0..x.len()).collect(),
            };
            let dims = (0..x.len()).filter_map(|i| match at.contains(&i) {
                true => keep.then_some(1),
                false => Some(x[i]),
            });
            Some(dims.collect())
        }
    }
}

/// An axis (negative counts from the end) of a tensor of rank `rank`.
fn axis(a: i64, rank: usize) -> Option<usize> {
    let rank = i64::try_from(rank).ok()?;
    let a = if a < 0 { a + rank } else { a };
    (0..rank).contains(&a).then_some(a as usize)
}

/// The values of a small integer constant (a `Reshape`'s shape, `axes`).
fn constant_ints(model: &OnnxModel, name: &str) -> Option<Vec<i64>> {
    let entry = model.tensor(name)?;
    if !matches!(entry.dtype, Dtype::I64 | Dtype::I32) || numel(&entry.shape)? > 64 {
        return None;
    }
    let bytes = model.tensor_bytes(entry).ok()?;
    let values = super::view::decode(entry.dtype, &bytes)?;
    Some(values.into_iter().map(|v| v as i64).collect())
}

/// Elements of a tensor of shape `dims`, if that fits a `usize`.
pub fn numel(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

fn to_usizes(v: &[i64]) -> Option<Vec<usize>> {
    v.iter().map(|&d| usize::try_from(d).ok()).collect()
}

fn attribute<'a>(node: &'a NodeProto, name: &str) -> Option<&'a super::proto::AttributeProto> {
    node.attribute.iter().find(|a| a.name() == name)
}

fn int(node: &NodeProto, name: &str) -> Option<i64> {
    attribute(node, name).and_then(|a| a.i)
}

fn ints<'a>(node: &'a NodeProto, name: &str) -> Option<&'a [i64]> {
    attribute(node, name).map(|a| a.ints.as_slice())
}

fn string<'a>(node: &'a NodeProto, name: &str) -> Option<&'a str> {
    attribute(node, name).and_then(|a| std::str::from_utf8(a.s.as_deref()?).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_and_reshape_follow_numpy() {
        assert_eq!(
            broadcast(&[&vec![1, 8, 4, 4], &vec![8, 1, 1]]),
            Some(vec![1, 8, 4, 4])
        );
        assert_eq!(broadcast(&[&vec![2, 3], &vec![4, 3]]), None);
        let node = NodeProto::default();
        assert_eq!(reshape(&node, &[2, 3, 4], &[0, -1]), Some(vec![2, 12]));
        assert_eq!(reshape(&node, &[2, 3, 4], &[5, -1]), None);
        assert_eq!(matmul(&[7, 2, 3], &[3, 5]), Some(vec![7, 2, 5]));
        assert_eq!(axis(-1, 4), Some(3));
        assert_eq!(axis(4, 4), None);
    }
}
