//! The JSON report: what was found, what was written, and how far fused is from unfused; the
//! `inspect` listing; and their renderings, each a pure function of the types here: [`text`]
//! (what the binary prints), [`junit`] (JUnit XML), [`markdown`] (the GitHub job summary) and
//! [`github`] (GitHub Actions `::error` lines).

pub mod github;
pub mod junit;
pub mod lint;
pub mod markdown;
pub mod text;

use std::fmt;

use serde::Serialize;

use crate::block::Block;
use crate::deviation::{Deviation, WorstElement};
use crate::int8::{Int8Report, Int8Summary};

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The tool and its version.
    pub tool: Tool,
    /// `convert` or `verify`.
    pub command: String,
    /// The train checkpoint.
    pub input: String,
    /// The deploy file written (convert) or judged (verify).
    pub output: String,
    /// The layout the blocks were found with.
    pub layout: LayoutInfo,
    /// The BN ε used, and why.
    pub bn_eps: EpsInfo,
    /// The input the deviations were measured on.
    pub probe: Probe,
    /// One entry per fused block, in file order.
    pub blocks: Vec<BlockReport>,
    /// Candidates of a layout with generic names that were left alone, and why.
    pub skipped: Vec<Skipped>,
    /// Totals and the worst block.
    pub summary: Summary,
    /// The verification, when one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyReport>,
    /// For ONNX graphs: both graphs run whole (with verification).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph: Option<GraphCheck>,
    /// Where the tensors of a PyTorch checkpoint came from (absent for safetensors input).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::checkpoint::SourceInfo>,
    /// What the user should know that did not stop the run (the binary prints each).
    pub warnings: Vec<Warning>,
}

impl Report {
    /// False when a verification ran and found a block or tensor off.
    pub fn verified(&self) -> bool {
        self.verify.as_ref().is_none_or(|v| v.passed)
    }

    /// Puts the whole-graph check in the report: `graph`, and its worst output deviation in
    /// `summary`.
    pub fn set_graph(&mut self, check: Option<GraphCheck>) {
        if let Some(g) = &check {
            let worst = |f: fn(&OutputCheck) -> f64| {
                (g.outputs.iter()).map(f).fold(0.0, |a: f64, b| {
                    if a.is_nan() || b.is_nan() {
                        f64::NAN
                    } else {
                        a.max(b)
                    }
                })
            };
            self.summary.graph_max_abs_deviation = Some(worst(|o| o.max_abs_deviation));
            self.summary.graph_max_rel_deviation = Some(worst(|o| o.max_rel_deviation));
        }
        self.graph = check;
    }

    /// Whether the report is of a conversion (else of a `verify`).
    pub fn converting(&self) -> bool {
        self.command == "convert"
    }
}

/// Something the user should know that did not stop the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Warning {
    /// What it is about.
    pub kind: WarningKind,
    /// The text, naming the file (printed as `warning: {message}`).
    pub message: String,
}

/// What a [`Warning`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    /// A PyTorch pickle names globals a checkpoint does not need (nothing was imported or run).
    SuspiciousGlobals,
    /// A checkpoint holds raw and EMA weights; the warning says which one was read.
    RawAndEma,
}

impl Warning {
    /// The warning on a checkpoint in `path` holding two sets of weights: `used` was read (the
    /// EMA one if `used_is_ema`), `other` was not, by `convention`.
    pub fn raw_and_ema(
        path: &std::path::Path,
        used: &str,
        other: &str,
        used_is_ema: bool,
        convention: &str,
    ) -> Warning {
        let (used_kind, other_kind) = if used_is_ema {
            ("EMA", "raw")
        } else {
            ("raw", "EMA")
        };
        Warning {
            kind: WarningKind::RawAndEma,
            message: format!(
                "{}: the checkpoint holds raw and EMA weights; read the {used_kind} weights `{used}` ({convention}); pass --key {other} for the {other_kind} weights",
                path.display()
            ),
        }
    }

