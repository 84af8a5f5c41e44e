//! Converting an ONNX graph: each branch set the finder found replaced by one `Conv` (or
//! `Gemm`) whose weight and bias the one fusion routine computes, everything else written as it
//! was read; then the same INT8 figures, verification and report as for a checkpoint.

use std::collections::BTreeSet;
use std::path::Path;

use rayon::prelude::*;

use super::output::{Linked, Pending, readable_graph, stage_graph};
use super::{Train, Written};
use crate::Error;
use crate::block::Block;
use crate::checkpoint::Checkpoint;
use crate::deviation::Deviation;
use crate::find::graph::{BranchSet, GOp};
use crate::fuse::block::{FUSE_CHUNK, fuse_chunk, probe_input};
use crate::fuse::rows::FusedRows;
use crate::int8::{ChannelStats, Int8Report, TensorStats, figures};
use crate::onnx::{DataPlacement, GraphEdit, NewAttr, NewNode, NewTensor};
use crate::progress::Hooks;
use crate::write::safetensors::Streamed;

/// A deploy graph written to pending files, with what writing it learnt.
pub(super) struct Staged {
    /// The pending files (side file first).
    pub files: Vec<Pending>,
    /// Each block's probe deviation and INT8 pass one.
    pub streamed: Streamed,
    /// The written file, opened as a tensor source (a graph's only when it is verified).
    pub deploy: Option<Checkpoint>,
    /// Where the written graph can be read under its final names while pending (to verify).
    pub path: Option<std::path::PathBuf>,
    /// The INT8 figures, where writing already had every fused weight whole (a graph's).
    pub int8: Option<Vec<Option<Int8Report>>>,
    /// What it holds.
    pub written: Written,
    /// Where the pending files are linked under their final names, while `deploy` reads them.
    _linked: Option<Linked>,
}

impl Staged {
    /// A staged deploy file that needs no links to be read (a checkpoint's).
    pub fn new(
        files: Vec<Pending>,
        streamed: Streamed,
        deploy: Checkpoint,
        written: Written,
    ) -> Staged {
        Staged {
            files,
            streamed,
            deploy: Some(deploy),
            path: None,
            int8: None,
            written,
            _linked: None,
        }
    }
}

/// Writes the deploy graph of `train` beside `output` (not in place yet).
pub(super) fn stage(
    train: &Train,
    sets: &[BranchSet],
    output: &Path,
    probe_seed: Option<u64>,
    hooks: Hooks,
) -> Result<Staged, Error> {
    let verify = probe_seed.is_none();
    let model = train
        .ckpt
        .onnx()
        .ok_or_else(|| Error::internal("a graph conversion of a file that is not a graph"))?;
    let blocks = &train.detection.blocks;
    let edit = edit(blocks, sets, taken_names(train));
    let mut streamed = Streamed {
        probe: vec![Deviation::default(); blocks.len()],
        int8: vec![None; blocks.len()],
    };
    let mut int8 = vec![None; blocks.len()];
    let mut bias: Vec<u8> = Vec::new();
    // The fusion's own error (a block's values, a cancel), kept whole: the writer only
    // passes an I/O error through.
    let mut failure: Option<Error> = None;
    // Block b + 1, fused while block b was written.
    let mut ahead: Option<Result<FusedBlock, Error>> = None;
    let pool = Pool::default();
    let fuse = |b: usize| {
        (hooks.cancel.check())
            .and_then(|()| fuse_whole(&train.ckpt, &blocks[b], (b, probe_seed), &pool))
    };
    let mut fill = |i: usize, w: &mut dyn std::io::Write| -> std::io::Result<()> {
        let b = i / 2;
        if i % 2 == 1 {
            return w.write_all(&bias);
        }
        let fused = match ahead.take().unwrap_or_else(|| fuse(b)) {
            Ok(f) => f,
            Err(e) => {
                failure = Some(e);
                return Err(std::io::Error::other("the fusion failed"));
            }
        };
        streamed.probe[b] = fused.dev;
        int8[b] = Some(fused.int8);
        streamed.int8[b] = Some(fused.stats);
        let (written, next) = std::thread::scope(|s| {
            let next = (b + 1 < blocks.len()).then(|| s.spawn(|| fuse(b + 1)));
            let written = write_rows(&fused.rows, w, &mut bias, hooks);
            (written, next.map(|h| h.join()))
        });
        ahead =
            next.map(|r| r.unwrap_or_else(|_| Err(Error::internal("a fusing thread panicked"))));
        pool.give(fused.rows);
        written
    };
    let staged = stage_graph(model, &edit, output, DataPlacement::AsInput, &mut fill);
    let (files, summary) = staged.map_err(|e| failure.unwrap_or(e))?;
    let written = written(train, &edit, &summary);
    let (deploy, path, linked) = if verify {
        let (path, linked) = readable_graph(&files, output)?;
        (Some(Checkpoint::open(&path)?), Some(path), linked)
    } else {
        (None, None, None)
    };
    Ok(Staged {
        files,
        streamed,
        deploy,
        path,
        int8: Some(int8),
        written,
        _linked: linked,
    })
}

