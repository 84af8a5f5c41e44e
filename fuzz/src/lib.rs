//! The one entry point both fuzzers drive — libFuzzer's `load_and_detect` target and the
//! plain-Rust `mutate` loop — and small valid seed checkpoints for them to start from.
//!
//! The bytes go through the same path as a user's file: they are written to a scratch file and
//! opened with [`Checkpoint::open`], so there is one parser, not a second one for fuzzing.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use repvgg_fuse::Settings;
use repvgg_fuse::app::ReportTo;
use repvgg_fuse::block::Role;
use repvgg_fuse::checkpoint::Checkpoint;
use repvgg_fuse::conv::{BlockInput, Input};
use repvgg_fuse::dtype::dtype_bytes;
use repvgg_fuse::find::{Detection, Layout};
use repvgg_fuse::fuse::block::fuse_block_rows;
use repvgg_fuse::verify::unfused_rows;
use repvgg_fuse::write::plan::Plan;
use repvgg_fuse::progress::Hooks;
use safetensors::Dtype;

/// The scratch file inputs are written to: one per process, in memory where `/dev/shm` is.
/// If the process dies (abort, out of memory), the last input is still there to reproduce it.
pub fn scratch_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        dir.join(format!(
            "repvgg-fuse-fuzz-{}.safetensors",
            std::process::id()
        ))
    })
}

/// Where `convert` writes during fuzzing: a folder beside the scratch file.
fn scratch_out() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = scratch_path().with_extension("out");
        let _ = std::fs::create_dir_all(&dir);
        dir
    })
}

/// Removes the scratch file and output folder (the fallback loop calls this when done).
pub fn clean_up() {
    let _ = std::fs::remove_file(scratch_path());
    let _ = std::fs::remove_dir_all(scratch_out());
}

/// Work per block above which the probe convolution is skipped, to keep executions fast.
const PROBE_BUDGET: usize = 1 << 20;

/// How far an input got: the fallback loop keeps inputs that get further, as a crude stand-in
/// for libFuzzer's coverage feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Depth {
    /// Not a valid safetensors file.
    Refused,
    /// A valid file, but no layout found blocks in it.
    Loaded,
    /// Blocks found, none fused (a block's values were refused).
    Detected,
    /// At least one block fused.
    Fused,
}

