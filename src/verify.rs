//! Running a block both ways — each branch conv then BN, summed (unfused), and the one fused
//! conv — on the same seeded random input, and measuring how far apart the outputs are; and
//! judging a whole deploy file that way against its train file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ndarray::{Array2, Zip};
use serde::Serialize;

use crate::Error;
use crate::block::Block;
use crate::checkpoint::{Checkpoint, encode, float_width};
use crate::conv::{Input, conv_rows, im2col};
use crate::convert::{Outcome, Settings, block_err, build_report, eps_info, find, row_chunks};
use crate::fuse::{Affine, BlockValues, FusedConv};
use crate::int8::{Int8Report, OutputSqnr, Sqnr};
use crate::layout::Detection;
use crate::report::{BlockReport, Failure, Probe, VerifyReport};
use rayon::prelude::*;
use safetensors::Dtype;

/// How far the fused output is from the unfused one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Deviation {
    /// max |fused − unfused| over every output element.
    pub max_abs: f64,
    /// `max_abs / max |unfused|` (0 when the unfused output is all zero).
    pub max_rel: f64,
    /// max |unfused|: the scale the relative deviation is taken against.
    pub max_abs_output: f64,
}

impl Deviation {
    /// The deviation given max |fused − unfused| and max |unfused|.
    pub fn of(max_abs: f64, max_abs_output: f64) -> Deviation {
        Deviation {
            max_abs,
            max_rel: relative(max_abs, max_abs_output),
            max_abs_output,
        }
    }

    /// The deviation over the union of two sets of outputs.
    pub fn merge(self, other: Deviation) -> Deviation {
        let max_abs = nan_max(self.max_abs, other.max_abs);
        let max_abs_output = nan_max(self.max_abs_output, other.max_abs_output);
        Deviation {
            max_abs,
            max_rel: relative(max_abs, max_abs_output),
            max_abs_output,
        }
    }

    /// Whether the deviation is within `atol + rtol · max|unfused|`.
    pub fn within(&self, atol: f64, rtol: f64) -> bool {
        // Written so that NaN fails.
        self.max_abs <= atol + rtol * self.max_abs_output
    }
}

/// `max` that keeps a NaN instead of dropping it: a NaN deviation must fail, not vanish.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn relative(abs: f64, scale: f64) -> f64 {
    if scale > 0.0 {
        abs / scale
    } else if abs > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// The input a block is run on, and its im2col matrices by kernel size.
pub struct BlockInput {
    /// The input images.
    pub input: Input,
    cols: BTreeMap<usize, Array2<f64>>,
}

impl BlockInput {
    /// A seeded random input for `block`: `batch` images of `h×w`, with as many channels as
    /// the block reads (in/groups × groups; in/groups alone when groups are unknown, which
    /// computes the same for the comparison). `stream` keeps blocks' inputs independent.
    pub fn new(block: &Block, batch: usize, h: usize, w: usize, seed: u64, stream: u64) -> Self {
        let c = block.in_channels().unwrap_or(block.in_per_group);
        let input = Input::random(batch, c, h, w, seed, stream);
        let mut kernels: Vec<usize> = vec![1, block.kernel];
        kernels.dedup();
        let mut cols = BTreeMap::new();
        for k in kernels {
            cols.insert(k, im2col(&input, k));
        }
        BlockInput { input, cols }
    }

    /// The im2col matrix of the input for a k×k kernel (computed on demand for a k not cached).
    pub fn cols(&self, k: usize) -> std::borrow::Cow<'_, Array2<f64>> {
        match self.cols.get(&k) {
            Some(c) => std::borrow::Cow::Borrowed(c),
            None => std::borrow::Cow::Owned(im2col(&self.input, k)),
        }
    }
}