/// INT8 pass two on a block's fused rows still in memory (a checkpoint's re-reads the file).
fn in_memory_int8(block: &Block, rows: &[FusedRows], stats: &ChannelStats) -> Int8Report {
    let (max, row_len) = (stats.max_abs(), block.row_len());
    let width = block.dtype.bitsize().div_ceil(8).max(1);
    let firsts: Vec<usize> = (rows.iter())
        .scan(0, |next, r| {
            let first = *next;
            *next += r.bias.len() / width;
            Some(first)
        })
        .collect();
    // Chunk by chunk on every core, merged in row order.
    let parts: Vec<TensorStats> = (rows.par_iter().zip(firsts))
        .map(|(r, first)| {
            let mut t = TensorStats::new(max, row_len, first);
            t.push_bytes(block.dtype, &r.weight);
            t
        })
        .collect();
    let tensor = (parts.into_iter()).fold(TensorStats::new(max, row_len, 0), TensorStats::merge);
    figures(stats, &tensor)
}

/// The written graph's tensors, counted from the input's and the edit.
fn written(train: &Train, edit: &GraphEdit, summary: &crate::onnx::WriteSummary) -> Written {
    let dropped: std::collections::BTreeSet<&str> = (summary.initializers_dropped.iter())
        .map(String::as_str)
        .chain(train.detection.consumed())
        .collect();
    let kept = (train.ckpt.tensors().iter()).filter(|t| !dropped.contains(t.name.as_str()));
    let new: usize = (edit.tensors.iter())
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    Written {
        tensors: kept.clone().count() + edit.tensors.len(),
        parameters: kept.map(|t| t.numel()).sum::<usize>() + new,
        bytes: summary.model_bytes + summary.side_bytes,
        nodes: Some(summary.nodes_after),
    }
}

/// Fused-weight buffers written out, for the next blocks' chunks: reused, they need no fresh
/// (zeroed, faulted-in) pages. It holds at most the chunks of the blocks in flight.
#[derive(Default)]
struct Pool(std::sync::Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default()
    }

    fn give(&self, rows: Vec<FusedRows>) {
        if let Ok(mut p) = self.0.lock() {
            p.extend(rows.into_iter().map(|r| r.weight));
        }
    }
}

/// One block fused whole: its rows, probe deviation and INT8 passes one and two.
struct FusedBlock {
    rows: Vec<FusedRows>,
    dev: Deviation,
    stats: ChannelStats,
    int8: Int8Report,
}

/// Block `b` fused whole (its chunks in parallel), with its probe deviation and INT8 figures.
fn fuse_whole(
    ckpt: &Checkpoint,
    block: &Block,
    (b, probe_seed): (usize, Option<u64>),
    pool: &Pool,
) -> Result<FusedBlock, Error> {
    let (rows, dev, stats) = fuse_block(ckpt, block, (b, probe_seed), pool)?;
    // The block's weights are read: their pages of the mapped graph need not stay mapped.
    if let Some(model) = ckpt.onnx() {
        let names = block.branches.iter().flat_map(|b| b.tensor_names());
        names
            .filter_map(|n| model.tensor(&n))
            .for_each(|t| model.release(t));
    }
    let int8 = in_memory_int8(block, &rows, &stats);
    Ok(FusedBlock {
        rows,
        dev,
        stats,
        int8,
    })
}

/// Writes a block's fused weight rows to `w` and keeps its bias rows in `bias` (the tensor
/// after it).
fn write_rows(
    rows: &[FusedRows],
    w: &mut dyn std::io::Write,
    bias: &mut Vec<u8>,
    hooks: Hooks,
) -> std::io::Result<()> {
    bias.clear();
    for r in rows {
        w.write_all(&r.weight)?;
        hooks.progress.advance(r.weight.len() as u64);
        bias.extend(&r.bias);
    }
    Ok(())
}

/// Block `b` fused whole (its chunks in parallel), with its probe deviation and INT8 pass one.
fn fuse_block(
    ckpt: &Checkpoint,
    block: &Block,
    (b, probe_seed): (usize, Option<u64>),
    pool: &Pool,
) -> Result<(Vec<FusedRows>, Deviation, ChannelStats), Error> {
    let probe = probe_seed.map(|seed| probe_input(block, b, seed));
    let chunks: Vec<(FusedRows, ChannelStats)> = block
        .row_chunks(FUSE_CHUNK)
        .par_iter()
        .map(|rows| {
            let out = pool.take();
            let f = fuse_chunk(
                ckpt,
                block,
                rows.clone(),
                (block.dtype, probe.as_ref()),
                out,
            )?;
            let mut s = ChannelStats::new(block.row_len(), rows.start);
            s.push_bytes(block.dtype, &f.weight);
            Ok::<_, Error>((f, s))
        })
        .collect::<Result<_, _>>()?;
    let mut dev = Deviation::default();
    let mut stats = ChannelStats::new(block.row_len(), 0);
    let mut rows = Vec::with_capacity(chunks.len());
    for (f, s) in chunks {
        dev = dev.merge(f.deviation);
        stats = stats.merge(s);
        rows.push(f);
    }
    Ok((rows, dev, stats))
}

