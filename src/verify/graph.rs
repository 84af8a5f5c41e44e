//! Runs a whole ONNX graph with tract on seeded random input and compares two graphs'
//! outputs: the end-to-end check of a deploy graph against its train graph.
//!
//! The flow: [`Graph::load`] reads the graph from its path (external-data side files are
//! found next to it; tract refuses a `location` that is absolute, has `..`, or resolves
//! through a symlink outside the graph's folder), fixes every input's shape (the graph's
//! own static dims; a symbolic dim must come from an [`InputSpec`]), and plans it with tract;
//! [`Graph::random_inputs`] draws the inputs; [`Graph::run`] returns every graph output as
//! f64 values; [`compare`] matches two runs' outputs by name. [`run_graph`] and
//! [`run_graph_with`] do the first three in one call.
//!
//! Random inputs are uniform in [-1, 1), drawn from a ChaCha8 stream (seed `seed`, stream =
//! the input's position), in f64 and then rounded to the input's dtype (f16, f32 or f64); the
//! returned [`Tensor64`] holds the rounded values, so feeding them to a second graph with an
//! input of the same dtype gives it exactly the same numbers.
//!
//! tract can panic on graphs it does not expect; every call into it here runs under
//! `catch_unwind` and a panic becomes [`RunError::Panic`] (the default panic hook still
//! prints the panic message to stderr).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use safetensors::Dtype;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable,
    IntoTValue, TValue, TVec, Tensor, TractError, TypedRunnableModel,
};