/// The unfused block's output for the rows of `values`: Σ over branches of BN(conv(x) + c),
/// with each branch's `(t, b')` from [`BlockValues::affines`] (which refuses non-finite ones).
pub fn unfused(
    values: &BlockValues,
    affines: &[Affine],
    x: &BlockInput,
    out_per_group: usize,
) -> Array2<f64> {
    let rows = values.rows.clone();
    let p = x.input.positions();
    let mut out = Array2::<f64>::zeros((rows.len(), p));
    for (branch, (t, shift)) in values.branches.iter().zip(affines) {
        let y = match &branch.weight {
            Some(w) => conv_rows(
                &x.cols(branch.kernel),
                w,
                rows.clone(),
                values.in_per_group,
                branch.kernel,
                out_per_group,
            ),
            // The identity reads input channel o for output channel o.
            None => x.cols(1).slice(ndarray::s![rows.clone(), ..]).to_owned(),
        };
        for (r, mut row) in out.rows_mut().into_iter().enumerate() {
            Zip::from(&mut row)
                .and(y.row(r))
                .for_each(|o, &v| *o += t[r] * v + shift[r]);
        }
    }
    out
}

/// The fused conv's output for its rows.
pub fn fused(conv: &FusedConv, x: &BlockInput, out_per_group: usize) -> Array2<f64> {
    let mut y = conv_rows(
        &x.cols(conv.kernel),
        &conv.weight,
        conv.rows.clone(),
        conv.in_per_group,
        conv.kernel,
        out_per_group,
    );
    for (r, mut row) in y.rows_mut().into_iter().enumerate() {
        row += conv.bias[r];
    }
    y
}

