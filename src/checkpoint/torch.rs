//! PyTorch checkpoints (`torch.save`): the zip format (torch ≥ 1.6) and the legacy format
//! (`_use_new_zipfile_serialization=False`), read as data.
//!
//! The pickle is interpreted by [`super::pickle`], which never imports or calls anything. This
//! module picks the state dict out of what it built (a top-level dict of tensors, or the one
//! entry among [`CANDIDATES`] that holds tensors or a pickled `nn.Module`), names the tensors as
//! `state_dict()` would, and says where each tensor's bytes lie in the file, so that they are
//! read with positioned reads like a safetensors file's.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::rc::Rc;

use safetensors::Dtype;

use super::pickle::{self, Global, StorageRef, TensorRef, Use, Value};
use super::zip;
use super::{OtherWeights, ReadOptions, SourceInfo, TensorInfo};
use crate::dtype::dtype_bytes;

/// Entries that may hold the model's weights, in a checkpoint that is not a state dict itself.
pub const CANDIDATES: [&str; 8] = [
    "state_dict",
    "model",
    "ema",
    "model_ema",
    "state_dict_ema",
    "module",
    "net",
    "params",
];

/// How deep the walk from the root to a tensor may go (dicts and modules).
const MAX_DEPTH: usize = 100;

/// Values a walk may visit (and tensors it may name): far above any real checkpoint, far below
/// what a pickle that shares one dict at every level of its nesting would take to walk.
const WALK_BUDGET: usize = 1_000_000;

/// The first bytes of a legacy `torch.save` file: protocol 2, then the magic number as LONG1.
const LEGACY_MAGIC: [u8; 12] = [
    0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// Which container a file is, judged by its first bytes.
pub fn sniff(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"PK\x03\x04") {
        Some("torch-zip")
    } else if head.len() >= 14 && head[0] == 0x80 && head[2..14] == LEGACY_MAGIC {
        Some("torch-legacy")
    } else {
        None
    }
}

/// What [`open`] found: tensors in state-dict order, and what the report says about the source.
pub struct Opened {
    /// The tensors, in the order `state_dict()` gives them (for zip files also the order of
    /// their data, as torch writes storages in the order it first meets them).
    pub tensors: Vec<TensorInfo>,
    /// Format, key, prefix, suspicious globals.
    pub source: SourceInfo,
}

/// A `Read` over a byte range of the file by positioned reads.
struct At<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Where each storage's bytes lie: (start in the file, length in bytes), by key.
type Storages = BTreeMap<String, (u64, u64)>;

/// Reads the pickle and storage table of a torch checkpoint of `format` (from [`sniff`]).
pub fn open(
    file: &File,
    file_len: u64,
    format: &str,
    options: &ReadOptions,
) -> Result<Opened, String> {
    let (unpickled, storages) = if format == "torch-zip" {
        open_zip(file, file_len)?
    } else {
        open_legacy(file, file_len)?
    };
    let Selected {
        value: chosen,
        key,
        skipped,
        other_weights,
    } = select(&unpickled.root, options)?;
    let mut named = Vec::new();
    flatten(&chosen, "", 0, &mut named, &mut WALK_BUDGET.clone())?;
    if named.is_empty() {
        let at = key
            .as_deref()
            .map_or("the checkpoint".to_string(), |k| format!("entry `{k}`"));
        return Err(format!("{at} holds no tensor"));
    }
    let prefixed = named.iter().all(|(n, _)| n.starts_with("module."));
    let drop_prefix = prefixed && !options.keep_prefix;
    let mut seen = HashSet::new();
    let mut tensors = Vec::with_capacity(named.len());
    for (name, t) in named {
        let name = if drop_prefix {
            name["module.".len()..].to_string()
        } else {
            name
        };
        if !seen.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        tensors.push(locate(&name, &t, &storages)?);
    }
    let suspicious = unpickled
        .globals
        .iter()
        .filter(|(g, u)| suspicious(g, **u))
        .map(|(g, u)| match u {
            Use::Called => format!("{g} (called)"),
            Use::Named => g.to_string(),
        })
        .collect();
    Ok(Opened {
        tensors,
        source: SourceInfo {
            format: format.to_string(),
            key,
            module_prefix_dropped: drop_prefix,
            skipped,
            suspicious_globals: suspicious,
            other_weights,
        },
    })
}