/// The error tract (or the protobuf decoder under it) gave, with its whole context chain.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong loading, running or comparing graphs. Each names the file and the input,
/// output or node at fault; tract's own error chain is kept as the source.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The file cannot be read or is not an ONNX `ModelProto`.
    #[error("{}: not a readable ONNX graph", path.display())]
    Read {
        /// The graph file.
        path: PathBuf,
        /// tract's error.
        source: Source,
    },
    /// tract cannot build, type or optimize the graph (its chain names the node).
    #[error("{}: tract cannot {stage} the graph", path.display())]
    Load {
        /// The graph file.
        path: PathBuf,
        /// What was being done: `parse`, `type`, `declutter`, `optimize`, `plan`.
        stage: &'static str,
        /// tract's error.
        source: Source,
    },
    /// tract failed while running the graph.
    #[error("{}: tract failed running the graph", path.display())]
    Run {
        /// The graph file.
        path: PathBuf,
        /// tract's error.
        source: Source,
    },
    /// tract panicked; the graph is one it does not handle.
    #[error("{}: tract panicked while trying to {stage} the graph: {message}", path.display())]
    Panic {
        /// The graph file.
        path: PathBuf,
        /// What was being done.
        stage: &'static str,
        /// The panic's message.
        message: String,
    },
    /// An initializer's `raw_data` length disagrees with its dims and element type.
    #[error("{}: initializer `{tensor}` has {len} bytes of raw_data, its shape {shape:?} needs {expected}", path.display())]
    RawData {
        /// The graph file.
        path: PathBuf,
        /// The initializer.
        tensor: String,
        /// Its dims.
        shape: Vec<i64>,
        /// Its raw_data length.
        len: usize,
        /// The length its dims and element type need.
        expected: u64,
    },
    /// A nodes' input is not produced by any node, initializer or graph input.
    #[error("{}: node inputs {names:?} are produced by nothing in the graph", path.display())]
    Unresolved {
        /// The graph file.
        path: PathBuf,
        /// The dangling tensor names.
        names: Vec<String>,
    },
    /// An input shape spec is malformed.
    #[error("input shape `{spec}`: {why} (expected e.g. `1x3x224x224` or `images:1x3x640x640`)")]
    BadSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// A spec or a tensor names an input the graph does not have.
    #[error("{}: the graph has no input `{name}` (its inputs: {inputs:?})", path.display())]
    UnknownInput {
        /// The graph file.
        path: PathBuf,
        /// The name given.
        name: String,
        /// The graph's inputs.
        inputs: Vec<String>,
    },
    /// A spec without a name, for a graph of several inputs.
    #[error("{}: the graph has several inputs {inputs:?}; name the one each shape is for (`name:1x3x64x64`)", path.display())]
    UnnamedSpec {
        /// The graph file.
        path: PathBuf,
        /// The graph's inputs.
        inputs: Vec<String>,
    },
    /// An input has a symbolic dim and no shape was given for it.
    #[error("{}: input `{input}` has symbolic dim `{dim}` (shape {graph}); give its shape, e.g. --input-shape {input}:{}", path.display(), example_shape(graph))]
    MissingShape {
        /// The graph file.
        path: PathBuf,
        /// The input.
        input: String,
        /// The symbolic dim's name (`?` when the graph leaves it unnamed).
        dim: String,
        /// The graph's shape of the input, e.g. `[batch,3,16,16]`.
        graph: String,
    },
    /// A given shape (spec or tensor) disagrees with the graph's static shape of the input.
    #[error("{}: input `{input}` has shape {graph} in the graph, given {given:?}", path.display())]
    ShapeMismatch {
        /// The graph file.
        path: PathBuf,
        /// The input.
        input: String,
        /// The graph's shape of the input.
        graph: String,
        /// The shape given.
        given: Vec<usize>,
    },
    /// No tensor was given for a graph input.
    #[error("{}: no value given for graph input `{input}`", path.display())]
    MissingInput {
        /// The graph file.
        path: PathBuf,
        /// The input.
        input: String,
    },
    /// A tensor's value count disagrees with its shape.
    #[error("tensor `{name}` has {len} values for shape {shape:?}")]
    BadTensor {
        /// The tensor.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Its number of values.
        len: usize,
    },
    /// An input or output whose element type is not a number this runner handles.
    #[error("{}: {what} `{name}` has element type {dtype}; only f16, f32 and f64 inputs (and numeric outputs) are supported", path.display())]
    Dtype {
        /// The graph file.
        path: PathBuf,
        /// `input` or `output`.
        what: &'static str,
        /// Its name.
        name: String,
        /// Its element type.
        dtype: String,
    },
    /// The two runs do not have the same outputs.
    #[error("the graphs' outputs differ: {train:?} against {deploy:?}")]
    OutputSet {
        /// The first (train) graph's output names.
        train: Vec<String>,
        /// The second (deploy) graph's output names.
        deploy: Vec<String>,
    },
    /// An output has different shapes in the two runs.
    #[error(
        "output `{name}` has shape {train:?} in the train graph and {deploy:?} in the deploy graph"
    )]
    OutputShape {
        /// The output.
        name: String,
        /// Its shape in the train graph.
        train: Vec<usize>,
        /// Its shape in the deploy graph.
        deploy: Vec<usize>,
    },
}

/// The shape to run one graph input at: `name` `None` is the graph's only input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputSpec {
    /// The graph input, or `None` for a graph of one input.
    pub name: Option<String>,
    /// The full shape, static dims included.
    pub shape: Vec<usize>,
}

impl InputSpec {
    /// Parses `1x3x64x64` or `name:1x3x64x64` (the name is everything before the last `:`).
    pub fn parse(spec: &str) -> Result<InputSpec, RunError> {
        let bad = |why: &str| RunError::BadSpec {
            spec: spec.to_string(),
            why: why.to_string(),
        };
        let (name, dims) = match spec.rsplit_once(':') {
            Some(("", _)) => return Err(bad("empty input name")),
            Some((name, dims)) => (Some(name.to_string()), dims),
            None => (None, spec),
        };
        let shape = dims
            .split(['x', 'X'])
            .map(|d| d.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad("each dim must be a non-negative integer"))?;
        Ok(InputSpec { name, shape })
    }
}

/// A named tensor of any float dtype, its values widened to f64 (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor64 {
    /// The graph input's or output's name.
    pub name: String,
    /// The dtype it has in the graph (`F16`, `F32`, `F64`, or an integer type for outputs).
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub values: Vec<f64>,
}

