//! Runs a whole ONNX graph with tract on seeded random input and compares two graphs'
//! outputs: the end-to-end check of a deploy graph against its train graph.
//!
//! The flow: [`Graph::load`] reads the graph from its path (external-data side files are
//! found next to it; tract refuses a `location` that is absolute, has `..`, or resolves
//! through a symlink outside the graph's folder), fixes every input's shape (the graph's
//! own static dims; a symbolic dim must come from an [`InputSpec`]), and plans it with tract;
//! [`Graph::random_inputs`] draws the inputs; [`Graph::run`] returns every graph output as
//! f64 values; [`compare`] matches two runs' outputs by name. [`run_graph`] and
//! [`run_graph_with`] do the first three in one call. [`Graph::load_as`] with
//! [`Compute::F16AsF32`] runs an f16 graph widened to f32, as [`check_graphs`] does.
//!
//! Random inputs are uniform in [-1, 1), drawn from a ChaCha8 stream (seed `seed`, stream =
//! the input's position), in f64 and then rounded to the input's dtype (f16, f32 or f64); the
//! returned [`Tensor64`] holds the rounded values, so feeding them to a second graph with an
//! input of the same dtype gives it exactly the same numbers.
//!
//! tract can panic on graphs it does not expect; every call into it here runs under
//! `catch_unwind` and a panic becomes [`RunError::Panic`] (the default panic hook still
//! prints the panic message to stderr).

mod prep;

use prep::*;
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