    /// The warning on a pickle in `path` that names `globals` a checkpoint does not need.
    pub fn suspicious_globals(path: &std::path::Path, globals: &[String]) -> Warning {
        Warning {
            kind: WarningKind::SuspiciousGlobals,
            message: format!(
                "{}: the pickle names globals a checkpoint does not need: {}. Nothing was imported or run (the file is read as data and its tensors are converted), but treat the file's origin as suspect.",
                path.display(),
                globals.join(", ")
            ),
        }
    }
}

/// Tool name and version.
#[derive(Debug, Clone, Serialize)]
pub struct Tool {
    /// `repvgg-fuse`.
    pub name: &'static str,
    /// The crate version.
    pub version: &'static str,
}

impl Default for Tool {
    fn default() -> Self {
        Tool {
            name: env!("CARGO_PKG_NAME"),
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// Which layout, and how it was chosen.
#[derive(Debug, Clone, Serialize)]
pub struct LayoutInfo {
    /// Layout id.
    pub name: String,
    /// The frameworks that use it.
    pub description: String,
    /// How it was chosen.
    pub chosen_by: ChosenBy,
}

/// How the layout was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ChosenBy {
    /// Detected from the tensor names among the built-in layouts.
    #[serde(rename = "detected")]
    Detected,
    /// Named with `--layout`.
    #[serde(rename = "--layout")]
    Layout,
    /// Read from `--layout-file`.
    #[serde(rename = "--layout-file")]
    LayoutFile,
}

impl ChosenBy {
    /// `detected`, `--layout` or `--layout-file`, as in the JSON report.
    pub fn as_str(self) -> &'static str {
        match self {
            ChosenBy::Detected => "detected",
            ChosenBy::Layout => "--layout",
            ChosenBy::LayoutFile => "--layout-file",
        }
    }
}

impl fmt::Display for ChosenBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The BN ε.
#[derive(Debug, Clone, Serialize)]
pub struct EpsInfo {
    /// The value.
    pub value: f64,
    /// Where it came from.
    pub source: String,
}

/// The random input deviations are measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// The probe or the verification input.
    pub kind: ProbeKind,
    /// `[h, w]` of the verification input; null for the probe (k×k per block).
    pub input_size: Option<[usize; 2]>,
    /// Images per block.
    pub batch: usize,
    /// Seed of the ChaCha8 stream; block i uses stream i.
    pub seed: u64,
}

/// Which input a [`Probe`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// Cheap: each block's own k×k input, compared at the centre output, where every tap of
    /// every kernel is used once.
    Probe,
    /// `--verify`: the whole output of an `input_size` input, borders included.
    Verify,
}

/// What a block is: its name and shape, as found in the checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct BlockInfo {
    /// The block prefix exactly as in the checkpoint.
    pub name: String,
    /// The framework's name for the kind of block (`RepMixer`), when the layout gives one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// The branches fused, by their path under the block.
    pub branches: Vec<String>,
    /// Each branch's op chain (`conv3x3+bn`, `-(identity+bn+scale)`), then `post:…`.
    pub ops: Vec<String>,
    /// Input channels, when the weights settle them (see `groups`).
    pub in_channels: Option<usize>,
    /// Output channels.
    pub out_channels: usize,
    /// Input channels per group (the kernel's second dimension).
    pub in_channels_per_group: usize,
    /// Groups: known when the block has an identity branch (in == out), else null.
    pub groups: Option<usize>,
    /// Fused kernel size: k for a k×k kernel, the larger side of a kh×kw one.
    pub kernel: usize,
    /// Fused kernel `[kh, kw]`.
    pub kernel_shape: [usize; 2],
    /// Whether an identity branch was fused.
    pub identity: bool,
    /// What the block's form rests on that no tensor shows, and what decided it: QARepVGG's
    /// tensorless identity, `rbr_identity: yes (rule in == out: 8 → 8)` or `… (--identity)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub assumed: Vec<String>,
    /// For a block of an ONNX graph: the nodes it merges and the node that replaces them
    /// (absent for a checkpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_nodes: Option<GraphNodes>,
}