/// How far one output of the deploy graph is from the train graph's.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputDeviation {
    /// The output.
    pub name: String,
    /// The output's dtype in the train graph.
    pub dtype: Dtype,
    /// `max |train − deploy|`; infinite where one is NaN and the other is not.
    pub max_abs: f64,
    /// `max_abs / max_abs_output` (0 when both are 0, infinite when only the output is 0).
    pub max_rel: f64,
    /// `max |train|`, the scale of the output.
    pub max_abs_output: f64,
}

impl OutputDeviation {
    /// Whether `max_abs ≤ atol + rtol · max_abs_output`.
    pub fn within(&self, atol: f64, rtol: f64) -> bool {
        self.max_abs <= atol + rtol * self.max_abs_output
    }
}

/// How much tract transforms the graph before running it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Optimization {
    /// Typed only (`into_typed`): tract's ops as the graph wrote them.
    Typed,
    /// `into_typed` + `into_decluttered`: simplified, not yet mapped to tract's kernels.
    Decluttered,
    /// `into_optimized`: decluttered and mapped to tract's optimized kernels.
    #[default]
    Optimized,
}

/// A graph input: its dtype and its dims as the graph declares them.
#[derive(Clone, Debug)]
struct GraphInput {
    name: String,
    dtype: DatumType,
    dims: Vec<Option<String>>,
    sizes: Vec<usize>,
    /// The graph gives no shape at all: any rank, from a spec.
    unranked: bool,
}

impl GraphInput {
    /// `[batch,3,16,16]`, symbolic dims by name.
    fn describe(&self) -> String {
        if self.unranked {
            return "(no shape)".to_string();
        }
        let dims: Vec<String> = self
            .dims
            .iter()
            .zip(&self.sizes)
            .map(|(d, s)| d.clone().unwrap_or_else(|| s.to_string()))
            .collect();
        format!("[{}]", dims.join(","))
    }
}

/// A graph loaded, its input shapes fixed, and planned by tract: ready to run.
pub struct Graph {
    path: PathBuf,
    inputs: Vec<GraphInput>,
    outputs: Vec<String>,
    plan: Arc<TypedRunnableModel>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

/// Runs `f` and turns a panic into [`RunError::Panic`].
fn guarded<T>(
    path: &Path,
    stage: &'static str,
    f: impl FnOnce() -> Result<T, RunError>,
) -> Result<T, RunError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        Err(RunError::Panic {
            path: path.to_path_buf(),
            stage,
            message,
        })
    })
}

impl Graph {
    /// Loads the graph at `path` and fixes its input shapes: each input's static dims from the
    /// graph, the full shape from `specs` where given (which must agree with the static
    /// dims); an input left with a symbolic dim is an error naming it.
    pub fn load(path: &Path, specs: &[InputSpec], opt: Optimization) -> Result<Graph, RunError> {
        guarded(path, "load", || Graph::load_unguarded(path, specs, opt))
    }

    fn load_unguarded(
        path: &Path,
        specs: &[InputSpec],
        opt: Optimization,
    ) -> Result<Graph, RunError> {
        let onnx = tract_onnx::onnx();
        let mut proto = onnx
            .proto_model_for_path(path)
            .map_err(|e| RunError::Read {
                path: path.to_path_buf(),
                source: e.into(),
            })?;
        let graph = proto.graph.as_ref().ok_or_else(|| RunError::Read {
            path: path.to_path_buf(),
            source: "the ModelProto has no graph".into(),
        })?;
        check_raw_data(path, graph)?;
        let mut inputs = graph_inputs(path, graph)?;
        apply_specs(path, &mut inputs, specs)?;
        let outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        if let Some(graph) = proto.graph.as_mut() {
            split_f16_gemms(graph);
        }
        let dir = path.parent().and_then(Path::to_str);
        let parsed = onnx.parse(&proto, dir).map_err(load_error(path, "parse"))?;
        drop(proto);
        if !parsed.unresolved_inputs.is_empty() {
            return Err(RunError::Unresolved {
                path: path.to_path_buf(),
                names: parsed.unresolved_inputs,
            });
        }
        let mut model = parsed.model;
        let inputs = set_input_facts(path, &mut model, &inputs)?;
        Ok(Graph {
            path: path.to_path_buf(),
            inputs,
            outputs,
            plan: plan(path, model, opt)?,
        })
    }

