//! A plain view of an ONNX graph for finding blocks by topology.
use std::collections::BTreeMap;
/// A graph as the finder sees it.
pub struct Graph {
    /// nodes in file order
    pub nodes: Vec<Node>,
    /// graph inputs that are not initializers
    pub inputs: Vec<String>,
    /// graph outputs
    pub outputs: Vec<String>,
    /// constant tensors: initializers, Constant node outputs, Identity aliases of those
    pub constants: BTreeMap<String, Constant>,
}
/// A constant tensor.
pub struct Constant {
    /// dims
    pub dims: Vec<i64>,
    /// ONNX TensorProto.DataType code
    pub data_type: i32,
    /// the values as f64 when the tensor has at most 4096 elements and a numeric type
    pub values: Option<Vec<f64>>,
}
/// One node.
pub struct Node {
    /// its index in GraphProto.node
    pub index: usize,
    /// its name
    pub name: String,
    /// its operator
    pub op_type: String,
    /// its operator's domain
    pub domain: String,
    /// its input tensor names
    pub inputs: Vec<String>,
    /// its output tensor names
    pub outputs: Vec<String>,
    /// its attributes by name
    pub attrs: BTreeMap<String, Attr>,
}
/// A node attribute.
pub enum Attr {
    /// an integer
    Int(i64),
    /// a float
    Float(f32),
    /// integers
    Ints(Vec<i64>),
    /// floats
    Floats(Vec<f32>),
    /// a string, as bytes
    Bytes(Vec<u8>),
    /// any other kind
    Other,
}
