//! The plain [`Graph`] the block finder works on, filled from an [`OnnxModel`].

use std::collections::{BTreeMap, HashSet};

use safetensors::Dtype;

use super::graph::{Attr, Constant, Graph, Node};
use super::model::{OnnxModel, TensorEntry};
use super::proto::{AttributeProto, NodeProto};

/// Constants with at most this many elements carry their values.
const MAX_VALUES: usize = 4096;

/// The model's main graph as the finder sees it: nodes in file order, the real inputs (not the
/// initializers some exporters also list as inputs), the outputs, and every constant tensor
/// (initializers, `Constant` outputs, `Identity` aliases of those), small ones with values.
pub fn graph_view(model: &OnnxModel) -> Graph {
    let graph = model.graph();
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let mut constants = BTreeMap::new();
    for entry in model.tensors() {
        let values = values(model, entry);
        constants.insert(
            entry.name.clone(),
            Constant {
                dims: entry.shape.iter().map(|&d| d as i64).collect(),
                data_type: entry.data_type,
                values,
            },
        );
    }
    for skipped in model.skipped() {
        constants.insert(
            skipped.name.clone(),
            Constant {
                dims: skipped.dims.clone(),
                data_type: skipped.data_type,
                values: None,
            },
        );
    }
    Graph {
        nodes: graph
            .node
            .iter()
            .enumerate()
            .map(|(i, n)| node(i, n))
            .collect(),
        inputs: graph
            .input
            .iter()
            .map(|v| v.name())
            .filter(|name| !initializers.contains(name))
            .map(str::to_string)
            .collect(),
        outputs: graph.output.iter().map(|v| v.name().to_string()).collect(),
        constants,
    }
}

fn node(index: usize, node: &NodeProto) -> Node {
    Node {
        index,
        name: node.name().to_string(),
        op_type: node.op_type().to_string(),
        domain: node.domain().to_string(),
        inputs: node.input.clone(),
        outputs: node.output.clone(),
        attrs: node
            .attribute
            .iter()
            .map(|a| (a.name().to_string(), attr(a)))
            .collect(),
    }
}

/// An attribute by its declared type, or (old files without `type`) by the field that is set.
fn attr(a: &AttributeProto) -> Attr {
    match a.type_() {
        1 => Attr::Float(a.f()),
        2 => Attr::Int(a.i()),
        3 => Attr::Bytes(a.s().to_vec()),
        6 => Attr::Floats(a.floats.clone()),
        7 => Attr::Ints(a.ints.clone()),
        0 if !a.floats.is_empty() => Attr::Floats(a.floats.clone()),
        0 if !a.ints.is_empty() => Attr::Ints(a.ints.clone()),
        0 if a.s.is_some() => Attr::Bytes(a.s().to_vec()),
        0 if a.f.is_some() => Attr::Float(a.f()),
        0 if a.i.is_some() => Attr::Int(a.i()),
        _ => Attr::Other,
    }
}

/// A small numeric tensor's values as f64 (`None` when large, not numeric, or unreadable).
fn values(model: &OnnxModel, entry: &TensorEntry) -> Option<Vec<f64>> {
    if entry.shape.iter().product::<usize>() > MAX_VALUES {
        return None;
    }
    let bytes = model.tensor_bytes(entry).ok()?;
    decode(entry.dtype, &bytes)
}

/// Little-endian values of `dtype` as f64, for the numeric dtypes.
pub(crate) fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f64>> {
    fn each<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut b = [0; N];
                b.copy_from_slice(c);
                f(b)
            })
            .collect()
    }
    Some(match dtype {
        Dtype::F64 => each(bytes, f64::from_le_bytes),
        Dtype::F32 => each(bytes, |b| f64::from(f32::from_le_bytes(b))),
        Dtype::F16 => each(bytes, |b| half::f16::from_le_bytes(b).to_f64()),
        Dtype::BF16 => each(bytes, |b| half::bf16::from_le_bytes(b).to_f64()),
        Dtype::I64 => each(bytes, |b| i64::from_le_bytes(b) as f64),
        Dtype::I32 => each(bytes, |b| f64::from(i32::from_le_bytes(b))),
        Dtype::I16 => each(bytes, |b| f64::from(i16::from_le_bytes(b))),
        Dtype::I8 => each(bytes, |b: [u8; 1]| f64::from(b[0] as i8)),
        Dtype::U64 => each(bytes, |b| u64::from_le_bytes(b) as f64),
        Dtype::U32 => each(bytes, |b| f64::from(u32::from_le_bytes(b))),
        Dtype::U16 => each(bytes, |b| f64::from(u16::from_le_bytes(b))),
        Dtype::U8 | Dtype::BOOL => each(bytes, |b: [u8; 1]| f64::from(b[0])),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_dtypes_decode_little_endian() {
        assert_eq!(
            decode(Dtype::F16, &[0x00, 0x3c, 0x00, 0xc0]),
            Some(vec![1.0, -2.0])
        );
        assert_eq!(decode(Dtype::I8, &[0xff, 0x02]), Some(vec![-1.0, 2.0]));
        assert_eq!(decode(Dtype::I64, &(-3i64).to_le_bytes()), Some(vec![-3.0]));
        assert_eq!(decode(Dtype::BF16, &[0x80, 0x3f]), Some(vec![1.0]));
        assert_eq!(decode(Dtype::C64, &[0; 8]), None);
    }
}
