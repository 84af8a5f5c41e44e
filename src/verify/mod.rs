//! Judging a deploy file against its train file: every block run both ways — the train
//! block op by op ([`forward::forward_unfused`]), the deploy conv as written — on the same
//! seeded random input, and every other tensor compared with the train file's.

pub mod forward;
#[cfg(feature = "graph-run")]
pub mod graph;

use std::collections::BTreeSet;

use ndarray::Array2;
use rayon::prelude::*;
use safetensors::Dtype;

use crate::Error;
use crate::block::values::{ChannelValues, read_rows};
use crate::block::{Block, Op, kernel_hw};
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::conv::{BlockInput, Input, KernelGeometry};
use crate::deviation::{self, Deviation};
use crate::dtype::{encode, float_width};
use crate::find::Detection;
use crate::int8::{self, ConvRows, OutputSqnr, Sqnr};
use crate::progress::Cancel;
use crate::report::{Failure, FailureKind, VerifyReport};
use forward::forward_unfused;

/// How fused and unfused blocks are compared.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Seed of the random inputs.
    pub seed: u64,
    /// Verification input `[h, w]`; `None` for the default.
    pub input_size: Option<[usize; 2]>,
    /// Images per block.
    pub batch: usize,
    /// Absolute tolerance; `None` for the dtype's default.
    pub atol: Option<f64>,
    /// Shapes to run whole ONNX graphs at (`name:NxCxHxW`), for their symbolic dims.
    pub input_shapes: Vec<String>,
    /// Relative tolerance; `None` for the dtype's default.
    pub rtol: Option<f64>,
    /// The INT8 figures that cost a computation of their own: in verification the output
    /// SQNR with per-channel INT8 weights (an f32 GEMM per chunk, `--int8-output`); in
    /// `inspect` the fused weights' figures (every block fused, `inspect --int8`).
    pub int8: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            seed: 0,
            input_size: None,
            batch: 1,
            atol: None,
            rtol: None,
            input_shapes: Vec::new(),
            int8: false,
        }
    }
}

impl CheckOptions {
    /// `(atol, rtol)` for fused tensors stored as `dtype`: the options', else the dtype's.
    pub fn tolerance(&self, dtype: Dtype) -> (f64, f64) {
        let (a, r) = default_tolerance(dtype);
        (self.atol.unwrap_or(a), self.rtol.unwrap_or(r))
    }
}

/// f64 weights run through one GEMM when verifying (8 MB): big enough for the GEMM to be
/// efficient, small enough to bound memory per block.
const VERIFY_CHUNK: usize = 1 << 20;

/// Default verification input side, raised to the kernel size where a kernel is larger.
pub const DEFAULT_VERIFY_SIZE: usize = 8;

/// Default tolerances `(atol, rtol)` for fused tensors stored as `dtype`: a few units of the
/// dtype's rounding, so a correct file passes and a wrong ε or a dropped bias does not.
pub fn default_tolerance(dtype: Dtype) -> (f64, f64) {
    match dtype {
        Dtype::F64 => (1e-12, 1e-10),
        Dtype::F16 => (1e-3, 1e-2),
        Dtype::BF16 => (1e-2, 5e-2),
        _ => (1e-6, 1e-5),
    }
}

/// The verification input size: the option's, else 8×8 or the largest kernel; refused when a
/// kernel does not fit.
fn input_size(detection: &Detection, opts: &CheckOptions) -> Result<[usize; 2], Error> {
    let max_k = detection.blocks.iter().map(Block::side).max().unwrap_or(1);
    let side = DEFAULT_VERIFY_SIZE.max(max_k);
    let [h, w] = opts.input_size.unwrap_or([side, side]);
    match detection
        .blocks
        .iter()
        .find(|b| b.kernel.0 > h || b.kernel.1 > w)
    {
        Some(b) => Err(Error::Usage(format!(
            "--input-size {h}x{w} is smaller than the {}×{} kernel of block `{}`; borders and interior would not both be tested",
            b.kernel.0, b.kernel.1, b.name,
        ))),
        None => Ok([h, w]),
    }
}