fn open_zip(file: &File, file_len: u64) -> Result<(pickle::Unpickled, Storages), String> {
    let archive = zip::read(file, file_len)?;
    let pkl = archive
        .names
        .iter()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .min_by_key(|n| n.len())
        .or_else(|| archive.names.iter().find(|n| *n == "data.pkl"))
        .ok_or("the zip has no `data.pkl` entry: not a torch.save file")?
        .clone();
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    if let Some(order) = archive.entries.get(&format!("{prefix}byteorder")) {
        let mut b = vec![0u8; order.len.min(16) as usize];
        file.read_exact_at(&mut b, order.start)
            .map_err(|e| format!("entry `{prefix}byteorder`: {e}"))?;
        if b != b"little" {
            return Err(format!(
                "entry `{prefix}byteorder` says `{}`; only little-endian checkpoints are read",
                String::from_utf8_lossy(&b)
            ));
        }
    }
    let entry = archive.entries[&pkl];
    let reader = BufReader::new(At {
        file,
        pos: entry.start,
    });
    let unpickled =
        pickle::load(reader, entry.len).map_err(|e| format!("entry `{pkl}`: {}", e.0))?;
    let data = format!("{prefix}data/");
    let storages = archive
        .entries
        .iter()
        .filter_map(|(n, e)| Some((n.strip_prefix(&data)?.to_string(), (e.start, e.len))))
        .collect();
    Ok((unpickled, storages))
}

fn open_legacy(file: &File, file_len: u64) -> Result<(pickle::Unpickled, Storages), String> {
    let mut reader = BufReader::new(At { file, pos: 0 });
    let mut pos = 0u64;
    let mut next = |what: &str| -> Result<pickle::Unpickled, String> {
        let p = pickle::load(&mut reader, file_len - pos)
            .map_err(|e| format!("the {what} pickle at byte {pos}: {}", e.0))?;
        pos += p.len;
        Ok(p)
    };
    let magic = next("magic number")?;
    let expected = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    if !matches!(&magic.root, Value::BigInt(b) if b[..] == expected) {
        return Err("the first pickle is not torch's magic number".into());
    }
    match next("protocol version")?.root {
        Value::Int(1001) => {}
        _ => return Err("the protocol version is not 1001".into()),
    }
    let sys = next("system info")?;
    if dict_get(&sys.root, "little_endian").is_some_and(|v| matches!(v, Value::Bool(false))) {
        return Err(
            "the system info says big-endian; only little-endian checkpoints are read".into(),
        );
    }
    let main = next("checkpoint")?;
    let keys = next("storage keys")?;
    let Value::List(keys) = &keys.root else {
        return Err("the storage keys are not a list".into());
    };
    let sizes = storage_sizes(&main.root);
    let mut storages = Storages::new();
    let mut at = pos;
    for key in keys.borrow().iter() {
        let key = match key {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            other => return Err(format!("a storage key that is {}", other.kind())),
        };
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, at).map_err(|_| {
            format!(
                "storage `{key}`: its size at byte {at} is past the end of the file (truncated)"
            )
        })?;
        let numel = u64::from_le_bytes(n);
        let elem = sizes.get(&key).copied().unwrap_or(1);
        let len = numel
            .checked_mul(elem)
            .filter(|&l| at + 8 + l <= file_len)
            .ok_or_else(|| {
                format!("storage `{key}`: {numel} elements of {elem} bytes at byte {} run past the end of the {file_len}-byte file (truncated)", at + 8)
            })?;
        storages.insert(key, (at + 8, len));
        at += 8 + len;
    }
    Ok((main, storages))
}