/// The names a new node or tensor must not take: every node's and tensor's of `train`'s
/// graph (one set for both: a name of neither kind is free for either).
pub(super) fn taken_names(train: &Train) -> BTreeSet<String> {
    let mut taken: BTreeSet<String> = (train.graph.iter())
        .flat_map(|(_, names)| names.iter().cloned())
        .collect();
    if let Some(model) = train.ckpt.onnx() {
        let g = model.graph();
        taken.extend(
            g.node
                .iter()
                .flat_map(|n| n.input.iter().chain(&n.output))
                .cloned(),
        );
        taken.extend(g.initializer.iter().map(|t| t.name().to_string()));
        taken.extend(
            g.input
                .iter()
                .chain(&g.output)
                .map(|v| v.name().to_string()),
        );
    }
    taken
}

/// The edit: each set's nodes removed, the block's node(s) in their place reading the set's
/// input and writing its output, with the block's fused weight and bias: a `Conv`; a Linear
/// as the form it was given, `Gemm` (`transB` as its `Gemm`s had it: the block's weight is
/// stored `[in, out]` for `transB` 0, out axis 1) or, for `MatMul`s by an `[in, out]`
/// constant (PyTorch's Linear on an input of rank 3 and more, which `Gemm` cannot take),
/// `MatMul` by the fused weight then `Add` of the fused bias, the train graph's own two steps.
pub(super) fn edit(blocks: &[Block], sets: &[BranchSet], mut names: BTreeSet<String>) -> GraphEdit {
    let mut edit = GraphEdit::default();
    for (block, set) in blocks.iter().zip(sets) {
        edit.remove.extend(set.nodes.iter().copied());
        let at = set.nodes.first().copied().unwrap_or_default();
        let matmul =
            (set.branches.iter().flat_map(|b| &b.ops)).any(|op| matches!(op, GOp::MatMul { .. }));
        let (weight, bias) = (block.deploy_weight.clone(), block.deploy_bias.clone());
        let product = (block.linear && matmul)
            .then(|| fresh(&mut names, &format!("{}/MatMul_output_0", block.name)));
        // The block's scope and the op, as exporters name nodes; numbered where taken.
        let mut node = |op_type: &str, inputs: Vec<String>, output: String, attrs| NewNode {
            at,
            name: fresh(&mut names, &format!("{}/{op_type}", block.name)),
            op_type: op_type.into(),
            domain: String::new(),
            inputs,
            outputs: vec![output],
            attrs,
        };
        let inputs = vec![set.input.clone(), weight.clone(), bias.clone()];
        let output = set.output.clone();
        if !block.linear {
            let conv = node("Conv", inputs, output, conv_attrs(block, set));
            edit.insert.push(conv);
        } else if let Some(product) = product {
            let mm = node(
                "MatMul",
                vec![set.input.clone(), weight],
                product.clone(),
                vec![],
            );
            let add = node("Add", vec![product, bias], output, vec![]);
            edit.insert.extend([mm, add]);
        } else {
            let trans_b = NewAttr::Int(i64::from(block.out_axis == 0));
            let gemm = node("Gemm", inputs, output, vec![("transB".into(), trans_b)]);
            edit.insert.push(gemm);
        }
        edit.tensors.push(NewTensor {
            name: block.deploy_weight.clone(),
            dtype: block.dtype,
            shape: block.deploy_shape(),
        });
        edit.tensors.push(NewTensor {
            name: block.deploy_bias.clone(),
            dtype: block.dtype,
            shape: vec![block.out_channels],
        });
    }
    edit
}

/// `stem`, or `stem_1`, `stem_2`, …: the first `names` does not hold, now taken.
fn fresh(names: &mut BTreeSet<String>, stem: &str) -> String {
    let mut name = stem.to_string();
    let mut n = 1;
    while names.contains(&name) {
        name = format!("{stem}_{n}");
        n += 1;
    }
    names.insert(name.clone());
    name
}

/// The merged conv's attributes: the block's kh×kw kernel, the set's stride and groups, and
/// its pads widened where the set's kernel is narrower than the block's.
fn conv_attrs(block: &Block, set: &BranchSet) -> Vec<(String, NewAttr)> {
    let (kh, kw) = block.kernel;
    let (dh, dw) = (
        (kh - set.kernel.0.min(kh)) / 2,
        (kw - set.kernel.1.min(kw)) / 2,
    );
    let [t, l, b, r] = set.pads;
    let pads = [t + dh, l + dw, b + dh, r + dw].map(|p| p as i64).to_vec();
    vec![
        ("dilations".into(), NewAttr::Ints(vec![1, 1])),
        ("group".into(), NewAttr::Int(set.group as i64)),
        (
            "kernel_shape".into(),
            NewAttr::Ints(vec![kh as i64, kw as i64]),
        ),
        ("pads".into(), NewAttr::Ints(pads)),
        (
            "strides".into(),
            NewAttr::Ints(vec![set.stride.0 as i64, set.stride.1 as i64]),
        ),
    ]
}