/// A block of an ONNX graph by the graph's node names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GraphNodes {
    /// The train graph's nodes the block merges (branches, joining adds, ops after the sum),
    /// in graph order.
    pub nodes: Vec<String>,
    /// The node `convert` writes in their place (`/stages.0/stages.0.1/Conv`).
    pub merged_node: String,
    /// Its op: `Conv` or `Gemm`.
    pub merged_op: String,
}

impl From<&Block> for BlockInfo {
    fn from(block: &Block) -> Self {
        BlockInfo {
            name: block.name.clone(),
            kind: block.kind.clone(),
            branches: block.branches.iter().map(|b| b.label.clone()).collect(),
            ops: block.described.clone(),
            in_channels: block.in_channels(),
            out_channels: block.out_channels,
            in_channels_per_group: block.in_per_group,
            groups: block.groups,
            kernel: block.side(),
            kernel_shape: [block.kernel.0, block.kernel.1],
            identity: block.has_identity(),
            assumed: block.assumed.clone(),
            graph_nodes: None,
        }
    }
}

/// One fused block.
#[derive(Debug, Clone, Serialize)]
pub struct BlockReport {
    /// Name and shape.
    #[serde(flatten)]
    pub block: BlockInfo,
    /// Layout id.
    pub layout: String,
    /// dtype of the fused tensors.
    pub dtype: String,
    /// Name of the fused weight.
    pub deploy_weight: String,
    /// Name of the fused bias.
    pub deploy_bias: String,
    /// max |fused − unfused| over the block's output.
    pub max_abs_deviation: f64,
    /// max |fused − unfused| / max |unfused|.
    pub max_rel_deviation: f64,
    /// max |unfused|.
    pub max_abs_output: f64,
    /// INT8 readiness of the fused weight as written ([`crate::int8`]); null when the deploy
    /// file has no usable fused weight for the block.
    pub int8: Option<Int8Report>,
}

impl BlockReport {
    /// The report entry of `block`, with its fused dtype and deviation.
    pub fn new(block: &Block, layout: &str, dtype: &str, dev: Deviation) -> Self {
        BlockReport {
            block: block.into(),
            layout: layout.to_string(),
            dtype: dtype.to_string(),
            deploy_weight: block.deploy_weight.clone(),
            deploy_bias: block.deploy_bias.clone(),
            max_abs_deviation: dev.max_abs,
            max_rel_deviation: dev.max_rel,
            max_abs_output: dev.max_abs_output,
            int8: None,
        }
    }
}

/// A candidate that was not fused.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The prefix.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// Totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Blocks fused.
    pub blocks: usize,
    /// The worst block's max |fused − unfused|.
    pub max_abs_deviation: f64,
    /// The worst block's relative deviation.
    pub max_rel_deviation: f64,
    /// The block with the largest relative deviation.
    pub worst_block: Option<String>,
    /// Tensors in the input.
    pub tensors_in: usize,
    /// Tensors in the output.
    pub tensors_out: usize,
    /// Tensors copied unchanged.
    pub tensors_passed_through: usize,
    /// Branch tensors replaced by fused ones (BN step counters included).
    pub tensors_dropped: usize,
    /// Elements in the input.
    pub parameters_in: usize,
    /// Elements in the output.
    pub parameters_out: usize,
    /// Size of the input file.
    pub bytes_in: u64,
    /// Size of the output file.
    pub bytes_out: u64,
    /// INT8 readiness of the model: the blocks that lose most ([`crate::int8`]).
    pub int8: Option<Int8Summary>,
    /// Nodes of an ONNX graph read (absent for a checkpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes_in: Option<usize>,
    /// Nodes of the ONNX graph written or judged (absent for a checkpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes_out: Option<usize>,
    /// Both ONNX graphs run whole (with verification): the largest max |train − deploy| over
    /// the graph's outputs (absent otherwise; see `graph`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_max_abs_deviation: Option<f64>,
    /// The same, over each output's max |train|: the largest of the outputs'.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_max_rel_deviation: Option<f64>,
}

