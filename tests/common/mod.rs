//! Helpers the integration tests share: safetensors files read and written with the
//! `safetensors` crate (never with this crate's own reader), float decoding, ulp distance,
//! and running the binary.
// Each test file uses the helpers it needs; the rest would warn in that test's build.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Output;

use assert_cmd::Command;
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// A tensor of a safetensors file, owned.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its little-endian bytes.
    pub data: Vec<u8>,
}

/// A file's tensors by name.
pub type Tensors = BTreeMap<String, Tensor>;

/// The tensors of the safetensors file at `path`.
pub fn read_st(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: bad safetensors file: {e:?}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let t = Tensor {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            (name, t)
        })
        .collect()
}

/// The `__metadata__` of the safetensors file at `path`.
pub fn read_metadata(path: &Path) -> Option<HashMap<String, String>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .unwrap_or_else(|e| panic!("{}: bad safetensors header: {e:?}", path.display()));
    meta.metadata().clone()
}

/// Writes `tensors` (and `metadata`) as a safetensors file at `path`.
pub fn write_st(path: &Path, tensors: &Tensors, metadata: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, t)| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

/// A float tensor's elements as f64.
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    let chunks = |n: usize| t.data.chunks_exact(n);
    match t.dtype {
        Dtype::F64 => chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F32 => chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F16 => chunks(2)
            .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        Dtype::BF16 => chunks(2)
            .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f64())
            .collect(),
        d => panic!("not a float dtype: {d:?}"),
    }
}

/// Maps a float bit pattern of `width` bits to an integer that is monotone in the value,
/// with +0 and −0 both at 0: the difference of two is their distance in ulps.
pub fn ordered(bits: u64, width: u32) -> i64 {
    let sign = 1u64 << (width - 1);
    if bits & sign != 0 {
        -((bits & !sign) as i64)
    } else {
        bits as i64
    }
}

/// The binary, with the GitHub variables of the environment the tests run in removed (a test
/// sets them when it means to).
pub fn bin() -> Command {
    let mut cmd = Command::cargo_bin("repvgg-fuse").expect("the repvgg-fuse binary is built");
    cmd.env_remove("GITHUB_ACTIONS")
        .env_remove("GITHUB_STEP_SUMMARY");
    cmd
}

/// Runs `cmd` to its end.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("repvgg-fuse runs")
}

/// Exit code, stdout and stderr, for an assertion message.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The run's stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The folder of fixture `case` under `fixtures/`.
pub fn fixture(case: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(case)
}

/// How many ulps of `dtype` (F32 or F64) lie between `a` and `b`, each rounded to `dtype`.
pub fn ulps_apart(a: f64, b: f64, dtype: Dtype) -> i64 {
    let bits = |v: f64| match dtype {
        Dtype::F32 => ordered(u64::from((v as f32).to_bits()), 32),
        Dtype::F64 => ordered(v.to_bits(), 64),
        d => panic!("no ulps for {d:?}"),
    };
    (bits(a) - bits(b)).abs()
}

/// The stored inputs and onnxruntime outputs of a graph (`<name>.expected.safetensors` of
/// fixtures/onnx_run: keys `input.NAME` and `output.NAME`), as the runner's tensors.
pub fn ort_expected(
    path: &Path,
) -> (
    Vec<repvgg_fuse::verify::graph::Tensor64>,
    Vec<repvgg_fuse::verify::graph::Tensor64>,
) {
    io_tensors(path, |kind| kind != "input")
}

/// A fixture graph folder's stored input and onnxruntime's outputs of its train graph
/// (`io.safetensors`: keys `input.NAME` and `train.NAME`).
pub fn stored_io(
    dir: &Path,
) -> (
    Vec<repvgg_fuse::verify::graph::Tensor64>,
    Vec<repvgg_fuse::verify::graph::Tensor64>,
) {
    io_tensors(&dir.join("io.safetensors"), |kind| kind == "train")
}

/// The `input.NAME` tensors of `path`, and those whose `KIND` of `KIND.NAME` is an output,
/// as the runner's tensors.
fn io_tensors(
    path: &Path,
    output: impl Fn(&str) -> bool,
) -> (
    Vec<repvgg_fuse::verify::graph::Tensor64>,
    Vec<repvgg_fuse::verify::graph::Tensor64>,
) {
    let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
    for (key, t) in &read_st(path) {
        let (kind, tensor_name) = key.split_once('.').expect("KIND.NAME");
        let tensor = repvgg_fuse::verify::graph::Tensor64 {
            name: tensor_name.to_string(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            values: to_f64(t),
        };
        if kind == "input" {
            inputs.push(tensor);
        } else if output(kind) {
            outputs.push(tensor);
        }
    }
    (inputs, outputs)
}

/// A fixture folder's `case.json`.
pub fn case_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).expect("case.json"))
        .expect("valid case.json")
}

/// How many nodes of each op type the graph at `path` has.
pub fn op_counts(path: &Path) -> BTreeMap<String, usize> {
    let model = repvgg_fuse::onnx::OnnxModel::open(path).unwrap_or_else(|e| panic!("{e}"));
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for n in &model.graph().node {
        *counts
            .entry(n.op_type.clone().unwrap_or_default())
            .or_default() += 1;
    }
    counts
}

/// `dir`'s `train.onnx` converted with `--verify` into `out`, both graphs run whole at input
/// `shape` (`name:NxCxHxW`): the process's output, and the report written beside `out`
/// (`Null` when there is none).
pub fn convert_graph(dir: &Path, out: &Path, shape: &str) -> (Output, serde_json::Value) {
    let o = bin()
        .arg(dir.join("train.onnx"))
        .arg("-o")
        .arg(out)
        .args(["--verify", "-q", "--input-shape", shape])
        .output()
        .expect("runs");
    let report = std::fs::read_to_string(out.with_extension("report.json"))
        .map(|r| serde_json::from_str(&r).expect("the report is JSON"))
        .unwrap_or(serde_json::Value::Null);
    (o, report)
}

/// A folder's name (a fixture case's).
pub fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .expect("a name")
        .to_string_lossy()
        .into_owned()
}

/// A converted fixture: the temp folder (kept alive), the deploy file, the report.
pub struct Converted {
    /// The temp folder holding the outputs.
    pub dir: tempfile::TempDir,
    /// The deploy file.
    pub output: std::path::PathBuf,
    /// The JSON report.
    pub report: serde_json::Value,
}

/// `repvgg-fuse <fixtures/case>/train.safetensors -o … --report … --verify`, which must exit 0.
pub fn convert_verified(case: &str) -> Converted {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("deploy.safetensors");
    let report = dir.path().join("report.json");
    let out = bin()
        .arg(fixture(case).join("train.safetensors"))
        .arg("-o")
        .arg(&output)
        .arg("--report")
        .arg(&report)
        .arg("--verify")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{case}: convert --verify failed:\n{}",
        describe(&out)
    );
    let text = std::fs::read_to_string(&report).expect("report written");
    Converted {
        dir,
        output,
        report: serde_json::from_str(&text).expect("report is JSON"),
    }
}