/// What [`check_deploy`] finds.
#[derive(Debug)]
pub struct Checked {
    /// The verdict.
    pub report: VerifyReport,
    /// Each block's deviation (`None` where the fused tensors are missing or mis-shaped).
    pub deviations: Vec<Option<Deviation>>,
    /// Each block's output SQNR with per-channel INT8 weights (`None`: not run)
    /// ([`crate::int8::output_sums`]; `Some(None)`: exact; `None`: not run).
    pub int8_output: Vec<Option<OutputSqnr>>,
}

/// A block run both ways: its deviation and INT8 output sums, or why it could not be run.
type BlockOutcome = Result<(Deviation, Option<Sqnr>), String>;

/// Judges `deploy` against the blocks of `train`: every block run both ways on the verification
/// input, every other tensor compared.
pub fn check_deploy(
    train: &Checkpoint,
    deploy: &Checkpoint,
    detection: &Detection,
    opts: &CheckOptions,
    cancel: &Cancel,
) -> Result<Checked, Error> {
    let size = input_size(detection, opts)?;
    let batch = opts.batch.max(1);
    // Tolerances reported are those of the blocks' (first) dtype.
    let report_dtype = detection
        .blocks
        .first()
        .and_then(|b| deploy.get(&b.deploy_weight).map(|t| t.dtype))
        .unwrap_or(Dtype::F32);
    let (atol, rtol) = opts.tolerance(report_dtype);
    // The largest blocks first, one at a time to whichever thread is free: in file order the
    // largest (B3's last, a third of its weights) started last and ran alone at the end.
    let blocks = &detection.blocks;
    let mut order: Vec<usize> = (0..blocks.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(blocks[i].out_channels * blocks[i].row_len()));
    let mut done: Vec<(usize, Result<BlockOutcome, Error>)> = order
        .par_iter()
        .with_max_len(1)
        .map(|&i| {
            let run = Run {
                train,
                deploy,
                block: &blocks[i],
                int8: opts.int8,
            };
            let outcome = cancel
                .check()
                .and_then(|()| run.deviation(size, batch, opts.seed, i as u64));
            (i, outcome)
        })
        .collect();
    // Back in file order.
    done.sort_unstable_by_key(|(i, _)| *i);
    let results = done.into_iter().map(|(_, outcome)| outcome);
    let mut failures = Vec::new();
    let mut devs = Vec::new();
    let mut int8_output = Vec::new();
    for (block, result) in detection.blocks.iter().zip(results) {
        let result = result?;
        let dtype = deploy
            .get(&block.deploy_weight)
            .map_or(Dtype::F32, |t| t.dtype);
        let dev = result.as_ref().map(|(d, _)| *d).map_err(String::clone);
        failures.extend(judge(block, &dev, opts.tolerance(dtype)));
        devs.push(dev.ok());
        int8_output.push(result.ok().and_then(|(_, q)| q.map(|q| q.db().into())));
    }
    failures.extend(check_passthrough(train, deploy, detection)?);
    let report = VerifyReport {
        passed: failures.is_empty(),
        atol,
        rtol,
        input_size: size,
        batch,
        seed: opts.seed,
        failures,
    };
    Ok(Checked {
        report,
        deviations: devs,
        int8_output,
    })
}

/// The failure of a block whose deviation is over `(atol, rtol)` or that could not be run.
fn judge(block: &Block, result: &Result<Deviation, String>, (a, r): (f64, f64)) -> Option<Failure> {
    match result {
        Ok(dev) if dev.within(a, r) => None,
        Ok(dev) => Some(Failure {
            name: block.name.clone(),
            reason: format!(
                "deviation {:.3e} (relative {:.3e}) is over the tolerance {a:.1e} + {r:.1e} × {:.3e}",
                dev.max_abs, dev.max_rel, dev.max_abs_output
            ),
            max_abs_deviation: Some(dev.max_abs),
            max_rel_deviation: Some(dev.max_rel),
            kind: FailureKind::Block,
            tolerance: Some([a, r]),
            worst_element: dev.worst,
        }),
        Err(reason) => Some(Failure {
            kind: FailureKind::Block,
            ..failure(&block.name, reason.clone())
        }),
    }
}

/// One block of the train file against its fused tensors in the deploy file.
struct Run<'a> {
    train: &'a Checkpoint,
    deploy: &'a Checkpoint,
    block: &'a Block,
    /// Whether to measure the INT8 output SQNR too.
    int8: bool,
}

