//! ONNX graphs as a tensor-and-node source: a plain view of a graph's nodes and constants
//! ([`graph`]). Finding blocks in it by topology is the job of the `find` stage.
pub mod graph;
