//! Preparing a graph for tract: its inputs' shapes fixed (symbolic dims from the caller),
//! f16 `Gemm`s split (tract multiplies by an f32 `beta`), `raw_data` lengths checked, and what
//! tells an f16 graph.

use super::*;

/// Works around tract 0.23's `Gemm` in f16 graphs: its expansion multiplies C by an f32
/// `beta` constant, and typing then fails ("expected F16 got F32"). In a graph with f16
/// tensors, each `Gemm` with C and `alpha = beta = 1` becomes `[Transpose] → MatMul → Add`,
/// the same function (the MatMul keeps the node's name, so errors still name it).
pub(super) fn split_f16_gemms(graph: &mut pb::GraphProto) {
    let f16 = DataType::Float16 as i32;
    let has_f16 = graph.initializer.iter().any(|t| t.data_type == f16)
        || graph.input.iter().any(|vi| {
            matches!(vi.r#type.as_ref().and_then(|t| t.value.as_ref()),
                Some(pb::type_proto::Value::TensorType(t)) if t.elem_type == f16)
        });
    if !has_f16 {
        return;
    }
    let nodes = std::mem::take(&mut graph.node);
    for node in nodes {
        match split_gemm(&node) {
            Some(parts) => graph.node.extend(parts),
            None => graph.node.push(node),
        }
    }
}

/// `[Transpose] → MatMul → Add` for a `Gemm` with C and `alpha = beta = 1`, else `None`.
pub(super) fn split_gemm(node: &pb::NodeProto) -> Option<Vec<pb::NodeProto>> {
    let attr = |name: &str| node.attribute.iter().find(|a| a.name == name);
    let unit = |name: &str| attr(name).is_none_or(|a| a.f == 1.0);
    let transposed = |name: &str| attr(name).is_some_and(|a| a.i != 0);
    let is_gemm = node.op_type == "Gemm" && (node.domain.is_empty() || node.domain == "ai.onnx");
    if !is_gemm || node.input.len() != 3 || node.input[2].is_empty() || node.output.len() != 1 {
        return None;
    }
    if !unit("alpha") || !unit("beta") {
        return None;
    }
    let out = &node.output[0];
    let simple = |op: &str, name: String, input: Vec<String>, output: String| pb::NodeProto {
        op_type: op.to_string(),
        name,
        input,
        output: vec![output],
        ..Default::default()
    };
    let mut parts = Vec::new();
    let mut operand = |ix: usize, key: &str| {
        if !transposed(key) {
            return node.input[ix].clone();
        }
        let t_out = format!("{out}.repvgg_fuse_{key}");
        let mut t = simple(
            "Transpose",
            format!("{}.{key}", node.name),
            vec![node.input[ix].clone()],
            t_out.clone(),
        );
        t.attribute.push(pb::AttributeProto {
            name: "perm".to_string(),
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ints: vec![1, 0],
            ..Default::default()
        });
        parts.push(t);
        t_out
    };
    let a = operand(0, "transA");
    let b = operand(1, "transB");
    let ab = format!("{out}.repvgg_fuse_ab");
    parts.push(simple("MatMul", node.name.clone(), vec![a, b], ab.clone()));
    let c = node.input[2].clone();
    parts.push(simple(
        "Add",
        format!("{}.c", node.name),
        vec![ab, c],
        out.clone(),
    ));
    Some(parts)
}