    /// The graph file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The inputs' names and the shapes they run at, in the graph's order.
    pub fn input_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.inputs
            .iter()
            .map(|i| (i.name.clone(), i.sizes.clone()))
            .collect()
    }

    /// The graph outputs' names, in the graph's order.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Seeded random inputs, one per graph input: uniform in [-1, 1) (ChaCha8, `seed`, stream =
    /// input position), rounded to the input's dtype.
    pub fn random_inputs(&self, seed: u64) -> Result<Vec<Tensor64>, RunError> {
        guarded(&self.path, "draw inputs for", || {
            self.random_unguarded(seed)
        })
    }

    fn random_unguarded(&self, seed: u64) -> Result<Vec<Tensor64>, RunError> {
        self.inputs
            .iter()
            .enumerate()
            .map(|(stream, input)| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(stream as u64);
                let n: usize = input.sizes.iter().product();
                let wide: Vec<f64> = (0..n)
                    .map(|_| {
                        // 53 random bits → [0, 1) → [-1, 1)
                        let unit = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                        2.0 * unit - 1.0
                    })
                    .collect();
                let tensor = self.tract_input(input, &wide)?;
                Ok(Tensor64 {
                    name: input.name.clone(),
                    dtype: safetensors_dtype(input.dtype).unwrap_or(Dtype::F32),
                    shape: input.sizes.clone(),
                    values: self.widen("input", &input.name, &tensor)?,
                })
            })
            .collect()
    }

    /// Runs the graph on `inputs` (one per graph input, by name, each of the shape the graph
    /// was loaded for; values are cast to the input's dtype) and returns every graph output.
    pub fn run(&self, inputs: &[Tensor64]) -> Result<Vec<Tensor64>, RunError> {
        guarded(&self.path, "run", || self.run_unguarded(inputs))
    }

    fn run_unguarded(&self, inputs: &[Tensor64]) -> Result<Vec<Tensor64>, RunError> {
        let names: Vec<String> = self.inputs.iter().map(|i| i.name.clone()).collect();
        if let Some(extra) = inputs.iter().find(|t| !names.contains(&t.name)) {
            return Err(RunError::UnknownInput {
                path: self.path.clone(),
                name: extra.name.clone(),
                inputs: names,
            });
        }
        let mut values: TVec<TValue> = TVec::new();
        for input in &self.inputs {
            let given = inputs
                .iter()
                .find(|t| t.name == input.name)
                .ok_or_else(|| RunError::MissingInput {
                    path: self.path.clone(),
                    input: input.name.clone(),
                })?;
            check_tensor(given)?;
            if given.shape != input.sizes {
                return Err(RunError::ShapeMismatch {
                    path: self.path.clone(),
                    input: input.name.clone(),
                    graph: format!("{:?}", input.sizes),
                    given: given.shape.clone(),
                });
            }
            values.push(self.tract_input(input, &given.values)?.into_tvalue());
        }
        let outputs = self.plan.run(values).map_err(|e| RunError::Run {
            path: self.path.clone(),
            source: e.into(),
        })?;
        outputs
            .iter()
            .zip(&self.outputs)
            .map(|(t, name)| {
                let dtype = safetensors_dtype(t.datum_type()).ok_or_else(|| RunError::Dtype {
                    path: self.path.clone(),
                    what: "output",
                    name: name.clone(),
                    dtype: format!("{:?}", t.datum_type()),
                })?;
                Ok(Tensor64 {
                    name: name.clone(),
                    dtype,
                    shape: t.shape().to_vec(),
                    values: self.widen("output", name, t)?,
                })
            })
            .collect()
    }

    /// `values` as a tract tensor of the input's dtype and shape.
    fn tract_input(&self, input: &GraphInput, values: &[f64]) -> Result<Tensor, RunError> {
        let fail = |e: TractError| RunError::Run {
            path: self.path.clone(),
            source: e.context(format!("building input `{}`", input.name)).into(),
        };
        let wide = Tensor::from_shape::<f64>(&input.sizes, values).map_err(fail)?;
        Ok(wide.cast_to_dt(input.dtype).map_err(fail)?.into_owned())
    }

    /// A tract tensor's values as f64.
    fn widen(&self, what: &'static str, name: &str, t: &Tensor) -> Result<Vec<f64>, RunError> {
        let dtype_error = || RunError::Dtype {
            path: self.path.clone(),
            what,
            name: name.to_string(),
            dtype: format!("{:?}", t.datum_type()),
        };
        let wide = t.cast_to::<f64>().map_err(|_| dtype_error())?;
        let view = wide
            .to_plain_array_view::<f64>()
            .map_err(|_| dtype_error())?;
        Ok(view.iter().copied().collect())
    }
}

