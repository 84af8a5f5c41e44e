//! ONNX graphs: reading, merging and checking train-form graphs (issue 17).
pub mod run;