/// Refuses an inline initializer whose `raw_data` length disagrees with its dims (tract's own
/// message does not name the tensor).
pub(super) fn check_raw_data(path: &Path, graph: &pb::GraphProto) -> Result<(), RunError> {
    for t in graph.initializer.iter().filter(|t| !t.raw_data.is_empty()) {
        let width: u64 = match DataType::try_from(t.data_type) {
            Ok(DataType::Uint8 | DataType::Int8 | DataType::Bool) => 1,
            Ok(DataType::Uint16 | DataType::Int16 | DataType::Float16 | DataType::Bfloat16) => 2,
            Ok(DataType::Uint32 | DataType::Int32 | DataType::Float) => 4,
            Ok(DataType::Uint64 | DataType::Int64 | DataType::Double) => 8,
            _ => continue,
        };
        let count = t.dims.iter().try_fold(1u64, |n, &d| {
            u64::try_from(d).ok().and_then(|d| n.checked_mul(d))
        });
        let expected = count.and_then(|c| c.checked_mul(width));
        if expected != Some(t.raw_data.len() as u64) {
            return Err(RunError::RawData {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                shape: t.dims.clone(),
                len: t.raw_data.len(),
                expected: expected.unwrap_or(u64::MAX),
            });
        }
    }
    Ok(())
}

/// The graph's inputs that are not initializers, with their dtype and declared dims.
pub(super) fn graph_inputs(
    path: &Path,
    graph: &pb::GraphProto,
) -> Result<Vec<GraphInput>, RunError> {
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut inputs = Vec::new();
    for vi in graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
    {
        let tensor = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(pb::type_proto::Value::TensorType(t)) => t,
            _ => {
                return Err(RunError::Dtype {
                    path: path.to_path_buf(),
                    what: "input",
                    name: vi.name.clone(),
                    dtype: "(not a tensor)".to_string(),
                });
            }
        };
        let dtype = match DataType::try_from(tensor.elem_type) {
            Ok(DataType::Float16) => DatumType::F16,
            Ok(DataType::Float) => DatumType::F32,
            Ok(DataType::Double) => DatumType::F64,
            other => {
                return Err(RunError::Dtype {
                    path: path.to_path_buf(),
                    what: "input",
                    name: vi.name.clone(),
                    dtype: other.map_or(format!("#{}", tensor.elem_type), |d| format!("{d:?}")),
                });
            }
        };
        let (dims, sizes) = tensor
            .shape
            .as_ref()
            .map(|s| s.dim.iter().map(declared_dim).unzip())
            .unwrap_or_default();
        inputs.push(GraphInput {
            name: vi.name.clone(),
            dtype,
            dims,
            sizes,
            unranked: tensor.shape.is_none(),
        });
    }
    Ok(inputs)
}

/// A declared dim: `(None, size)` when static, `(Some(name), 1)` when symbolic (the 1 stands
/// in until a spec gives the size; an unnamed or negative dim is named `?` or its value).
pub(super) fn declared_dim(d: &pb::tensor_shape_proto::Dimension) -> (Option<String>, usize) {
    match &d.value {
        Some(DimValue::DimValue(v)) if *v >= 0 => (None, *v as usize),
        Some(DimValue::DimParam(p)) if !p.is_empty() => (Some(p.clone()), 1),
        Some(DimValue::DimValue(v)) => (Some(v.to_string()), 1),
        _ => (Some("?".to_string()), 1),
    }
}

/// Fills the inputs' sizes: static dims from the graph, specs over them; refuses a spec for an
/// unknown input, an unnamed spec for a graph of several inputs, a spec that disagrees with a
/// static dim, and an input left with a symbolic dim.
pub(super) fn apply_specs(
    path: &Path,
    inputs: &mut [GraphInput],
    specs: &[InputSpec],
) -> Result<(), RunError> {
    let names: Vec<String> = inputs.iter().map(|i| i.name.clone()).collect();
    let mut given: Vec<Option<&InputSpec>> = vec![None; inputs.len()];
    for spec in specs {
        let ix = match &spec.name {
            Some(name) => {
                names
                    .iter()
                    .position(|n| n == name)
                    .ok_or_else(|| RunError::UnknownInput {
                        path: path.to_path_buf(),
                        name: name.clone(),
                        inputs: names.clone(),
                    })?
            }
            None if inputs.len() == 1 => 0,
            None => {
                return Err(RunError::UnnamedSpec {
                    path: path.to_path_buf(),
                    inputs: names,
                });
            }
        };
        given[ix] = Some(spec);
    }
    for (input, spec) in inputs.iter_mut().zip(given) {
        fix_shape(path, input, spec)?;
    }
    Ok(())
}