/// Element sizes of the storages a value names, by key (legacy files size storages by
/// element count).
fn storage_sizes(root: &Value) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.clone(), 0usize)];
    let mut visits = 0usize;
    while let Some((v, depth)) = stack.pop() {
        visits += 1;
        if depth > MAX_DEPTH || visits > 10_000_000 {
            break;
        }
        let mut push = |x: &Value| stack.push((x.clone(), depth + 1));
        match &v {
            Value::Tensor(t) => {
                if let Ok(d) = dtype_of(&t.storage.type_name) {
                    out.insert(t.storage.key.clone(), dtype_bytes(d) as u64);
                }
            }
            Value::Storage(s) => {
                if let Ok(d) = dtype_of(&s.type_name) {
                    out.insert(s.key.clone(), dtype_bytes(d) as u64);
                }
            }
            Value::Tuple(t) => t.iter().for_each(&mut push),
            Value::List(l) => l.borrow().iter().for_each(&mut push),
            Value::Dict(d) => d.borrow().iter().for_each(|(_, x)| push(x)),
            Value::Object(o) => {
                let o = o.borrow();
                push(&o.args);
                if let Some(s) = &o.state {
                    push(s);
                }
            }
            _ => {}
        }
    }
    out
}

fn dict_get(v: &Value, key: &str) -> Option<Value> {
    match v {
        Value::Dict(d) => d
            .borrow()
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v.clone()),
        _ => None,
    }
}

/// The state dict of a pickled `nn.Module`: its BUILD state, when that has `_parameters`.
fn module_state(v: &Value) -> Option<Value> {
    let Value::Object(o) = v else { return None };
    let state = o.borrow().state.clone()?;
    dict_get(&state, "_parameters").map(|_| state)
}

/// Whether `v` is a tensor, a module, or a dict with a tensor somewhere inside.
fn holds_tensors(v: &Value, depth: usize) -> bool {
    holds_within(v, depth, &mut WALK_BUDGET.clone())
}

/// Like [`holds_tensors`], spending one of `budget` per value looked at: a pickle can share one
/// dict many times over at every level (memo GETs), and a walk of every path would never end.
fn holds_within(v: &Value, depth: usize, budget: &mut usize) -> bool {
    *budget = budget.saturating_sub(1);
    if depth > MAX_DEPTH || *budget == 0 {
        // Too deep to tell: let the walk refuse it with a message that says so.
        return true;
    }
    match v {
        Value::Tensor(_) | Value::Unsupported(_) => true,
        Value::Dict(d) => d
            .borrow()
            .iter()
            .any(|(_, x)| holds_within(x, depth + 1, budget)),
        _ => module_state(v).is_some(),
    }
}