/// Loads `data` as a checkpoint, detects its blocks (and again under each layout forced), plans
/// the deploy file, then reads, fuses and probes every block. Errors are expected and ignored
/// (their messages are formatted, to run that code too); a panic is the bug being looked for.
pub fn load_and_detect(data: &[u8]) -> Depth {
    let path = scratch_path();
    {
        let mut file = File::create(path).expect("create the scratch file");
        file.write_all(data).expect("write the scratch file");
    }
    // The public entry point, as `repvgg-fuse inspect` calls it.
    if let Err(e) = repvgg_fuse::inspect(path, &Settings::default()) {
        let _ = e.to_string();
    }
    // An ONNX graph: the protobuf reader, the graph view and the topology finder.
    match repvgg_fuse::onnx::OnnxModel::open(path) {
        Ok(model) => {
            let graph = repvgg_fuse::onnx::graph_view(&model);
            match repvgg_fuse::find::graph::find_branch_sets(&graph) {
                Ok(found) => {
                    let _ = format!("{found:?}");
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let ckpt = match Checkpoint::open(path) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return Depth::Refused;
        }
    };
    let Ok(layouts) = Layout::builtin() else {
        unreachable!("the built-in layout table is tested")
    };
    let forced = std::iter::once(None).chain(layouts.iter().map(|l| Some(l.name.as_str())));
    let mut depth = Depth::Loaded;
    for name in forced {
        match Detection::find(&ckpt, &layouts, name, None) {
            Ok(detection) => depth = depth.max(exercise(&ckpt, &detection)),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    if depth >= Depth::Detected {
        // The whole conversion as the binary runs it, writer thread and report included.
        let out = scratch_out().join("deploy.safetensors");
        match repvgg_fuse::convert(path, &out, ReportTo::Beside, &Settings::default(), false, Hooks::none()) {
            Ok(outcome) => {
                let _ = outcome.passed();
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    depth
}

fn exercise(ckpt: &Checkpoint, detection: &Detection) -> Depth {
    let mut depth = Depth::Detected;
    for cast in [None, Some(Dtype::F16)] {
        let plan = Plan::new(ckpt, detection, cast);
        let _ = plan.header();
        let _ = plan.file_len();
    }
    let _ = detection.consumed();
    for (i, block) in detection.blocks.iter().enumerate() {
        let side = block.side() / 2 + 1;
        let channels = block.in_channels().unwrap_or(block.in_per_group);
        let (kh, kw) = block.kernel;
        let probe = Input::random(1, channels, kh, kw, 0, i as u64);
        // The one fusion routine, as the converter runs it (probe included).
        let rows = 0..block.out_channels;
        let fused = match fuse_block_rows(ckpt, block, rows.clone(), block.dtype, Some(&probe)) {
            Ok(f) => f,
            Err(e) => {
                let _ = e.to_string();
                continue;
            }
        };
        let width = dtype_bytes(block.dtype);
        assert_eq!(fused.weight.len(), block.out_channels * block.row_len() * width);
        assert_eq!(fused.bias.len(), block.out_channels * width);
        depth = Depth::Fused;
        let work = channels
            .saturating_mul(block.row_len() / block.in_per_group.max(1))
            .saturating_mul(side * side)
            .saturating_mul(block.out_channels);
        if work <= PROBE_BUDGET {
            // The verification's other side: the train block op by op.
            let x = BlockInput::new(Input::random(1, channels, side, side, 0, i as u64), &[]);
            if let Err(e) = unfused_rows(ckpt, block, &x, rows) {
                let _ = e.to_string();
            }
        }
    }
    depth
}

/// A tensor for a seed checkpoint: name, dtype, shape, little-endian bytes.
type Tensor = (String, &'static str, Vec<usize>, Vec<u8>);

/// Lays out a safetensors file from `tensors`, data back to back in list order.
pub fn safetensors(tensors: &[Tensor]) -> Vec<u8> {
    let mut header = String::from("{");
    let mut offset = 0;
    let mut data = Vec::new();
    for (i, (name, dtype, shape, bytes)) in tensors.iter().enumerate() {
        let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            shape.join(","),
            offset + bytes.len()
        ));
        offset += bytes.len();
        data.extend_from_slice(bytes);
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

/// One small valid checkpoint per built-in layout: a block with every branch the layout
/// names (2 → 2 channels, 3×3, identity), and a tensor that passes through.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let f32s = |n: usize, v: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|i| (v + i as f32 * 0.25).to_le_bytes())
            .collect()
    };
    let mut out = Vec::new();
    for layout in Layout::builtin().unwrap_or_default() {
        let prefix = "layer1.0";
        let mut tensors: Vec<Tensor> = Vec::new();
        for spec in &layout.branches {
            let path = format!("{prefix}.{}", spec.path.replace("{n}", "0"));
            if let Some(conv) = &spec.conv {
                let k = if spec.role == Role::Pointwise { 1 } else { 3 };
                tensors.push((
                    format!("{path}.{conv}.weight"),
                    "F32",
                    vec![2, 2, k, k],
                    f32s(4 * k * k, 0.5),
                ));
            }
            let bn = match &spec.bn {
                Some(bn) => format!("{path}.{bn}"),
                None => path,
            };
            for (leaf, v) in [
                ("weight", 1.0),
                ("bias", 0.1),
                ("running_mean", 0.2),
                ("running_var", 1.5),
            ] {
                tensors.push((format!("{bn}.{leaf}"), "F32", vec![2], f32s(2, v)));
            }
            tensors.push((
                format!("{bn}.num_batches_tracked"),
                "I64",
                vec![],
                3i64.to_le_bytes().to_vec(),
            ));
        }
        tensors.push(("head.weight".into(), "F16", vec![2, 2], vec![0; 8]));
        out.push((layout.name.clone(), safetensors(&tensors)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed is a checkpoint the tool converts: a fuzzer starting from them starts deep.
    #[test]
    fn seeds_are_valid_checkpoints_of_their_layout() {
        for (name, bytes) in seeds() {
            let dir = std::env::temp_dir().join(format!("seed-{name}-{}", std::process::id()));
            std::fs::write(&dir, &bytes).unwrap();
            let inspection = repvgg_fuse::inspect(&dir, &Settings::default());
            std::fs::remove_file(&dir).unwrap();
            let inspection = inspection.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(inspection.layout.name, name);
            assert_eq!(inspection.blocks.len(), 1, "{name}");
        }
    }
}