/// Sets `input.sizes` from the graph's static dims and the spec, if any.
pub(super) fn fix_shape(
    path: &Path,
    input: &mut GraphInput,
    spec: Option<&InputSpec>,
) -> Result<(), RunError> {
    let graph = input.describe();
    match spec {
        Some(spec) => {
            let agrees = input.unranked
                || spec.shape.len() == input.dims.len()
                    && input
                        .dims
                        .iter()
                        .zip(&input.sizes)
                        .zip(&spec.shape)
                        .all(|((d, s), g)| d.is_some() || s == g);
            if !agrees {
                return Err(RunError::ShapeMismatch {
                    path: path.to_path_buf(),
                    input: input.name.clone(),
                    graph,
                    given: spec.shape.clone(),
                });
            }
            input.sizes = spec.shape.clone();
        }
        None if input.unranked => {
            return Err(RunError::MissingShape {
                path: path.to_path_buf(),
                input: input.name.clone(),
                dim: "(rank)".to_string(),
                graph,
            });
        }
        None => {
            if let Some(dim) = input.dims.iter().flatten().next() {
                return Err(RunError::MissingShape {
                    path: path.to_path_buf(),
                    input: input.name.clone(),
                    dim: dim.clone(),
                    graph,
                });
            }
        }
    }
    Ok(())
}

/// `[batch,3,16,16]` → `1x3x16x16`: the graph's shape with 1 for each symbolic dim (for a
/// graph input without a shape, an example image shape).
pub(super) fn example_shape(graph: &str) -> String {
    let Some(dims) = graph.strip_prefix('[').and_then(|g| g.strip_suffix(']')) else {
        return "1x3x224x224".to_string();
    };
    let dims: Vec<&str> = dims
        .split(',')
        .map(|d| if d.parse::<usize>().is_ok() { d } else { "1" })
        .collect();
    dims.join("x")
}

/// The safetensors name of a tract element type, for the numeric ones.
pub(super) fn safetensors_dtype(dt: DatumType) -> Option<Dtype> {
    Some(match dt {
        DatumType::Bool => Dtype::BOOL,
        DatumType::U8 => Dtype::U8,
        DatumType::U16 => Dtype::U16,
        DatumType::U32 => Dtype::U32,
        DatumType::U64 => Dtype::U64,
        DatumType::I8 => Dtype::I8,
        DatumType::I16 => Dtype::I16,
        DatumType::I32 => Dtype::I32,
        DatumType::I64 => Dtype::I64,
        DatumType::F16 => Dtype::F16,
        DatumType::F32 => Dtype::F32,
        DatumType::F64 => Dtype::F64,
        _ => return None,
    })
}

pub(super) fn check_tensor(t: &Tensor64) -> Result<(), RunError> {
    let n: usize = t.shape.iter().product();
    if n != t.values.len() {
        return Err(RunError::BadTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            len: t.values.len(),
        });
    }
    Ok(())
}

/// Whether any tensor of the typed model is f16.
pub(super) fn has_f16(model: &tract_onnx::prelude::TypedModel) -> bool {
    model
        .nodes()
        .iter()
        .flat_map(|n| n.outputs.iter())
        .any(|o| o.fact.datum_type == DatumType::F16)
}

/// The float element type a graph output declares (`None` for others or none).
pub(super) fn declared_float(vi: &pb::ValueInfoProto) -> Option<Dtype> {
    match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(t)) => match DataType::try_from(t.elem_type) {
            Ok(DataType::Float16) => Some(Dtype::F16),
            Ok(DataType::Float) => Some(Dtype::F32),
            Ok(DataType::Double) => Some(Dtype::F64),
            _ => None,
        },
        _ => None,
    }
}