impl Summary {
    /// Sets the worst-block fields from `blocks`.
    pub fn set_worst(&mut self, blocks: &[BlockReport]) {
        self.blocks = blocks.len();
        self.int8 = Int8Summary::of(
            blocks
                .iter()
                .map(|b| (b.block.name.as_str(), b.int8.as_ref())),
        );
        let worst = blocks.iter().max_by(|a, b| {
            a.max_rel_deviation
                .partial_cmp(&b.max_rel_deviation)
                .unwrap_or(if a.max_rel_deviation.is_nan() {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Less
                })
        });
        if let Some(w) = worst {
            self.worst_block = Some(w.block.name.clone());
            self.max_rel_deviation = w.max_rel_deviation;
        }
        self.max_abs_deviation = blocks
            .iter()
            .map(|b| b.max_abs_deviation)
            .fold(0.0, |a, b| {
                if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.max(b)
                }
            });
    }
}

/// Both ONNX graphs run whole on the same seeded input, every output compared.
#[derive(Debug, Clone, Serialize)]
pub struct GraphCheck {
    /// The shape each graph input was run at, `name:NxCxHxW`.
    pub inputs: Vec<String>,
    /// Seed of the input.
    pub seed: u64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Relative tolerance, against max |train output|.
    pub rtol: f64,
    /// Every output, compared.
    pub outputs: Vec<OutputCheck>,
    /// Whether every output is within tolerance.
    pub passed: bool,
}

/// One graph output, train against deploy.
#[derive(Debug, Clone, Serialize)]
pub struct OutputCheck {
    /// The output's name.
    pub name: String,
    /// max |train − deploy|.
    pub max_abs_deviation: f64,
    /// That over max |train|.
    pub max_rel_deviation: f64,
    /// max |train|.
    pub max_abs_output: f64,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Whether every block and tensor passed.
    pub passed: bool,
    /// Absolute tolerance.
    pub atol: f64,
    /// Relative tolerance (against max |unfused| of the block).
    pub rtol: f64,
    /// `[h, w]` of the input.
    pub input_size: [usize; 2],
    /// Images per block.
    pub batch: usize,
    /// Seed.
    pub seed: u64,
    /// Blocks over tolerance or with a missing / mis-shaped fused tensor.
    pub failures: Vec<Failure>,
}

impl VerifyReport {
    /// How many of the failures are blocks'.
    pub fn block_failures(&self) -> usize {
        (self.failures.iter())
            .filter(|f| f.kind == FailureKind::Block)
            .count()
    }
}

/// A block or tensor that failed verification.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// Block prefix, or tensor name for a pass-through tensor.
    pub name: String,
    /// What is wrong.
    pub reason: String,
    /// The deviation, when the block could be run.
    pub max_abs_deviation: Option<f64>,
    /// The relative deviation, when the block could be run.
    pub max_rel_deviation: Option<f64>,
    /// Which check failed.
    pub kind: FailureKind,
    /// `[atol, rtol]` the block was held to, when it was run.
    pub tolerance: Option<[f64; 2]>,
    /// Where fused and unfused differ most, when the block was run.
    pub worst_element: Option<WorstElement>,
}

/// Which check a [`Failure`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// A block over tolerance, or whose fused tensors are missing, mis-shaped or not floating
    /// point.
    Block,
    /// A pass-through tensor missing from the deploy file.
    Missing,
    /// A tensor in the deploy file that is neither fused nor passed through.
    Extra,
    /// A pass-through tensor with another shape or other values than in the train file.
    Altered,
    /// An output of the whole deploy graph over tolerance against the train graph's.
    Output,
}