/// Deviation between two outputs of the same shape; `reference` is the unfused one.
pub fn deviation(reference: &Array2<f64>, candidate: &Array2<f64>) -> Deviation {
    let mut max_abs: f64 = 0.0;
    let mut max_out: f64 = 0.0;
    Zip::from(reference).and(candidate).for_each(|&r, &c| {
        max_abs = nan_max(max_abs, (c - r).abs());
        max_out = nan_max(max_out, r.abs());
    });
    Deviation {
        max_abs,
        max_rel: relative(max_abs, max_out),
        max_abs_output: max_out,
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

/// What [`check_deploy`] finds: the verdict, each block's deviation, each block's INT8 output
/// SQNR.
pub type Checked = (VerifyReport, Vec<Option<Deviation>>, Vec<OutputSqnr>);

/// Judges `deploy` against the blocks of `train`: every block run both ways on the verification
/// input, every other tensor compared. Returns the verdict, each block's deviation (`None`
/// where the fused tensors are missing or mis-shaped) and its output SQNR with per-channel
/// INT8 weights ([`crate::int8::output_sums`]; `Some(None)`: exact).
pub fn check_deploy(
    train: &Checkpoint,
    deploy: &Checkpoint,
    detection: &Detection,
    eps: f64,
    settings: &Settings,
) -> Result<Checked, Error> {
    let max_k = detection.blocks.iter().map(|b| b.kernel).max().unwrap_or(1);
    let [h, w] = settings.input_size.unwrap_or([
        DEFAULT_VERIFY_SIZE.max(max_k),
        DEFAULT_VERIFY_SIZE.max(max_k),
    ]);
    if let Some(b) = detection
        .blocks
        .iter()
        .find(|b| b.kernel > h || b.kernel > w)
    {
        return Err(Error::Usage(format!(
            "--input-size {h}x{w} is smaller than the {k}×{k} kernel of block `{}`; borders and interior would not both be tested",
            b.name,
            k = b.kernel
        )));
    }
    let batch = settings.batch.max(1);
    let tol = |dtype: Dtype| {
        let (a, r) = default_tolerance(dtype);
        (settings.atol.unwrap_or(a), settings.rtol.unwrap_or(r))
    };
    // Tolerances reported are those of the blocks' (first) dtype.
    let report_dtype = detection
        .blocks
        .first()
        .and_then(|b| deploy.get(&b.deploy_weight).map(|t| t.dtype))
        .unwrap_or(Dtype::F32);
    let (atol, rtol) = tol(report_dtype);

    let results: Vec<Result<BlockOutcome, Error>> = detection
        .blocks
        .par_iter()
        .enumerate()
        .map(|(i, block)| {
            crate::check_interrupted()?;
            verify_block(
                train,
                deploy,
                block,
                eps,
                [h, w],
                batch,
                settings.seed,
                i as u64,
            )
        })
        .collect();
    let mut failures = Vec::new();
    let mut devs = Vec::new();
    let mut int8_out = Vec::new();
    for (block, result) in detection.blocks.iter().zip(results) {
        match result? {
            Ok((dev, int8)) => {
                int8_out.push(Some(int8.db()));
                let dtype = deploy
                    .get(&block.deploy_weight)
                    .map_or(Dtype::F32, |t| t.dtype);
                let (a, r) = tol(dtype);
                if !dev.within(a, r) {
                    failures.push(Failure {
                        name: block.name.clone(),
                        reason: format!(
                            "deviation {:.3e} (relative {:.3e}) is over the tolerance {a:.1e} + {r:.1e} × {:.3e}",
                            dev.max_abs, dev.max_rel, dev.max_abs_output
                        ),
                        max_abs_deviation: Some(dev.max_abs),
                        max_rel_deviation: Some(dev.max_rel),
                    });
                }
                devs.push(Some(dev));
            }
            Err(reason) => {
                failures.push(Failure {
                    name: block.name.clone(),
                    reason,
                    max_abs_deviation: None,
                    max_rel_deviation: None,
                });
                devs.push(None);
                int8_out.push(None);
            }
        }
    }
    failures.extend(check_passthrough(train, deploy, detection)?);
    Ok((
        VerifyReport {
            passed: failures.is_empty(),
            atol,
            rtol,
            input_size: [h, w],
            batch,
            seed: settings.seed,
            failures,
        },
        devs,
        int8_out,
    ))
}

/// A block run both ways: its deviation and INT8 output sums, or why it could not be run.
type BlockOutcome = Result<(Deviation, Sqnr), String>;

#[allow(clippy::too_many_arguments)]
fn verify_block(
    train: &Checkpoint,
    deploy: &Checkpoint,
    block: &Block,
    eps: f64,
    [h, w]: [usize; 2],
    batch: usize,
    seed: u64,
    stream: u64,
) -> Result<BlockOutcome, Error> {
    let k = block.kernel;
    let expect_w = vec![block.out_channels, block.in_per_group, k, k];
    let expect_b = vec![block.out_channels];
    let mut fused_tensors = Vec::new();
    for (name, shape) in [
        (&block.deploy_weight, &expect_w),
        (&block.deploy_bias, &expect_b),
    ] {
        let Some(t) = deploy.get(name) else {
            return Ok(Err(format!("the deploy file has no `{name}`")));
        };
        if &t.shape != shape {
            return Ok(Err(format!(
                "`{name}` has shape {:?}; expected {shape:?}",
                t.shape
            )));
        }
        if float_width(t.dtype).is_none() {
            return Ok(Err(format!(
                "`{name}` is {:?}, not floating point",
                t.dtype
            )));
        }
        fused_tensors.push(t);
    }
    let x = BlockInput::new(block, batch, h, w, seed, stream);
    let per_row = block.in_per_group * k * k;
    let opg = block.out_per_group();
    let mut dev = Deviation::default();
    let mut int8 = Sqnr::default();
    for rows in row_chunks(block, VERIFY_CHUNK) {
        let values =
            BlockValues::load(train, block, rows.clone()).map_err(|e| block_err(train, e))?;
        let weight = deploy
            .read_f64(fused_tensors[0], rows.start * per_row..rows.end * per_row)?
            .unwrap_or_default();
        let bias = deploy
            .read_f64(fused_tensors[1], rows.clone())?
            .unwrap_or_default();
        let conv = FusedConv {
            rows,
            in_per_group: block.in_per_group,
            kernel: k,
            weight,
            bias,
        };
        let affines = values
            .affines(eps, block)
            .map_err(|e| block_err(train, e))?;
        let out = fused(&conv, &x, opg);
        int8 = int8 + crate::int8::output_sums(&conv, &out, &x.cols(k), opg);
        let d = deviation(&unfused(&values, &affines, &x, opg), &out);
        dev = dev.merge(d);
    }
    Ok(Ok((dev, int8)))
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
    let fail = |name: &str, reason: String| Failure {
        name: name.to_string(),
        reason,
        max_abs_deviation: None,
        max_rel_deviation: None,
    };
    for b in &detection.blocks {
        expected.insert(&b.deploy_weight);
        expected.insert(&b.deploy_bias);
    }
    for t in train.tensors() {
        if consumed.contains(t.name.as_str()) {
            continue;
        }
        expected.insert(&t.name);
        let Some(d) = deploy.get(&t.name) else {
            failures.push(fail(&t.name, "missing from the deploy file".into()));
            continue;
        };
        if d.shape != t.shape {
            failures.push(fail(
                &t.name,
                format!(
                    "shape {:?} in the deploy file, {:?} in the train file",
                    d.shape, t.shape
                ),
            ));
            continue;
        }
        let same = if d.dtype == t.dtype {
            train.read_bytes(t, 0, t.len)? == deploy.read_bytes(d, 0, d.len)?
        } else if float_width(d.dtype).is_some() && float_width(t.dtype).is_some() {
            let values = train.read_f64(t, 0..t.numel())?.unwrap_or_default();
            let mut cast = Vec::new();
            let _ = encode(d.dtype, &values, &mut cast);
            cast == deploy.read_bytes(d, 0, d.len)?
        } else {
            false
        };
        if !same {
            failures.push(fail(
                &t.name,
                format!(
                    "differs from the train file's ({:?} there, {:?} here)",
                    t.dtype, d.dtype
                ),
            ));
        }
    }
    for d in deploy.tensors() {
        if !expected.contains(d.name.as_str()) {
            failures.push(fail(
                &d.name,
                "is in the deploy file but not expected there (a leftover train branch? strict loading would refuse it)".into(),
            ));
        }
    }
    Ok(failures)
}

/// Judges a deploy file made by anyone against its train file.
pub fn verify_files(
    train_path: &Path,
    deploy_path: &Path,
    settings: &Settings,
) -> Result<Outcome, Error> {
    let train = Checkpoint::open(train_path)?;
    let deploy = Checkpoint::open(deploy_path)?;
    let detection = find(&train, settings)?;
    let eps = eps_info(&detection, settings);
    let (v, devs, int8_out) = check_deploy(&train, &deploy, &detection, eps.value, settings)?;
    let int8 = crate::int8::scan_deploy(&deploy, &detection.blocks)?;
    let blocks = detection
        .blocks
        .iter()
        .zip(devs)
        .zip(int8.into_iter().zip(int8_out))
        .map(|((b, d), (int8, out))| {
            let dtype = deploy
                .get(&b.deploy_weight)
                .map_or("missing".to_string(), |t| format!("{:?}", t.dtype));
            let d = d.unwrap_or(Deviation {
                max_abs: f64::NAN,
                max_rel: f64::NAN,
                max_abs_output: f64::NAN,
            });
            BlockReport {
                int8: int8.map(|r| Int8Report {
                    output_sqnr_db: out,
                    ..r
                }),
                ..BlockReport::new(b, &detection.layout.name, &dtype, d)
            }
        })
        .collect();
    let probe = Probe {
        kind: "verify".into(),
        input_size: Some(v.input_size),
        batch: v.batch,
        seed: v.seed,
    };
    let out = (
        deploy.tensors().len(),
        deploy.tensors().iter().map(|t| t.numel()).sum(),
        std::fs::metadata(deploy_path).map_or(0, |m| m.len()),
    );
    let report = build_report(
        "verify",
        &train,
        deploy_path,
        &detection,
        eps,
        probe,
        blocks,
        Some(v),
        out,
    );
    Ok(Outcome {
        report,
        report_path: None,
    })
}