fn key_text(k: &Value) -> Option<String> {
    match k {
        Value::Str(s) => Some(s.to_string()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// The top-level keys of a dict (none for anything else).
fn top_keys(v: &Value) -> Vec<String> {
    match v {
        Value::Dict(d) => d.borrow().iter().filter_map(|(k, _)| key_text(k)).collect(),
        _ => Vec::new(),
    }
}

/// The entry `--key` names (dotted for deeper nesting, through modules' `_modules`).
/// What [`select`] picked: the value to read, the key it was found under, the other top-level
/// entries, and the other weights of a raw/EMA pair when the pick was between the two.
struct Selected {
    value: Value,
    key: Option<String>,
    skipped: Vec<String>,
    other_weights: Option<OtherWeights>,
}

/// Raw/EMA pairs of candidate entries: the raw entry, the EMA entry, whether the framework's
/// own loader reads the EMA one, and whose convention that is.
const RAW_AND_EMA: [(&str, &str, bool, &str); 3] = [
    ("model", "ema", true, "ultralytics loads `ema` when present"),
    (
        "state_dict",
        "state_dict_ema",
        false,
        "timm's load_checkpoint reads `state_dict` unless use_ema=True",
    ),
    (
        "state_dict",
        "model_ema",
        false,
        "timm's load_checkpoint reads `state_dict` unless use_ema=True",
    ),
];

/// When the two candidates `found` are a raw/EMA pair ([`RAW_AND_EMA`]): the one the
/// framework's loader reads, and the other.
fn raw_and_ema(found: &[String]) -> Option<(usize, OtherWeights)> {
    if found.len() != 2 {
        return None;
    }
    let at = |key: &str| found.iter().position(|k| k == key);
    RAW_AND_EMA
        .iter()
        .find_map(|&(raw, ema, reads_ema, convention)| {
            let (raw_at, ema_at) = (at(raw)?, at(ema)?);
            let (used, other) = if reads_ema {
                (ema_at, raw_at)
            } else {
                (raw_at, ema_at)
            };
            let other = OtherWeights {
                key: found[other].clone(),
                used_is_ema: reads_ema,
                convention,
            };
            Some((used, other))
        })
}

fn select_key(root: &Value, key: &str) -> Result<Selected, String> {
    let mut cur = root.clone();
    let mut walked = String::new();
    for part in key.split('.') {
        let inner = module_state(&cur)
            .and_then(|s| dict_get(&s, "_modules"))
            .unwrap_or(cur.clone());
        let next = dict_get(&inner, part).ok_or_else(|| {
            let at = if walked.is_empty() {
                "the top level".to_string()
            } else {
                format!("`{walked}`")
            };
            format!(
                "--key {key}: {at} has no entry `{part}` (it has: {})",
                list(&top_keys(&inner))
            )
        })?;
        walked = if walked.is_empty() {
            part.to_string()
        } else {
            format!("{walked}.{part}")
        };
        cur = next;
    }
    if !holds_tensors(&cur, 0) {
        return Err(format!(
            "--key {key}: that entry is {}, with no tensor in it",
            cur.kind()
        ));
    }
    let skipped = top_keys(root)
        .into_iter()
        .filter(|k| Some(k.as_str()) != key.split('.').next())
        .collect();
    Ok(Selected {
        value: cur,
        key: Some(key.to_string()),
        skipped,
        other_weights: None,
    })
}

/// The value to read (with the key it was found under) and the other top-level entries.
fn select(root: &Value, options: &ReadOptions) -> Result<Selected, String> {
    if let Some(key) = &options.key {
        return select_key(root, key);
    }
    let whole = || Selected {
        value: root.clone(),
        key: None,
        skipped: Vec::new(),
        other_weights: None,
    };
    if module_state(root).is_some() {
        return Ok(whole());
    }
    let Value::Dict(d) = root else {
        return Err(format!(
            "the checkpoint is {}, not a dict of tensors or a module",
            root.kind()
        ));
    };
    let entries = d.borrow();
    let found: Vec<String> = entries
        .iter()
        .filter_map(|(k, v)| {
            let k = key_text(k)?;
            let fits = matches!(v, Value::Dict(_) | Value::Object(_)) && holds_tensors(v, 0);
            (CANDIDATES.contains(&k.as_str()) && fits).then_some(k)
        })
        .collect();
    let direct = entries
        .iter()
        .any(|(_, v)| matches!(v, Value::Tensor(_) | Value::Unsupported(_)));
    let pick = |at: usize, other_weights: Option<OtherWeights>| {
        let skipped = top_keys(root)
            .into_iter()
            .filter(|k| *k != found[at])
            .collect();
        Ok(Selected {
            value: dict_get(root, &found[at]).unwrap_or(Value::None),
            key: Some(found[at].clone()),
            skipped,
            other_weights,
        })
    };
    if let Some((at, other)) = raw_and_ema(&found) {
        return pick(at, Some(other));
    }
    match found.len() {
        1 => pick(0, None),
        0 if direct => Ok(whole()),
        0 => Err(format!(
            "no state dict found: the top-level entries ({}) include none of {} holding tensors or a module; name the one to read with --key",
            list(&top_keys(root)),
            CANDIDATES.join(", ")
        )),
        _ => Err(format!(
            "{} entries could be the weights: {}; pick one with --key (e.g. --key {})",
            found.len(),
            found.join(", "),
            found[0]
        )),
    }
}

fn list(keys: &[String]) -> String {
    if keys.is_empty() {
        return "none".into();
    }
    let shown: Vec<&str> = keys.iter().take(20).map(String::as_str).collect();
    let more = if keys.len() > 20 {
        format!(", … {} more", keys.len() - 20)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join(", "))
}

/// Takes one from `budget`, refusing the walk once it is spent.
fn spend(budget: &mut usize, at: &str) -> Result<(), String> {
    *budget = budget.saturating_sub(1);
    if *budget == 0 {
        return Err(format!(
            "the pickle shares its values so often that walking it visits more than {WALK_BUDGET} of them (at `{at}`)"
        ));
    }
    Ok(())
}

/// Names every tensor under `v` as `state_dict()` would: dict keys and module attribute names
/// joined with dots; a module's parameters, then its persistent buffers, then its children.
fn flatten(
    v: &Value,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, Rc<TensorRef>)>,
    budget: &mut usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "`{prefix}` is nested more than {MAX_DEPTH} levels deep"
        ));
    }
    spend(budget, prefix)?;
    let entry = |k: &str| format!("{prefix}{k}");
    if let Some(state) = module_state(v) {
        let skip: HashSet<String> = match &dict_get(&state, "_non_persistent_buffers_set") {
            Some(Value::List(l)) => l.borrow().iter().filter_map(key_text).collect(),
            _ => HashSet::new(),
        };
        for part in ["_parameters", "_buffers"] {
            if let Some(Value::Dict(d)) = &dict_get(&state, part) {
                for (k, x) in d.borrow().iter() {
                    spend(budget, prefix)?;
                    let k = key_text(k)
                        .ok_or_else(|| format!("`{prefix}`: a {part} key that is not a str"))?;
                    if !skip.contains(&k) {
                        tensor_leaf(x, &entry(&k), out)?;
                    }
                }
            }
        }
        if let Some(Value::Dict(d)) = &dict_get(&state, "_modules") {
            for (k, x) in d.borrow().iter() {
                spend(budget, prefix)?;
                let k = key_text(k)
                    .ok_or_else(|| format!("`{prefix}`: a submodule key that is not a str"))?;
                if module_state(x).is_some() {
                    flatten(x, &format!("{}.", entry(&k)), depth + 1, out, budget)?;
                }
            }
        }
        return Ok(());
    }
    match v {
        Value::Dict(d) => {
            for (k, x) in d.borrow().iter() {
                spend(budget, prefix)?;
                let Some(k) = key_text(k) else { continue };
                match x {
                    Value::Tensor(_) | Value::Unsupported(_) => tensor_leaf(x, &entry(&k), out)?,
                    Value::Dict(_) | Value::Object(_) => {
                        flatten(x, &format!("{}.", entry(&k)), depth + 1, out, budget)?
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn tensor_leaf(
    x: &Value,
    name: &str,
    out: &mut Vec<(String, Rc<TensorRef>)>,
) -> Result<(), String> {
    match x {
        Value::Tensor(t) => {
            out.push((name.to_string(), t.clone()));
            Ok(())
        }
        Value::Unsupported(f) => Err(format!(
            "tensor `{name}` is rebuilt by {f} (a sparse, quantized or other special tensor); only dense tensors are read"
        )),
        Value::None => Ok(()),
        other => Err(format!("tensor `{name}` is {}, not a tensor", other.kind())),
    }
}

/// The safetensors dtype of a torch storage type.
fn dtype_of(type_name: &str) -> Result<Dtype, String> {
    Ok(match type_name {
        "FloatStorage" => Dtype::F32,
        "DoubleStorage" => Dtype::F64,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::BOOL,
        "UInt16Storage" => Dtype::U16,
        "UInt32Storage" => Dtype::U32,
        "UInt64Storage" => Dtype::U64,
        "Float8_e4m3fnStorage" => Dtype::F8_E4M3,
        "Float8_e5m2Storage" => Dtype::F8_E5M2,
        t if t.starts_with("Complex") => {
            return Err(format!("is complex ({t}); complex tensors are not read"));
        }
        t if t.starts_with("Q") => {
            return Err(format!(
                "is quantized ({t}); quantized tensors are not read"
            ));
        }
        t => return Err(format!("has storage type {t}, which is not known")),
    })
}

/// Where `t`'s bytes lie, checked against its storage's bytes in the file.
fn locate(name: &str, t: &TensorRef, storages: &Storages) -> Result<TensorInfo, String> {
    let s: &StorageRef = &t.storage;
    let dtype = dtype_of(&s.type_name).map_err(|e| format!("tensor `{name}` {e}"))?;
    let es = dtype_bytes(dtype) as u64;
    let &(base, bytes) = storages.get(&s.key).ok_or_else(|| {
        format!(
            "tensor `{name}`: its storage `data/{}` is missing from the file",
            s.key
        )
    })?;
    let overflow = || format!("tensor `{name}`: its shape {:?} overflows", t.shape);
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(overflow)?;
    let first = s.view_offset.checked_add(t.offset).ok_or_else(overflow)?;
    // One past the furthest element, in elements from the storage's start.
    let end = if numel == 0 {
        first
    } else {
        t.shape
            .iter()
            .zip(&t.stride)
            .try_fold(first, |a, (&d, &st)| {
                a.checked_add((d - 1).checked_mul(st)?)
            })
            .and_then(|e| e.checked_add(1))
            .ok_or_else(overflow)?
    };
    let need = end.checked_mul(es).ok_or_else(overflow)?;
    if need > bytes {
        return Err(format!(
            "tensor `{name}`: needs bytes up to {need} of its storage `data/{}`, which holds {bytes} (missing or short storage)",
            s.key
        ));
    }
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let contiguous = numel == 0 || {
        let mut want = 1u64;
        t.shape.iter().zip(&t.stride).rev().all(|(&d, &st)| {
            let ok = d == 1 || st == want;
            want *= d;
            ok
        })
    };
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        start: base + first * es,
        len: numel * es,
        strides: (!contiguous).then(|| t.stride.iter().map(|&s| s as usize).collect()),
    })
}

/// Modules that run commands, load code or reach the system.
const MODULES: [&str; 28] = [
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "socket",
    "importlib",
    "runpy",
    "pty",
    "ctypes",
    "pickle",
    "_pickle",
    "marshal",
    "code",
    "codeop",
    "webbrowser",
    "multiprocessing",
    "signal",
    "threading",
    "asyncio",
    "urllib",
    "http",
    "requests",
    "pdb",
    "bdb",
    "timeit",
    "commands",
];
/// Builtins that evaluate code or reach attributes.
const BUILTINS: [&str; 17] = [
    "eval",
    "exec",
    "compile",
    "getattr",
    "setattr",
    "delattr",
    "__import__",
    "open",
    "input",
    "breakpoint",
    "globals",
    "locals",
    "vars",
    "execfile",
    "apply",
    "memoryview",
    "help",
];

/// Modules whose functions a checkpoint's reconstructors call.
const KNOWN: [&str; 12] = [
    "torch",
    "numpy",
    "collections",
    "copyreg",
    "_codecs",
    "functools",
    "datetime",
    "pathlib",
    "argparse",
    "types",
    "enum",
    "decimal",
];
/// Builtins a checkpoint may call: containers and scalars.
const BUILTINS_OK: [&str; 15] = [
    "set",
    "frozenset",
    "list",
    "dict",
    "tuple",
    "slice",
    "range",
    "complex",
    "bytearray",
    "bytes",
    "object",
    "float",
    "int",
    "str",
    "bool",
];

/// Whether a global is one a checkpoint has no use for.
///
/// Named anywhere: the modules and builtins that run commands, load code or reach attributes
/// (`os`, `posix`, `subprocess`, `builtins.eval`, `builtins.getattr`, ...). Called (REDUCE):
/// any function outside the reconstructors checkpoints use (torch, numpy, collections,
/// copyreg, functools.partial, ...). Classes (capitalised names) that are called or built are
/// framework and container classes and pass.
pub fn suspicious(g: &Global, used: Use) -> bool {
    let root = g.module.split('.').next().unwrap_or("");
    if MODULES.contains(&root) {
        return true;
    }
    if matches!(g.module.as_str(), "builtins" | "__builtin__")
        && BUILTINS.contains(&g.name.as_str())
    {
        return true;
    }
    if matches!(g.module.as_str(), "operator" | "_operator") && g.name != "itemgetter" {
        return true;
    }
    if g.module == "torch" && matches!(g.name.as_str(), "load" | "save")
        || g.module.starts_with("torch.hub")
        || g.module.starts_with("torch.package")
        || g.module.starts_with("torch.utils.cpp_extension")
    {
        return true;
    }
    if used != Use::Called || g.name.starts_with(|c: char| c.is_ascii_uppercase()) {
        return false;
    }
    !(KNOWN.contains(&root)
        || matches!(g.module.as_str(), "builtins" | "__builtin__")
            && BUILTINS_OK.contains(&g.name.as_str()))
}