impl Run<'_> {
    /// The deploy file's fused weight and bias, or why they cannot be run.
    fn fused_tensors(&self) -> Result<[&TensorInfo; 2], String> {
        let b = self.block;
        let expect_w = b.deploy_shape();
        let expect_b = vec![b.out_channels];
        let get = |name: &String, shape: &Vec<usize>| {
            let t = self
                .deploy
                .get(name)
                .ok_or_else(|| format!("the deploy file has no `{name}`"))?;
            if &t.shape != shape {
                return Err(format!(
                    "`{name}` has shape {:?}; expected {shape:?}",
                    t.shape
                ));
            }
            if float_width(t.dtype).is_none() {
                return Err(format!("`{name}` is {:?}, not floating point", t.dtype));
            }
            Ok(t)
        };
        Ok([
            get(&b.deploy_weight, &expect_w)?,
            get(&b.deploy_bias, &expect_b)?,
        ])
    }

    /// The block's deviation on a seeded `batch`×`h`×`w` input (stream `stream`), and the
    /// sums of its output SQNR with per-channel INT8 weights; the inner `Err` says why the
    /// deploy file's tensors cannot be run.
    fn deviation(
        &self,
        [h, w]: [usize; 2],
        batch: usize,
        seed: u64,
        stream: u64,
    ) -> Result<BlockOutcome, Error> {
        let fused = match self.fused_tensors() {
            Ok(t) => t,
            Err(why) => return Ok(Err(why)),
        };
        let b = self.block;
        let c = b.in_channels().unwrap_or(b.in_per_group);
        let x = BlockInput::new(
            Input::random(batch, c, h, w, seed, stream),
            &kernels(self.train, b),
        );
        let mut dev = Deviation::default();
        let mut int8 = self.int8.then(Sqnr::default);
        for rows in b.even_row_chunks(VERIFY_CHUNK) {
            let unfused = self.unfused(&x, rows.clone())?;
            let first = rows.start;
            let (out, weight) = self.fused(&x, fused, rows)?;
            dev = dev.merge(deviation::between(&unfused, &out, first, [h, w]));
            if let Some(sums) = int8.as_mut() {
                let conv = ConvRows {
                    weight: &weight,
                    first_row: first,
                    in_per_group: b.in_per_group,
                    kernel: b.kernel,
                };
                let cols = x.cols(b.kernel, 1);
                *sums = *sums + int8::output_sums(conv, &out, &cols, b.out_per_group());
            }
        }
        Ok(Ok((dev, int8)))
    }

    /// The train block, op by op, for output channels `rows`.
    fn unfused(&self, x: &BlockInput, rows: std::ops::Range<usize>) -> Result<Array2<f64>, Error> {
        let (b, train) = (self.block, self.train);
        let block_err = |e| Error::block(train, e);
        let values = ChannelValues::load(train, b, rows.clone()).map_err(block_err)?;
        let mut sources = Vec::with_capacity(b.branches.len());
        for branch in &b.branches {
            sources.push(match branch.conv_weight() {
                Some(name) => {
                    let t = train.get(name);
                    let per_row = t.map_or(0, |t| t.numel() / b.out_channels);
                    let w = read_rows(train, b, name, rows.clone(), per_row)
                        .and_then(|w| b.rows_from_stored(w, &rows, 1))
                        .map_err(block_err)?;
                    Some((w, t.map_or((1, 1), kernel_hw)))
                }
                None => None,
            });
        }
        Ok(forward_unfused(b, &values, &sources, x))
    }

    /// The deploy conv as written, for output channels `rows`: its output, and its weights.
    fn fused(
        &self,
        x: &BlockInput,
        [weight, bias]: [&TensorInfo; 2],
        rows: std::ops::Range<usize>,
    ) -> Result<(Array2<f64>, Vec<f64>), Error> {
        let b = self.block;
        let not_float = || {
            Error::internal(format!(
                "`{}` was checked to be floating point",
                weight.name
            ))
        };
        let w = self
            .deploy
            .read_f64(weight, rows.start * b.row_len()..rows.end * b.row_len())?
            .ok_or_else(not_float)?;
        let w = (b.rows_from_stored(w, &rows, 1)).map_err(|e| Error::block(self.deploy, e))?;
        let bias = self
            .deploy
            .read_f64(bias, rows.clone())?
            .ok_or_else(not_float)?;
        let mut y = x.conv(&w, rows, b.in_per_group, (b.kernel, 1), b.out_per_group());
        for (mut row, c) in y.rows_mut().into_iter().zip(bias) {
            row += c;
        }
        Ok((y, w))
    }
}