/// A [`RunError::Load`] of `path` at `stage`, from tract's error.
fn load_error(path: &Path, stage: &'static str) -> impl Fn(TractError) -> RunError {
    let path = path.to_path_buf();
    move |e| RunError::Load {
        path: path.clone(),
        stage,
        source: e.into(),
    }
}

/// Gives each of tract's sources its input's dtype and fixed shape; returns the inputs in
/// the order of tract's sources (the order [`Graph::run`] feeds them).
fn set_input_facts(
    path: &Path,
    model: &mut InferenceModel,
    inputs: &[GraphInput],
) -> Result<Vec<GraphInput>, RunError> {
    let sources = model
        .input_outlets()
        .map_err(load_error(path, "parse"))?
        .to_vec();
    let mut ordered = Vec::with_capacity(sources.len());
    for (ix, outlet) in sources.iter().enumerate() {
        let name = &model.node(outlet.node).name;
        let input = inputs
            .iter()
            .find(|i| &i.name == name)
            .ok_or_else(|| RunError::Load {
                path: path.to_path_buf(),
                stage: "parse",
                source: format!("tract made an input `{name}` the graph does not list").into(),
            })?
            .clone();
        let fact = InferenceFact::dt_shape(input.dtype, input.sizes.iter().copied());
        model
            .set_input_fact(ix, fact)
            .map_err(load_error(path, "parse"))?;
        ordered.push(input);
    }
    Ok(ordered)
}

/// Types the model, transforms it as `opt` says, and makes tract's plan of it.
fn plan(
    path: &Path,
    model: InferenceModel,
    opt: Optimization,
) -> Result<Arc<TypedRunnableModel>, RunError> {
    let typed = model.into_typed().map_err(load_error(path, "type"))?;
    let typed = match opt {
        Optimization::Typed => typed,
        Optimization::Decluttered => typed
            .into_decluttered()
            .map_err(load_error(path, "declutter"))?,
        Optimization::Optimized => typed
            .into_optimized()
            .map_err(load_error(path, "optimize"))?,
    };
    typed.into_runnable().map_err(load_error(path, "plan"))
}

