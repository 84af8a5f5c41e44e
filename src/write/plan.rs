//! The deploy file's tensors: which it holds, in what order, where each one's bytes come
//! from. Every tensor not consumed by a fused block is copied byte for byte (or cast, with
//! `--dtype`); each block's branches are replaced by its fused weight and bias. Data is laid out
//! by dtype width, widest first, so every tensor stays aligned to its element size, and within
//! one width in the input's order, so reading the input stays sequential.

use std::collections::BTreeMap;
use std::io::{self, Write};

use safetensors::Dtype;
use serde_json::{Map, Value, json};

use crate::checkpoint::Checkpoint;
use crate::dtype::{dtype_bytes, float_width};
use crate::find::Detection;

/// Where an output tensor's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The input tensor with this index in [`Checkpoint::tensors`], copied (or cast).
    Copy(usize),
    /// The fused weight of block `i` of the detection.
    FusedWeight(usize),
    /// The fused bias of block `i`.
    FusedBias(usize),
}

/// One tensor of the deploy file.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Where its bytes come from.
    pub source: Source,
}

impl Entry {
    /// Size of its data in bytes.
    pub fn len(&self) -> u64 {
        (self.shape.iter().product::<usize>() * dtype_bytes(self.dtype)) as u64
    }

    /// Whether it holds no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The deploy file's tensors, in data order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Tensors in the order their data is written.
    pub entries: Vec<Entry>,
    /// The input's `__metadata__`, kept as it was.
    pub metadata: Option<BTreeMap<String, String>>,
}

impl Plan {
    /// The deploy file for `detection` of `ckpt`; `cast` converts every floating-point tensor.
    pub fn new(ckpt: &Checkpoint, detection: &Detection, cast: Option<Dtype>) -> Plan {
        let consumed = detection.consumed();
        let out_dtype = |d: Dtype| match cast {
            Some(c) if float_width(d).is_some() => c,
            _ => d,
        };
        // (position in input, sub-order, entry)
        let mut keyed: Vec<(u64, u8, Entry)> = Vec::new();
        for (i, t) in ckpt.tensors().iter().enumerate() {
            if consumed.contains(t.name.as_str()) {
                continue;
            }
            keyed.push((
                t.start,
                0,
                Entry {
                    name: t.name.clone(),
                    dtype: out_dtype(t.dtype),
                    shape: t.shape.clone(),
                    source: Source::Copy(i),
                },
            ));
        }
        for (b, block) in detection.blocks.iter().enumerate() {
            let pos = ckpt.get(block.main_weight()).map_or(0, |t| t.start);
            let dtype = out_dtype(block.dtype);
            keyed.push((
                pos,
                0,
                Entry {
                    name: block.deploy_weight.clone(),
                    dtype,
                    shape: block.deploy_shape(),
                    source: Source::FusedWeight(b),
                },
            ));
            keyed.push((
                pos,
                1,
                Entry {
                    name: block.deploy_bias.clone(),
                    dtype,
                    shape: vec![block.out_channels],
                    source: Source::FusedBias(b),
                },
            ));
        }
        keyed.sort_by_key(|(pos, sub, e)| (std::cmp::Reverse(dtype_bytes(e.dtype)), *pos, *sub));
        Plan {
            entries: keyed.into_iter().map(|(_, _, e)| e).collect(),
            metadata: ckpt.metadata().cloned(),
        }
    }

    /// The safetensors header: 8-byte length, then JSON padded with spaces to a multiple of 8.
    pub fn header(&self) -> Vec<u8> {
        let mut map = Map::new();
        if let Some(meta) = &self.metadata {
            map.insert("__metadata__".into(), json!(meta));
        }
        let mut offset = 0u64;
        for e in &self.entries {
            let end = offset + e.len();
            map.insert(
                e.name.clone(),
                json!({ "dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, end] }),
            );
            offset = end;
        }
        let mut text = Value::Object(map).to_string().into_bytes();
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        out
    }

    /// Elements in the file.
    pub fn parameters(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// Total size of the file.
    pub fn file_len(&self) -> u64 {
        self.header().len() as u64 + self.entries.iter().map(Entry::len).sum::<u64>()
    }
}

/// Copies input tensor `index`'s bytes to `out` without decoding them (the kernel does the copy
/// where it can).
pub fn copy_tensor(ckpt: &Checkpoint, index: usize, out: &mut impl Write) -> io::Result<()> {
    ckpt.copy_tensor_to(&ckpt.tensors()[index], out)
}