impl FailureKind {
    /// The deploy-file checks, in the order they are reported.
    pub const DEPLOY_CHECKS: [FailureKind; 3] = [
        FailureKind::Missing,
        FailureKind::Extra,
        FailureKind::Altered,
    ];

    /// The name of the check (`missing tensors`); `block` for a block.
    pub fn check_name(self) -> &'static str {
        match self {
            FailureKind::Block => "block",
            FailureKind::Missing => "missing tensors",
            FailureKind::Extra => "extra tensors",
            FailureKind::Altered => "altered tensors",
            FailureKind::Output => "graph outputs",
        }
    }

    /// What a failure of the check says about a tensor (`missing from the deploy file`).
    pub fn what(self) -> &'static str {
        match self {
            FailureKind::Block => "failed",
            FailureKind::Missing => "missing from the deploy file",
            FailureKind::Extra => "in the deploy file but not expected there",
            FailureKind::Altered => "changed from the train file",
            FailureKind::Output => "of the deploy graph off the train graph's",
        }
    }
}

/// `--int8-min-db`: the gate on each fused block's per-channel INT8 SQNR, and the blocks below
/// it.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Gate {
    /// The lowest per-channel SQNR a block may have, in dB.
    pub min_db: f64,
    /// The blocks below it, in file order.
    pub low: Vec<LowBlock>,
}

impl Int8Gate {
    /// Whether no block is below the gate.
    pub fn passed(&self) -> bool {
        self.low.is_empty()
    }
}

/// A block below the INT8 gate.
#[derive(Debug, Clone, PartialEq)]
pub struct LowBlock {
    /// The block prefix.
    pub name: String,
    /// Its per-channel INT8 SQNR, in dB.
    pub per_channel_sqnr_db: f64,
}

/// What `inspect` shows: the blocks found and the deploy file that would be written.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The file.
    pub input: String,
    /// The layout.
    pub layout: LayoutInfo,
    /// The BN ε that would be used.
    pub bn_eps: EpsInfo,
    /// The blocks.
    pub blocks: Vec<InspectBlock>,
    /// Candidates left alone.
    pub skipped: Vec<Skipped>,
    /// Tensors that pass through unchanged.
    pub passthrough: Vec<String>,
    /// The deploy file's tensors: name, dtype, shape.
    pub output: Vec<OutputTensor>,
    /// Nodes of an ONNX graph read (absent for a checkpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes_in: Option<usize>,
    /// Nodes the deploy graph would have (absent for a checkpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes_out: Option<usize>,
    /// What the user should know (the binary prints each).
    pub warnings: Vec<Warning>,
}

/// A block as `inspect` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InspectBlock {
    /// Name and shape.
    #[serde(flatten)]
    pub block: BlockInfo,
    /// Tensors it consumes.
    pub tensors: Vec<String>,
    /// With `inspect --int8` (which fuses the block): max |fused − unfused| on the block's
    /// probe input, as `convert` reports it without `--verify`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_abs_deviation: Option<f64>,
    /// The same, over max |unfused|.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rel_deviation: Option<f64>,
    /// INT8 readiness of the fused weight `convert` would write, with `inspect --int8` (absent
    /// without it, or where the weight would not fit the output dtype). Fusing for these reads
    /// the block's weights twice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub int8: Option<Int8Report>,
}

/// A tensor of the would-be deploy file.
#[derive(Debug, Clone, Serialize)]
pub struct OutputTensor {
    /// Name.
    pub name: String,
    /// dtype.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Where its values come from.
    pub source: OutputSource,
}

/// Where an [`OutputTensor`]'s values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputSource {
    /// A train tensor copied as it is.
    Copy,
    /// A train tensor cast to the output dtype.
    Cast,
    /// A fused weight or bias.
    Fused,
}