/// Works around tract 0.23's `Gemm` in f16 graphs: its expansion multiplies C by an f32
/// `beta` constant, and typing then fails ("expected F16 got F32"). In a graph with f16
/// tensors, each `Gemm` with C and `alpha = beta = 1` becomes `[Transpose] → MatMul → Add`,
/// the same function (the MatMul keeps the node's name, so errors still name it).
fn split_f16_gemms(graph: &mut pb::GraphProto) {
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
fn split_gemm(node: &pb::NodeProto) -> Option<Vec<pb::NodeProto>> {
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
fn check_raw_data(path: &Path, graph: &pb::GraphProto) -> Result<(), RunError> {
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
fn graph_inputs(path: &Path, graph: &pb::GraphProto) -> Result<Vec<GraphInput>, RunError> {
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
fn declared_dim(d: &pb::tensor_shape_proto::Dimension) -> (Option<String>, usize) {
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
fn apply_specs(
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
fn fix_shape(
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
fn example_shape(graph: &str) -> String {
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
fn safetensors_dtype(dt: DatumType) -> Option<Dtype> {
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

fn check_tensor(t: &Tensor64) -> Result<(), RunError> {
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

/// Loads the graph at `path` (shapes from `specs` where its inputs have symbolic dims), runs it
/// on seeded random inputs (see [`Graph::random_inputs`]) and returns (inputs, outputs).
pub fn run_graph(
    path: &Path,
    specs: &[InputSpec],
    seed: u64,
    opt: Optimization,
) -> Result<(Vec<Tensor64>, Vec<Tensor64>), RunError> {
    let graph = Graph::load(path, specs, opt)?;
    let inputs = graph.random_inputs(seed)?;
    let outputs = graph.run(&inputs)?;
    Ok((inputs, outputs))
}

/// Loads the graph at `path` at the shapes of `inputs` (matched to the graph's inputs by name)
/// and runs it on them: how the deploy graph gets exactly the train graph's inputs.
pub fn run_graph_with(
    path: &Path,
    inputs: &[Tensor64],
    opt: Optimization,
) -> Result<Vec<Tensor64>, RunError> {
    let specs: Vec<InputSpec> = inputs
        .iter()
        .map(|t| InputSpec {
            name: Some(t.name.clone()),
            shape: t.shape.clone(),
        })
        .collect();
    Graph::load(path, &specs, opt)?.run(inputs)
}

/// Each output's deviation of `deploy` from `train`, in `train`'s order; refuses two runs whose
/// output names (as sets) or an output's shape differ.
pub fn compare(train: &[Tensor64], deploy: &[Tensor64]) -> Result<Vec<OutputDeviation>, RunError> {
    let mut a: Vec<String> = train.iter().map(|t| t.name.clone()).collect();
    let mut b: Vec<String> = deploy.iter().map(|t| t.name.clone()).collect();
    a.sort();
    b.sort();
    if a != b {
        return Err(RunError::OutputSet {
            train: a,
            deploy: b,
        });
    }
    train
        .iter()
        .map(|t| {
            // present: the sorted name lists are equal
            let d =
                deploy
                    .iter()
                    .find(|d| d.name == t.name)
                    .ok_or_else(|| RunError::OutputSet {
                        train: a.clone(),
                        deploy: b.clone(),
                    })?;
            check_tensor(t)?;
            check_tensor(d)?;
            if t.shape != d.shape {
                return Err(RunError::OutputShape {
                    name: t.name.clone(),
                    train: t.shape.clone(),
                    deploy: d.shape.clone(),
                });
            }
            Ok(deviation(t, d))
        })
        .collect()
}

fn deviation(train: &Tensor64, deploy: &Tensor64) -> OutputDeviation {
    let mut max_abs = 0.0f64;
    let mut max_abs_output = 0.0f64;
    for (&a, &b) in train.values.iter().zip(&deploy.values) {
        let diff = match (a.is_nan(), b.is_nan()) {
            (true, true) => 0.0,
            (false, false) if a == b => 0.0, // also equal infinities
            (false, false) => (a - b).abs(),
            _ => f64::INFINITY,
        };
        max_abs = max_abs.max(diff);
        if !a.is_nan() {
            max_abs_output = max_abs_output.max(a.abs());
        }
    }
    let max_rel = if max_abs == 0.0 {
        0.0
    } else {
        max_abs / max_abs_output
    };
    OutputDeviation {
        name: train.name.clone(),
        dtype: train.dtype,
        max_abs,
        max_rel,
        max_abs_output,
    }
}
