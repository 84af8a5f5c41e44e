//! The graph view the block finder works on: nodes in the graph's order, with their
//! attributes, and the constant tensors (dims, type and small values). It knows nothing of
//! protobuf; a reader fills it from a `ModelProto`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One ONNX graph, as the block finder sees it.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Graph {
    /// Every node, in the graph's order; `nodes[i].index == i`.
    pub nodes: Vec<Node>,
    /// The graph inputs that are not initializers (the data the graph is run on).
    pub inputs: Vec<String>,
    /// The graph outputs.
    pub outputs: Vec<String>,
    /// Constant tensors by name: initializers, `Constant` node outputs, and `Identity`
    /// aliases of those.
    pub constants: BTreeMap<String, Constant>,
}

/// A constant tensor's shape and type, and its values when it is small.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Constant {
    /// The tensor's dimensions (empty for a scalar).
    pub dims: Vec<i64>,
    /// The element type, as ONNX `TensorProto.DataType` numbers it (1 = FLOAT, 7 = INT64, …).
    pub data_type: i32,
    /// The values as f64, when the tensor has at most 4096 numeric elements.
    pub values: Option<Vec<f64>>,
}

/// One node of the graph.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Node {
    /// The node's position in [`Graph::nodes`].
    pub index: usize,
    /// The node's name (may be empty).
    pub name: String,
    /// The operator, e.g. `Conv`.
    pub op_type: String,
    /// The operator's domain; empty (or `ai.onnx`) for the standard operators.
    pub domain: String,
    /// Input tensor names, in order; an empty name is an omitted optional input.
    pub inputs: Vec<String>,
    /// Output tensor names, in order.
    pub outputs: Vec<String>,
    /// Attributes by name.
    pub attrs: BTreeMap<String, Attr>,
}

/// A node attribute's value; the kinds the block finder reads, and [`Attr::Other`] for the
/// rest (tensors, graphs, …).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub enum Attr {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f32),
    /// A list of integers.
    Ints(Vec<i64>),
    /// A list of floats.
    Floats(Vec<f32>),
    /// A string, as bytes.
    Bytes(Vec<u8>),
    /// Any other kind.
    Other,
}

impl Node {
    /// Whether the node is a standard ONNX operator of type `op`.
    pub fn is(&self, op: &str) -> bool {
        self.op_type == op && (self.domain.is_empty() || self.domain == "ai.onnx")
    }

    /// The integer attribute `name`, if present and an integer.
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.attrs.get(name) {
            Some(Attr::Int(v)) => Some(*v),
            _ => None,
        }
    }

    /// The float attribute `name`, if present and a float.
    pub fn float(&self, name: &str) -> Option<f32> {
        match self.attrs.get(name) {
            Some(Attr::Float(v)) => Some(*v),
            _ => None,
        }
    }

    /// The integer-list attribute `name`, if present and a list of integers.
    pub fn ints(&self, name: &str) -> Option<&[i64]> {
        match self.attrs.get(name) {
            Some(Attr::Ints(v)) => Some(v),
            _ => None,
        }
    }

    /// The string attribute `name`, if present and valid UTF-8.
    pub fn string(&self, name: &str) -> Option<&str> {
        match self.attrs.get(name) {
            Some(Attr::Bytes(v)) => std::str::from_utf8(v).ok(),
            _ => None,
        }
    }

    /// The node's name, or `#index op_type` when it has none, for messages.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            format!("#{} {}", self.index, self.op_type)
        } else {
            self.name.clone()
        }
    }
}

impl Constant {
    /// The number of elements (1 for a scalar); `None` for a negative dimension.
    pub fn numel(&self) -> Option<usize> {
        self.dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
    }
}
