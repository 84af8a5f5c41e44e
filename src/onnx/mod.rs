//! ONNX graphs: a plain view of a graph's nodes and constants ([`graph`]) and the blocks of
//! parallel linear branches found in it by topology ([`topology`]).
pub mod graph;
pub mod topology;