/// The train block run op by op on `x`, for output channels `rows` (what verification
/// compares the deploy conv against).
pub fn unfused_rows(
    train: &Checkpoint,
    block: &Block,
    x: &BlockInput,
    rows: std::ops::Range<usize>,
) -> Result<Array2<f64>, Error> {
    let run = Run {
        train,
        deploy: train,
        block,
        int8: false,
    };
    run.unfused(x, rows)
}

/// The ((kh, kw), dilation) of every kernel the block's forward passes use: the fused one
/// and each branch's source.
fn kernels(ckpt: &Checkpoint, block: &Block) -> Vec<KernelGeometry> {
    let mut ks = vec![(block.kernel, 1), ((1, 1), 1)];
    for branch in &block.branches {
        match branch.source() {
            Op::Conv {
                weight, dilation, ..
            } => ks.extend(ckpt.get(weight).map(|t| (kernel_hw(t), *dilation))),
            Op::AvgPool { kernel } => ks.push(((*kernel, *kernel), 1)),
            _ => {}
        }
    }
    ks.sort_unstable();
    ks.dedup();
    ks
}

/// Every tensor the deploy file should carry over unchanged is there, equal to the train
/// file's (cast to the deploy dtype where that differs); and nothing else is there.
fn check_passthrough(
    train: &Checkpoint,
    deploy: &Checkpoint,
    detection: &Detection,
) -> Result<Vec<Failure>, Error> {
    let consumed = detection.consumed();
    let mut expected: BTreeSet<&str> = BTreeSet::new();
    let mut failures = Vec::new();
    for b in &detection.blocks {
        expected.insert(&b.deploy_weight);
        expected.insert(&b.deploy_bias);
    }
    for t in train.tensors() {
        if consumed.contains(t.name.as_str()) {
            continue;
        }
        expected.insert(&t.name);
        let why = match deploy.get(&t.name) {
            None => Some((
                FailureKind::Missing,
                "missing from the deploy file".to_string(),
            )),
            Some(d) if d.shape != t.shape => Some((
                FailureKind::Altered,
                format!(
                    "shape {:?} in the deploy file, {:?} in the train file",
                    d.shape, t.shape
                ),
            )),
            Some(d) if !same_values(train, t, deploy, d)? => Some((
                FailureKind::Altered,
                format!(
                    "differs from the train file's ({:?} there, {:?} here)",
                    t.dtype, d.dtype
                ),
            )),
            Some(_) => None,
        };
        failures.extend(why.map(|(kind, reason)| Failure {
            kind,
            ..failure(&t.name, reason)
        }));
    }
    for d in deploy.tensors() {
        if !expected.contains(d.name.as_str()) {
            failures.push(Failure {
                kind: FailureKind::Extra,
                ..failure(
                    &d.name,
                    "is in the deploy file but not expected there (a leftover train branch? strict loading would refuse it)".into(),
                )
            });
        }
    }
    Ok(failures)
}

/// A failure without a measured deviation (its kind set by the caller).
fn failure(name: &str, reason: String) -> Failure {
    Failure {
        name: name.to_string(),
        reason,
        max_abs_deviation: None,
        max_rel_deviation: None,
        kind: FailureKind::Block,
        tolerance: None,
        worst_element: None,
    }
}

/// Whether deploy tensor `d` holds train tensor `t`'s values: the same bytes, or for a cast
/// file the train values rounded to `d`'s dtype (a value that overflows it cannot match).
fn same_values(
    train: &Checkpoint,
    t: &TensorInfo,
    deploy: &Checkpoint,
    d: &TensorInfo,
) -> Result<bool, Error> {
    if d.dtype == t.dtype {
        return Ok(train.read_bytes(t, 0, t.len)? == deploy.read_bytes(d, 0, d.len)?);
    }
    let Some(values) = train.read_f64(t, 0..t.numel())? else {
        return Ok(false);
    };
    if float_width(d.dtype).is_none() {
        return Ok(false);
    }
    let mut cast = Vec::new();
    if encode(d.dtype, &values, &mut cast).is_err() {
        return Ok(false);
    }
    Ok(cast == deploy.read_bytes(d, 0, d.len)?)
}