/// The arithmetic a graph is run in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compute {
    /// As the graph is written: an f16 graph computes in f16 (what onnxruntime does; tract's
    /// f16 kernels are generic, not SIMD, on x86-64: RepVGG-B3 at 224×224 took minutes).
    #[default]
    AsWritten,
    /// Every f16 tensor, weight and op of the graph widened to f32 (tract's
    /// `FloatPrecisionTranslator`: f16 constants exactly widened, `Cast` to f16 made a cast to
    /// f32): the same weights and inputs, computed without f16's rounding of every op. Inputs
    /// are still drawn rounded to the declared dtype and outputs keep their declared dtype.
    /// The check of a deploy graph runs both graphs this way: what differs between them is then
    /// the rounding of the merged weights, not two orders of f16 arithmetic.
    F16AsF32,
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
    /// Each output's declared element type, where the graph declares a float one.
    output_dtypes: Vec<Option<Dtype>>,
    /// The graph's f16 inputs are fed as f32 (it was planned with [`Compute::F16AsF32`]).
    widened: bool,
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
        Graph::load_as(path, specs, opt, Compute::AsWritten)
    }

    /// [`Graph::load`], computing as `compute` says.
    pub fn load_as(
        path: &Path,
        specs: &[InputSpec],
        opt: Optimization,
        compute: Compute,
    ) -> Result<Graph, RunError> {
        guarded(path, "load", || {
            Graph::load_unguarded(path, specs, opt, compute)
        })
    }

    fn load_unguarded(
        path: &Path,
        specs: &[InputSpec],
        opt: Optimization,
        compute: Compute,
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
        let output_dtypes = graph.output.iter().map(declared_float).collect();
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
        let (plan, widened) = plan(path, model, opt, compute)?;
        Ok(Graph {
            path: path.to_path_buf(),
            inputs,
            outputs,
            output_dtypes,
            widened,
            plan,
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
            .zip(&self.output_dtypes)
            .map(|((t, name), declared)| {
                let dtype = safetensors_dtype(t.datum_type()).ok_or_else(|| RunError::Dtype {
                    path: self.path.clone(),
                    what: "output",
                    name: name.clone(),
                    dtype: format!("{:?}", t.datum_type()),
                })?;
                // A widened f16 output is still reported as the f16 output it is.
                let dtype = match declared {
                    Some(Dtype::F16) if self.widened && dtype == Dtype::F32 => Dtype::F16,
                    _ => dtype,
                };
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
        let declared = wide.cast_to_dt(input.dtype).map_err(fail)?.into_owned();
        if self.widened && input.dtype == DatumType::F16 {
            // The f16 values, exactly, as the f32 the widened graph reads.
            return Ok(declared
                .cast_to_dt(DatumType::F32)
                .map_err(fail)?
                .into_owned());
        }
        Ok(declared)
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

/// Types the model, widens its f16 to f32 if `compute` says so (and it has any), transforms it
/// as `opt` says, and makes tract's plan of it; says whether it widened.
fn plan(
    path: &Path,
    model: InferenceModel,
    opt: Optimization,
    compute: Compute,
) -> Result<(Arc<TypedRunnableModel>, bool), RunError> {
    let mut typed = model.into_typed().map_err(load_error(path, "type"))?;
    let widen = compute == Compute::F16AsF32 && has_f16(&typed);
    if widen {
        use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
        use tract_onnx::tract_core::transform::ModelTransform;
        FloatPrecisionTranslator::new(DatumType::F16, DatumType::F32)
            .transform(&mut typed)
            .map_err(load_error(path, "widen f16 to f32 in"))?;
    }
    let typed = match opt {
        Optimization::Typed => typed,
        Optimization::Decluttered => typed
            .into_decluttered()
            .map_err(load_error(path, "declutter"))?,
        Optimization::Optimized => typed
            .into_optimized()
            .map_err(load_error(path, "optimize"))?,
    };
    let plan = typed.into_runnable().map_err(load_error(path, "plan"))?;
    Ok((plan, widen))
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
    Graph::load(path, &specs_of(inputs), opt)?.run(inputs)
}

/// The shapes of `inputs`, by name.
fn specs_of(inputs: &[Tensor64]) -> Vec<InputSpec> {
    inputs
        .iter()
        .map(|t| InputSpec {
            name: Some(t.name.clone()),
            shape: t.shape.clone(),
        })
        .collect()
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

/// Default tolerance `(atol, rtol)` for a whole graph's outputs in `dtype`: rounding compounds
/// through every layer, so it is looser than a block's (the framework's own deploy export of
/// the fixtures is 1e-7 to 4e-7 of the output's max off the train graph in f32).
pub fn default_graph_tolerance(dtype: Dtype) -> (f64, f64) {
    match dtype {
        Dtype::F64 => (0.0, 1e-10),
        Dtype::F16 | Dtype::BF16 => (0.0, 2e-2),
        _ => (0.0, 1e-4),
    }
}

/// Runs the `train` and `deploy` graphs whole on the same seeded input (shapes from `specs`,
/// `name:NxCxHxW` or `NxCxHxW`, for symbolic dims) and compares every output within
/// `(atol, rtol)` (`None`: the default of the coarser of the outputs' dtype and `weights`, the
/// dtype the graph computes in — an f16 graph with f32 inputs and outputs is still f16 inside);
/// returns the check and a failure per output over tolerance.
pub fn check_graphs(
    train: &Path,
    deploy: &Path,
    specs: &[String],
    seed: u64,
    (atol, rtol): (Option<f64>, Option<f64>),
    weights: Dtype,
) -> Result<(crate::report::GraphCheck, Vec<crate::report::Failure>), RunError> {
    let specs = specs
        .iter()
        .map(|s| InputSpec::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    // Both graphs computed in f32 where they are f16 (see [`Compute::F16AsF32`]); one at a time.
    let (opt, compute) = (Optimization::default(), Compute::F16AsF32);
    let (inputs, train_out) = {
        let graph = Graph::load_as(train, &specs, opt, compute)?;
        let inputs = graph.random_inputs(seed)?;
        let outputs = graph.run(&inputs)?;
        (inputs, outputs)
    };
    let deploy_graph = Graph::load_as(deploy, &specs_of(&inputs), opt, compute)?;
    let deploy_out = deploy_graph.run(&inputs)?;
    drop(deploy_graph);
    let devs = compare(&train_out, &deploy_out)?;
    let out = devs.first().map_or(Dtype::F32, |d| d.dtype);
    let coarser = |a: Dtype, b: Dtype| if a.bitsize() <= b.bitsize() { a } else { b };
    let (a, r) = default_graph_tolerance(coarser(out, weights));
    let (atol, rtol) = (atol.unwrap_or(a), rtol.unwrap_or(r));
    let mut failures = Vec::new();
    let outputs = devs
        .iter()
        .map(|d| {
            if !d.within(atol, rtol) {
                failures.push(crate::report::Failure {
                    name: d.name.clone(),
                    reason: format!(
                        "graph output: deviation {:.3e} (relative {:.3e}) is over the tolerance {atol:.1e} + {rtol:.1e} × {:.3e}",
                        d.max_abs, d.max_rel, d.max_abs_output
                    ),
                    max_abs_deviation: Some(d.max_abs),
                    max_rel_deviation: Some(d.max_rel),
                    kind: crate::report::FailureKind::Output,
                    tolerance: Some([atol, rtol]),
                    worst_element: None,
                });
            }
            crate::report::OutputCheck {
                name: d.name.clone(),
                max_abs_deviation: d.max_abs,
                max_rel_deviation: d.max_rel,
                max_abs_output: d.max_abs_output,
            }
        })
        .collect();
    let check = crate::report::GraphCheck {
        inputs: inputs
            .iter()
            .map(|t| {
                let dims: Vec<String> = t.shape.iter().map(usize::to_string).collect();
                format!("{}:{}", t.name, dims.join("x"))
            })
            .collect(),
        seed,
        atol,
        rtol,
        passed: failures.is_empty(),
        outputs,
    };
    Ok((check, failures))
}
