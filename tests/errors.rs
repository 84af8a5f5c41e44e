//! Every malformed or unconvertible input is refused the same way: exit 2, one short error on
//! stderr that names the file, the tensor or block at fault and what was expected, and nothing
//! written — no output, no temp file, an existing output and report as they were, the input
//! byte for byte as it was. Never a panic.
//!
//! The bad inputs are built here from literal bytes: [`safetensors`] lays out a header and data
//! from a list of tensors, [`raw`] takes a header string as it is for the broken-format cases.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_repvgg-fuse");

// ---------------------------------------------------------------------------------------------
// Building checkpoints from bytes

/// One tensor of a hand-built checkpoint.
#[derive(Clone, Debug)]
struct T {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn t(name: &str, dtype: &'static str, shape: &[usize], data: Vec<u8>) -> T {
    T {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// An F32 tensor of `shape` filled by `f(i)`.
fn f32t(name: &str, shape: &[usize], f: impl Fn(usize) -> f32) -> T {
    let n = shape.iter().product();
    t(name, "F32", shape, f32_bytes((0..n).map(f)))
}

/// A header (taken as it is) and the data after it.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A well-formed safetensors file: the tensors' data back to back, in list order.
fn safetensors(tensors: &[T]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0;
    let mut data = Vec::new();
    for t in tensors {
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dtype,
                "shape": t.shape,
                "data_offsets": [offset, offset + t.data.len()],
            }),
        );
        offset += t.data.len();
        data.extend_from_slice(&t.data);
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    raw(&text, &data)
}

/// A timm `RepVggBlock` at `prefix`: k×k conv + BN, 1×1 conv + BN, and an identity BN when
/// `identity`. Values are small and smooth; BN variances are positive.
fn timm_block(prefix: &str, out: usize, cpg: usize, k: usize, identity: bool) -> Vec<T> {
    let wave = |seed: f32| move |i: usize| ((i as f32 + seed) * 0.37).sin() * 0.5;
    let mut v = Vec::new();
    let mut bn = |path: &str, seed: f32| {
        v.push(f32t(&format!("{prefix}.{path}.weight"), &[out], |i| {
            1.0 + wave(seed)(i) * 0.2
        }));
        v.push(f32t(
            &format!("{prefix}.{path}.bias"),
            &[out],
            wave(seed + 1.0),
        ));
        v.push(f32t(
            &format!("{prefix}.{path}.running_mean"),
            &[out],
            wave(seed + 2.0),
        ));
        v.push(f32t(&format!("{prefix}.{path}.running_var"), &[out], |i| {
            1.0 + wave(seed + 3.0)(i).abs()
        }));
        v.push(t(
            &format!("{prefix}.{path}.num_batches_tracked"),
            "I64",
            &[],
            7i64.to_le_bytes().to_vec(),
        ));
    };
    bn("conv_kxk.bn", 1.0);
    bn("conv_1x1.bn", 2.0);
    if identity {
        bn("identity", 3.0);
    }
    v.push(f32t(
        &format!("{prefix}.conv_kxk.conv.weight"),
        &[out, cpg, k, k],
        wave(4.0),
    ));
    v.push(f32t(
        &format!("{prefix}.conv_1x1.conv.weight"),
        &[out, cpg, 1, 1],
        wave(5.0),
    ));
    v
}

/// A small timm-repvgg model: a stem block (3 → 8, no identity), one block with an identity
/// (8 → 8), and a head that passes through.
fn model() -> Vec<T> {
    let mut m = timm_block("stem", 8, 3, 3, false);
    m.extend(timm_block("stages.0.0", 8, 8, 3, true));
    m.push(f32t("head.fc.weight", &[4, 8], |i| i as f32 * 0.01));
    m.push(f32t("head.fc.bias", &[4], |_| 0.5));
    m
}

trait Edit {
    fn set(self, tensor: T) -> Self;
    fn without(self, name: &str) -> Self;
    fn poke(self, name: &str, index: usize, value: f32) -> Self;
}

impl Edit for Vec<T> {
    /// Replaces the tensor of the same name.
    fn set(mut self, tensor: T) -> Self {
        let slot = self
            .iter_mut()
            .find(|x| x.name == tensor.name)
            .unwrap_or_else(|| panic!("no tensor {} to replace", tensor.name));
        *slot = tensor;
        self
    }

    fn without(mut self, name: &str) -> Self {
        let before = self.len();
        self.retain(|x| x.name != name);
        assert_eq!(self.len() + 1, before, "no tensor {name} to remove");
        self
    }

    /// Sets element `index` of an F32 tensor.
    fn poke(mut self, name: &str, index: usize, value: f32) -> Self {
        let x = self
            .iter_mut()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        assert_eq!(x.dtype, "F32");
        x.data[index * 4..index * 4 + 4].copy_from_slice(&value.to_le_bytes());
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Running the binary and checking that nothing changed

/// A scratch folder holding the input `train.safetensors`.
struct Case {
    dir: tempfile::TempDir,
    input: PathBuf,
    /// Where conversions write: `out.safetensors` in the folder.
    out: PathBuf,
}

impl Case {
    fn new(bytes: &[u8]) -> Case {
        let dir = tempfile::tempdir().expect("temp dir");
        let input = dir.path().join("train.safetensors");
        std::fs::write(&input, bytes).expect("write input");
        let out = dir.path().join("out.safetensors");
        Case { dir, input, out }
    }

    fn of(tensors: &[T]) -> Case {
        Case::new(&safetensors(tensors))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every file under the folder, with a hash of its bytes.
    fn snapshot(&self) -> BTreeMap<PathBuf, u64> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, u64>) {
            for entry in std::fs::read_dir(dir).expect("read dir") {
                let path = entry.expect("dir entry").path();
                let meta = std::fs::symlink_metadata(&path).expect("metadata");
                if meta.is_dir() {
                    walk(&path, out);
                } else if meta.file_type().is_symlink() {
                    out.insert(path.clone(), hash(path.to_string_lossy().as_bytes()));
                } else {
                    out.insert(path.clone(), hash(&std::fs::read(&path).expect("read")));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.dir.path(), &mut out);
        out
    }

    fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Command::new(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run repvgg-fuse")
    }

    /// Converts to `out.safetensors` with `extra` arguments; checks that the run is refused
    /// with exit 2, that stderr names the input and every one of `culprits`, and that no file
    /// in the folder was created, removed or changed. Returns stderr.
    fn refused(&self, extra: &[&str], culprits: &[&str]) -> String {
        let mut args: Vec<&OsStr> = vec![self.input.as_os_str(), "-o".as_ref()];
        args.push(self.out.as_os_str());
        args.extend(extra.iter().map(OsStr::new));
        self.refused_with(&args, &self.input, culprits)
    }

    /// Like [`Case::refused`] for `inspect`, which must refuse the same inputs.
    fn inspect_refused(&self, culprits: &[&str]) -> String {
        let args = [OsStr::new("inspect"), self.input.as_os_str()];
        self.refused_with(&args, &self.input, culprits)
    }

    /// Runs `args`; checks exit 2, stderr naming `file` and `culprits`, and that nothing in
    /// the folder changed.
    fn refused_with(&self, args: &[&OsStr], file: &Path, culprits: &[&str]) -> String {
        let before = self.snapshot();
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(2),
            "expected exit 2 for {args:?}\nstdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!stderr.contains("panicked"), "panic: {stderr}");
        assert!(
            stderr.contains(&file.display().to_string()),
            "stderr does not name the file {}: {stderr}",
            file.display()
        );
        for c in culprits {
            assert!(stderr.contains(c), "stderr does not say `{c}`: {stderr}");
        }
        assert!(
            stderr.lines().count() <= 3,
            "the error should be short: {stderr}"
        );
        let after = self.snapshot();
        assert_eq!(before, after, "a refused run changed the folder");
        stderr
    }

    /// Converts successfully (exit 0).
    fn converts(&self, extra: &[&str]) -> Output {
        let mut args: Vec<&OsStr> = vec![self.input.as_os_str(), "-o".as_ref()];
        args.push(self.out.as_os_str());
        args.extend(extra.iter().map(OsStr::new));
        let out = self.run(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "expected success\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Both `convert` and `inspect` refuse `bytes`, naming `culprits`.
fn refused_everywhere(bytes: &[u8], culprits: &[&str]) {
    let case = Case::new(bytes);
    case.refused(&[], culprits);
    case.inspect_refused(culprits);
}

// ---------------------------------------------------------------------------------------------
// The baseline: the model every other case breaks in one place converts.

#[test]
fn baseline_model_converts_and_verifies() {
    let case = Case::of(&model());
    case.converts(&["--verify"]);
    assert!(case.out.exists());
    assert!(case.path("out.report.json").exists());
}

// ---------------------------------------------------------------------------------------------
// Broken files

#[test]
fn empty_file() {
    refused_everywhere(b"", &["0 bytes long", "8-byte header length"]);
}

#[test]
fn short_file() {
    refused_everywhere(b"\x10\0\0\0\0", &["5 bytes long"]);
}

#[test]
fn header_length_only() {
    refused_everywhere(&0u64.to_le_bytes(), &["header is not valid JSON"]);
}

#[test]
fn header_length_past_end() {
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    refused_everywhere(
        &bytes,
        &["header length 1000", "past the end of the 10-byte file"],
    );
}

#[test]
fn header_length_huge() {
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    refused_everywhere(&bytes, &["header length 18446744073709551615", "limit"]);
}

#[test]
fn header_not_json() {
    refused_everywhere(&raw("{not json", b""), &["header is not valid JSON"]);
}

#[test]
fn header_not_utf8() {
    let mut bytes = 4u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\xff\xfe}");
    refused_everywhere(&bytes, &["header is not UTF-8"]);
}

#[test]
fn header_not_an_object() {
    refused_everywhere(&raw("[1, 2, 3]", b""), &["header", "JSON object"]);
}

#[test]
fn header_entry_not_an_object() {
    refused_everywhere(
        &raw(r#"{"a.weight": 3}"#, b""),
        &["`a.weight`", "bad header entry"],
    );
}

#[test]
fn header_entry_missing_field() {
    let header = r#"{"a.weight": {"dtype": "F32", "shape": [1]}}"#;
    refused_everywhere(&raw(header, &[0; 4]), &["`a.weight`", "data_offsets"]);
}

#[test]
fn header_entry_unknown_field() {
    let header = r#"{"a.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}"#;
    refused_everywhere(&raw(header, &[0; 4]), &["`a.weight`", "unknown field `x`"]);
}

#[test]
fn header_negative_shape() {
    let header = r#"{"a.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#;
    refused_everywhere(&raw(header, &[0; 4]), &["`a.weight`", "bad header entry"]);
}

#[test]
fn metadata_not_strings() {
    let header = r#"{"__metadata__": {"format": 1}}"#;
    refused_everywhere(
        &raw(header, b""),
        &["`__metadata__` must map strings to strings"],
    );
}

#[test]
fn unknown_dtype() {
    let header = r#"{"a.weight": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}"#;
    refused_everywhere(
        &raw(header, &[0; 4]),
        &["`a.weight`", "unknown variant `F17`"],
    );
}

#[test]
fn sub_byte_dtype() {
    let header = r#"{"a.weight": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}"#;
    refused_everywhere(&raw(header, &[0; 2]), &["`a.weight`", "F4", "sub-byte"]);
}

#[test]
fn duplicate_tensor_name() {
    let header = r#"{"a.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                     "a.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#;
    refused_everywhere(&raw(header, &[0; 8]), &["`a.weight` appears twice"]);
}

#[test]
fn shape_size_mismatch() {
    let header = r#"{"a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}"#;
    refused_everywhere(
        &raw(header, &[0; 20]),
        &["`a.weight` is 20 bytes", "[2, 3]", "needs 24"],
    );
}

#[test]
fn shape_product_overflows() {
    let header = r#"{"a.weight": {"dtype": "F32",
                     "shape": [4294967296, 4294967296, 0], "data_offsets": [0, 0]}}"#;
    refused_everywhere(&raw(header, b""), &["`a.weight`", "more than fits"]);
}

#[test]
fn offsets_past_end() {
    let header = r#"{"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#;
    refused_everywhere(
        &raw(header, &[0; 8]),
        &["`a.weight` ends at byte 16", "past its end at 8"],
    );
}

#[test]
fn offsets_overlapping() {
    let header = r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#;
    refused_everywhere(
        &raw(header, &[0; 12]),
        &["`b` starts at byte 4", "overlapping"],
    );
}

#[test]
fn offsets_with_hole() {
    let header = r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                     "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}"#;
    refused_everywhere(
        &raw(header, &[0; 12]),
        &["`b` starts at byte 8", "hole after byte 4"],
    );
}

#[test]
fn offsets_backwards() {
    let header = r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                     "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}"#;
    refused_everywhere(&raw(header, &[0; 8]), &["`b`", "run backwards"]);
}

#[test]
fn trailing_bytes_after_data() {
    let header = r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#;
    refused_everywhere(&raw(header, &[0; 7]), &["cover 4 bytes", "holds 7"]);
}

#[test]
fn truncated_file() {
    let bytes = safetensors(&model());
    let cut = &bytes[..bytes.len() - 10];
    refused_everywhere(cut, &["past its end", "truncated"]);
}

#[test]
fn truncated_header() {
    let bytes = safetensors(&model());
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    refused_everywhere(&bytes[..8 + len / 2], &["past the end"]);
}

#[test]
fn random_bytes() {
    // A fixed xorshift stream: the same bytes every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for len in [1usize, 8, 9, 64, 1000, 4096] {
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let case = Case::new(&bytes);
        case.refused(&[], &["not a valid safetensors file"]);
    }
    // Random bytes behind a plausible small header length.
    for _ in 0..8 {
        let mut bytes = 40u64.to_le_bytes().to_vec();
        bytes.extend((0..100).map(|_| next() as u8));
        let case = Case::new(&bytes);
        case.refused(&[], &["not a valid safetensors file"]);
    }
}

#[test]
fn input_is_a_directory() {
    let case = Case::new(b"");
    let sub = case.path("sub");
    std::fs::create_dir(&sub).unwrap();
    let args = [sub.as_os_str(), OsStr::new("-o"), case.out.as_os_str()];
    case.refused_with(&args, &sub, &["directory"]);
}

#[test]
fn input_missing() {
    let case = Case::new(b"");
    let missing = case.path("missing.safetensors");
    let args = [missing.as_os_str(), OsStr::new("-o"), case.out.as_os_str()];
    case.refused_with(&args, &missing, &["cannot read"]);
}

// ---------------------------------------------------------------------------------------------
// Files with nothing to convert, or blocks that cannot be fused

#[test]
fn no_reparameterizable_block() {
    let m = vec![
        f32t("features.0.weight", &[4, 3, 3, 3], |i| i as f32),
        f32t("fc.weight", &[2, 4], |_| 1.0),
    ];
    refused_everywhere(
        &safetensors(&m),
        &["no re-parameterizable block found", "expected"],
    );
}

#[test]
fn no_tensors_at_all() {
    refused_everywhere(&raw("{}", b""), &["no re-parameterizable block found"]);
}

#[test]
fn deploy_file_as_input() {
    let m = vec![
        f32t("stages.0.0.reparam_conv.weight", &[4, 4, 3, 3], |_| 0.1),
        f32t("stages.0.0.reparam_conv.bias", &[4], |_| 0.1),
    ];
    refused_everywhere(
        &safetensors(&m),
        &["no re-parameterizable block", "deploy file already"],
    );
}

#[test]
fn block_missing_bn_running_var() {
    let m = model().without("stages.0.0.conv_kxk.bn.running_var");
    refused_everywhere(
        &safetensors(&m),
        &["block `stages.0.0`", "conv_kxk", "missing running_var"],
    );
}

#[test]
fn block_missing_whole_bn() {
    let mut m = model();
    m.retain(|x| !x.name.starts_with("stages.0.0.conv_1x1.bn."));
    refused_everywhere(
        &safetensors(&m),
        &[
            "block `stages.0.0`",
            "conv_1x1",
            "stages.0.0.conv_1x1.bn.weight",
        ],
    );
}

#[test]
fn block_missing_identity_bn_weight() {
    let m = model().without("stages.0.0.identity.weight");
    refused_everywhere(
        &safetensors(&m),
        &["block `stages.0.0`", "identity", "missing weight"],
    );
}

#[test]
fn block_missing_conv_weight() {
    let m = model().without("stages.0.0.conv_1x1.conv.weight");
    refused_everywhere(
        &safetensors(&m),
        &[
            "block `stages.0.0`",
            "no conv weight `stages.0.0.conv_1x1.conv.weight`",
        ],
    );
}

#[test]
fn block_missing_main_branch() {
    let mut m = model();
    m.retain(|x| !x.name.starts_with("stages.0.0.conv_kxk."));
    refused_everywhere(
        &safetensors(&m),
        &[
            "`stages.0.0.conv_1x1.conv.weight`",
            "block at `stages.0.0`",
            "conv_kxk",
        ],
    );
}

#[test]
fn branch_out_channels_disagree() {
    let m = model().set(f32t(
        "stages.0.0.conv_1x1.conv.weight",
        &[4, 8, 1, 1],
        |_| 0.1,
    ));
    refused_everywhere(
        &safetensors(&m),
        &[
            "block `stages.0.0`",
            "`stages.0.0.conv_1x1.conv.weight` has shape [4, 8, 1, 1]",
            "expected [8, 8, k, k]",
        ],
    );
}

#[test]
fn branch_in_channels_disagree() {
    let m = model().set(f32t("stem.conv_1x1.conv.weight", &[8, 4, 1, 1], |_| 0.1));
    refused_everywhere(
        &safetensors(&m),
        &[
            "block `stem`",
            "`stem.conv_1x1.conv.weight`",
            "expected [8, 3, k, k]",
        ],
    );
}

#[test]
fn one_by_one_branch_not_one_by_one() {
    let m = model().set(f32t(
        "stages.0.0.conv_1x1.conv.weight",
        &[8, 8, 3, 3],
        |_| 0.1,
    ));
    refused_everywhere(
        &safetensors(&m),
        &[
            "block `stages.0.0`",
            "1×1 branch `conv_1x1`",
            "expected a 1×1 kernel",
        ],
    );
}

#[test]
fn kernel_not_square() {
    let m = model().set(f32t(
        "stages.0.0.conv_kxk.conv.weight",
        &[8, 8, 3, 1],
        |_| 0.1,
    ));
    refused_everywhere(
        &safetensors(&m),
        &[
            "`stages.0.0.conv_kxk.conv.weight`",
            "3×1",
            "square kernel of odd size",
        ],
    );
}

#[test]
fn kernel_even() {
    let m = model().set(f32t(
        "stages.0.0.conv_kxk.conv.weight",
        &[8, 8, 2, 2],
        |_| 0.1,
    ));
    refused_everywhere(
        &safetensors(&m),
        &["`stages.0.0.conv_kxk.conv.weight`", "odd size"],
    );
}

#[test]
fn kernel_too_large() {
    let m = model().set(f32t("stem.conv_kxk.conv.weight", &[8, 3, 33, 33], |_| 0.1));
    refused_everywhere(
        &safetensors(&m),
        &["`stem.conv_kxk.conv.weight`", "33×33", "at most 31×31"],
    );
}

#[test]
fn conv_weight_wrong_rank() {
    let m = model().set(f32t("stages.0.0.conv_kxk.conv.weight", &[8, 8, 9], |_| 0.1));
    refused_everywhere(
        &safetensors(&m),
        &[
            "`stages.0.0.conv_kxk.conv.weight` has shape [8, 8, 9]",
            "4 dimensions",
        ],
    );
}

#[test]
fn conv_weight_integer_dtype() {
    let m = model().set(t(
        "stem.conv_kxk.conv.weight",
        "I32",
        &[8, 3, 3, 3],
        vec![0; 8 * 27 * 4],
    ));
    refused_everywhere(
        &safetensors(&m),
        &["`stem.conv_kxk.conv.weight` is I32", "floating-point"],
    );
}

#[test]
fn conv_weight_no_channels() {
    let m = model().set(f32t("stem.conv_kxk.conv.weight", &[0, 3, 3, 3], |_| 0.0));
    refused_everywhere(
        &safetensors(&m),
        &["`stem.conv_kxk.conv.weight`", "no channels"],
    );
}

#[test]
fn bn_vector_wrong_length() {
    let m = model().set(f32t("stages.0.0.conv_kxk.bn.bias", &[7], |_| 0.0));
    refused_everywhere(
        &safetensors(&m),
        &[
            "block `stages.0.0`",
            "`stages.0.0.conv_kxk.bn.bias` has shape [7]",
            "expected [8]",
        ],
    );
}

#[test]
fn bn_vector_wrong_rank() {
    let m = model().set(f32t("stages.0.0.identity.running_mean", &[2, 4], |_| 0.0));
    refused_everywhere(
        &safetensors(&m),
        &[
            "`stages.0.0.identity.running_mean` has shape [2, 4]",
            "expected [8]",
        ],
    );
}

#[test]
fn bn_vector_integer_dtype() {
    let m = model().set(t(
        "stages.0.0.conv_1x1.bn.running_var",
        "I64",
        &[8],
        vec![1; 64],
    ));
    refused_everywhere(
        &safetensors(&m),
        &[
            "`stages.0.0.conv_1x1.bn.running_var` is I64",
            "floating-point",
        ],
    );
}

#[test]
fn conv_bias_wrong_length() {
    let mut m = model();
    m.push(f32t("stem.conv_kxk.conv.bias", &[3], |_| 0.0));
    refused_everywhere(
        &safetensors(&m),
        &["`stem.conv_kxk.conv.bias` has shape [3]", "expected [8]"],
    );
}

#[test]
fn identity_with_in_out_mismatch() {
    // 8 output channels, 3 input channels per group: no groups count makes in == out.
    let mut m = timm_block("stem", 8, 3, 3, true);
    m.push(f32t("head.fc.weight", &[4, 8], |_| 0.0));
    refused_everywhere(
        &safetensors(&m),
        &["block `stem`", "identity branch `identity`", "in == out"],
    );
}

#[test]
fn deploy_name_already_taken() {
    let mut m = model();
    m.push(f32t(
        "stages.0.0.reparam_conv.weight",
        &[8, 8, 3, 3],
        |_| 0.0,
    ));
    refused_everywhere(
        &safetensors(&m),
        &[
            "block `stages.0.0`",
            "`stages.0.0.reparam_conv.weight` already exists",
        ],
    );
}

#[test]
fn mixed_layouts() {
    let mut m = model();
    m.extend(timm_block("other", 4, 4, 3, true).into_iter().map(|x| {
        T {
            name: x
                .name
                .replace("conv_kxk", "rbr_dense")
                .replace("conv_1x1", "rbr_1x1")
                .replace("identity", "rbr_identity"),
            ..x
        }
    }));
    refused_everywhere(
        &safetensors(&m),
        &["mixes layouts", "official", "timm-repvgg", "--layout"],
    );
}

#[test]
fn forced_layout_unknown() {
    Case::of(&model()).refused(
        &["--layout", "nope"],
        &["unknown layout `nope`", "timm-repvgg"],
    );
}

#[test]
fn forced_layout_finds_nothing() {
    Case::of(&model()).refused(
        &["--layout", "official"],
        &["no re-parameterizable block found of layout official"],
    );
}

#[test]
fn layout_file_missing() {
    let case = Case::of(&model());
    let file = case.path("layouts.json");
    case.refused(
        &["--layout-file", file.to_str().unwrap()],
        &["layout file", "layouts.json", "cannot read"],
    );
}

#[test]
fn layout_file_not_json() {
    let case = Case::of(&model());
    let file = case.path("layouts.json");
    std::fs::write(&file, "[{").unwrap();
    case.refused(
        &["--layout-file", file.to_str().unwrap()],
        &["layout file", "layouts.json"],
    );
}

#[test]
fn layout_file_without_kxk_branch() {
    let case = Case::of(&model());
    let file = case.path("layouts.json");
    std::fs::write(
        &file,
        r#"{"name": "mine", "branches": [{"role": "scale", "path": "conv_1x1", "conv": "conv", "bn": "bn"}],
            "deploy": {"weight": "w", "bias": "b"}}"#,
    )
    .unwrap();
    case.refused(
        &["--layout-file", file.to_str().unwrap()],
        &["layout `mine` has no \"kxk\" branch"],
    );
}

// ---------------------------------------------------------------------------------------------
// Values that cannot be fused (found when the block is read, so `inspect` does not see them)

#[test]
fn nan_in_conv_weight() {
    let m = model().poke("stages.0.0.conv_kxk.conv.weight", 17, f32::NAN);
    Case::of(&m).refused(
        &[],
        &[
            "block `stages.0.0`",
            "`stages.0.0.conv_kxk.conv.weight` holds NaN at element 17",
            "finite",
        ],
    );
}

#[test]
fn inf_in_bn_weight() {
    let m = model().poke("stem.conv_1x1.bn.weight", 3, f32::INFINITY);
    Case::of(&m).refused(
        &[],
        &[
            "block `stem`",
            "`stem.conv_1x1.bn.weight` holds inf at element 3",
        ],
    );
}

#[test]
fn negative_inf_in_running_mean() {
    let m = model().poke("stages.0.0.identity.running_mean", 0, f32::NEG_INFINITY);
    Case::of(&m).refused(
        &[],
        &["`stages.0.0.identity.running_mean` holds -inf at element 0"],
    );
}

#[test]
fn nan_in_running_var() {
    let m = model().poke("stages.0.0.identity.running_var", 7, f32::NAN);
    Case::of(&m).refused(
        &[],
        &["`stages.0.0.identity.running_var` holds NaN at element 7"],
    );
}

#[test]
fn nan_in_bn_bias() {
    let m = model().poke("stem.conv_kxk.bn.bias", 5, f32::NAN);
    Case::of(&m).refused(&[], &["`stem.conv_kxk.bn.bias` holds NaN at element 5"]);
}

#[test]
fn nan_in_conv_bias() {
    let mut m = model();
    m.push(f32t("stem.conv_kxk.conv.bias", &[8], |i| {
        if i == 2 { f32::NAN } else { 0.1 }
    }));
    Case::of(&m).refused(&[], &["`stem.conv_kxk.conv.bias` holds NaN at element 2"]);
}

#[test]
fn negative_running_var() {
    let m = model().poke("stages.0.0.conv_1x1.bn.running_var", 4, -0.5);
    Case::of(&m).refused(
        &[],
        &[
            "block `stages.0.0`",
            "`stages.0.0.conv_1x1.bn.running_var` has a negative variance -0.5 at channel 4",
        ],
    );
}

#[test]
fn zero_running_var_with_zero_eps() {
    // σ² + ε = 0 makes γ/√(σ² + ε) infinite: the fused conv would be all inf and NaN.
    let m = model().poke("stages.0.0.conv_kxk.bn.running_var", 2, 0.0);
    // With the default ε the same file is fine.
    let case = Case::of(&m);
    case.converts(&[]);
    let case = Case::of(&m);
    case.refused(
        &["--bn-eps", "0"],
        &[
            "block `stages.0.0`",
            "`stages.0.0.conv_kxk.bn.running_var` is 0e0 at channel 2",
            "BN ε is 0e0",
        ],
    );
}

#[test]
fn verify_refuses_zero_running_var_with_zero_eps_like_convert() {
    // `verify` judges a deploy file against this train file: a train block that cannot be
    // run (γ/√0) is bad input (exit 2, naming the tensor), not a deviation of the deploy file.
    let m = model().poke("stages.0.0.conv_kxk.bn.running_var", 2, 0.0);
    let case = Case::of(&m);
    case.converts(&[]);
    let args = [
        OsStr::new("verify"),
        case.input.as_os_str(),
        case.out.as_os_str(),
        OsStr::new("--bn-eps"),
        OsStr::new("0"),
    ];
    case.refused_with(
        &args,
        &case.input,
        &[
            "block `stages.0.0`",
            "`stages.0.0.conv_kxk.bn.running_var` is 0e0 at channel 2",
        ],
    );
}

#[test]
fn fused_value_overflows_f16_output() {
    // γ = 1e4 over √(1e-4 + ε) ≈ 1e6 times weights up to 0.5: far past f16's 65504.
    let m = model().poke("stages.0.0.conv_kxk.bn.weight", 1, 1e4).poke(
        "stages.0.0.conv_kxk.bn.running_var",
        1,
        1e-4,
    );
    // In F32 it is fine.
    Case::of(&m).converts(&[]);
    Case::of(&m).refused(
        &["--dtype", "f16"],
        &[
            "block `stages.0.0`",
            "`stages.0.0.reparam_conv.weight`",
            "overflows F16",
            "65504",
        ],
    );
}

#[test]
fn fused_value_overflows_f16_input() {
    // An F16 checkpoint keeps F16: 60000 × 2 (two branches' weights at the same tap) overflows.
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    let mut m = Vec::new();
    for x in model() {
        if x.dtype == "F32" {
            let values: Vec<u8> = x
                .data
                .chunks_exact(4)
                .flat_map(|b| f16(f32::from_le_bytes(b.try_into().unwrap())))
                .collect();
            m.push(t(&x.name, "F16", &x.shape, values));
        } else {
            m.push(x);
        }
    }
    let big = |name: &str, shape: &[usize]| {
        let n: usize = shape.iter().product();
        t(
            name,
            "F16",
            shape,
            (0..n).flat_map(|_| f16(60000.0)).collect(),
        )
    };
    let m = m
        .set(big("stem.conv_kxk.conv.weight", &[8, 3, 3, 3]))
        .set(big("stem.conv_1x1.conv.weight", &[8, 3, 1, 1]));
    Case::of(&m).refused(
        &[],
        &[
            "block `stem`",
            "`stem.reparam_conv.weight`",
            "overflows F16",
        ],
    );
}

#[test]
fn passthrough_value_overflows_f16_output() {
    let m = model().poke("head.fc.weight", 5, 1e6);
    Case::of(&m).refused(
        &["--dtype", "f16"],
        &["`head.fc.weight` element 5", "overflows F16"],
    );
}

#[test]
fn fused_value_overflows_f64() {
    // F64 in, F64 out: γ·W = 1e300 · 1e300 is past f64 itself.
    let f64t = |name: &str, shape: &[usize], v: f64| {
        let n: usize = shape.iter().product();
        t(
            name,
            "F64",
            shape,
            (0..n).flat_map(|_| v.to_le_bytes()).collect(),
        )
    };
    let mut m = Vec::new();
    for x in timm_block("stem", 2, 2, 3, false) {
        // (A variance of 2, not 1: a BN at its initial statistics is refused before fusing.)
        let v = if x.name.ends_with("running_mean") || x.name.ends_with(".bias") {
            0.0
        } else if x.name.ends_with("running_var") {
            2.0
        } else {
            1e300
        };
        m.push(if x.dtype == "F32" {
            f64t(&x.name, &x.shape, v)
        } else {
            x
        });
    }
    Case::of(&m).refused(
        &[],
        &[
            "block `stem`",
            "`stem.reparam_conv.weight` element 0 is inf",
            "overflow",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Nothing lost: the input, an existing output and report stay as they were

#[test]
fn output_is_input() {
    let case = Case::of(&model());
    let args = [
        case.input.as_os_str(),
        OsStr::new("-o"),
        case.input.as_os_str(),
    ];
    case.refused_with(&args, &case.input, &["is the input file"]);
}

#[test]
fn output_is_input_by_dotdot_path() {
    let case = Case::of(&model());
    std::fs::create_dir(case.path("x")).unwrap();
    let other = case.path("x/../train.safetensors");
    let args = [case.input.as_os_str(), OsStr::new("-o"), other.as_os_str()];
    case.refused_with(&args, &case.input, &["is the input file"]);
    // And relative, from inside the folder.
    let args = ["train.safetensors", "-o", "./x/../train.safetensors"].map(OsStr::new);
    case.refused_with(
        &args,
        Path::new("train.safetensors"),
        &["is the input file"],
    );
}

#[test]
fn output_is_symlink_to_input() {
    let case = Case::of(&model());
    let link = case.path("link.safetensors");
    std::os::unix::fs::symlink(&case.input, &link).unwrap();
    let args = [case.input.as_os_str(), OsStr::new("-o"), link.as_os_str()];
    case.refused_with(&args, &case.input, &["is the input file"]);
}

#[test]
fn input_is_symlink_to_output() {
    let case = Case::of(&model());
    let link = case.path("link.safetensors");
    std::os::unix::fs::symlink(&case.input, &link).unwrap();
    let args = [link.as_os_str(), OsStr::new("-o"), case.input.as_os_str()];
    case.refused_with(&args, &link, &["is the input file"]);
}

#[test]
fn output_is_hard_link_to_input() {
    let case = Case::of(&model());
    let link = case.path("link.safetensors");
    std::fs::hard_link(&case.input, &link).unwrap();
    let args = [case.input.as_os_str(), OsStr::new("-o"), link.as_os_str()];
    case.refused_with(&args, &case.input, &["is the input file"]);
}

#[test]
fn report_path_is_input() {
    let case = Case::of(&model());
    case.refused(
        &["--report", case.input.to_str().unwrap()],
        &["report path is the input file"],
    );
}

#[test]
fn report_path_is_output() {
    let case = Case::of(&model());
    let mut args = vec![
        case.input.as_os_str(),
        OsStr::new("-o"),
        case.out.as_os_str(),
    ];
    args.extend([OsStr::new("--report"), case.out.as_os_str()]);
    case.refused_with(&args, &case.out, &["would overwrite the deploy file"]);
}

#[test]
fn report_path_is_output_by_other_spelling() {
    let case = Case::of(&model());
    let other = case.path("x/../out.safetensors");
    std::fs::create_dir(case.path("x")).unwrap();
    let mut args = vec![
        case.input.as_os_str(),
        OsStr::new("-o"),
        case.out.as_os_str(),
    ];
    args.extend([OsStr::new("--report"), other.as_os_str()]);
    case.refused_with(&args, &case.out, &["would overwrite the deploy file"]);
}

#[test]
fn output_folder_missing() {
    let case = Case::of(&model());
    let out = case.path("nowhere/out.safetensors");
    let args = [case.input.as_os_str(), OsStr::new("-o"), out.as_os_str()];
    case.refused_with(&args, &out, &["nowhere", "does not exist"]);
}

#[test]
fn output_is_a_directory() {
    let case = Case::of(&model());
    std::fs::create_dir(case.path("dir")).unwrap();
    let out = case.path("dir");
    let args = [case.input.as_os_str(), OsStr::new("-o"), out.as_os_str()];
    case.refused_with(&args, &out, &["is a directory"]);
}

#[test]
fn report_path_is_a_directory() {
    let case = Case::of(&model());
    std::fs::create_dir(case.path("dir")).unwrap();
    let report = case.path("dir");
    let mut args = vec![
        case.input.as_os_str(),
        OsStr::new("-o"),
        case.out.as_os_str(),
    ];
    args.extend([OsStr::new("--report"), report.as_os_str()]);
    case.refused_with(&args, &report, &["report path is a directory"]);
}

#[test]
fn report_folder_missing_keeps_existing_output() {
    let case = Case::of(&model());
    std::fs::write(&case.out, b"an older deploy file").unwrap();
    let report = case.path("nowhere/r.json");
    let mut args = vec![
        case.input.as_os_str(),
        OsStr::new("-o"),
        case.out.as_os_str(),
    ];
    args.extend([OsStr::new("--report"), report.as_os_str()]);
    case.refused_with(&args, &report, &["nowhere", "does not exist"]);
}

#[test]
fn failed_run_keeps_existing_output_and_report() {
    let m = model().poke("stages.0.0.conv_kxk.conv.weight", 0, f32::NAN);
    let case = Case::of(&m);
    std::fs::write(&case.out, b"an older deploy file").unwrap();
    std::fs::write(case.path("out.report.json"), b"{\"older\": true}\n").unwrap();
    case.refused(&[], &["holds NaN"]);
    assert_eq!(std::fs::read(&case.out).unwrap(), b"an older deploy file");
}

#[test]
fn failed_run_keeps_existing_custom_report() {
    let case = Case::new(b"garbage that is no checkpoint");
    std::fs::write(case.path("r.json"), b"{\"older\": true}\n").unwrap();
    case.refused(
        &["--report", case.path("r.json").to_str().unwrap()],
        &["not a valid safetensors file"],
    );
}

#[test]
fn input_is_read_only_and_unchanged_after_success() {
    let case = Case::of(&model());
    let mut perms = std::fs::metadata(&case.input).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&case.input, perms).unwrap();
    let before = std::fs::read(&case.input).unwrap();
    case.converts(&["--verify"]);
    assert_eq!(std::fs::read(&case.input).unwrap(), before);
    // No temp file left beside the outputs.
    let names: Vec<String> = std::fs::read_dir(case.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn verify_refuses_broken_deploy_file() {
    let case = Case::of(&model());
    let deploy = case.path("deploy.safetensors");
    std::fs::write(&deploy, raw("{\"a\": 1}", b"")).unwrap();
    let args = [
        OsStr::new("verify"),
        case.input.as_os_str(),
        deploy.as_os_str(),
    ];
    case.refused_with(&args, &deploy, &["not a valid safetensors file", "`a`"]);
}

#[test]
fn verify_report_path_is_input() {
    let case = Case::of(&model());
    case.converts(&[]);
    let args = [
        OsStr::new("verify"),
        case.input.as_os_str(),
        case.out.as_os_str(),
        OsStr::new("--report"),
        case.input.as_os_str(),
    ];
    case.refused_with(&args, &case.input, &["is the input file"]);
}

#[test]
fn inspect_into_closed_pipe_does_not_panic() {
    // Enough blocks that the JSON is far larger than a pipe's buffer.
    let case = Case::of(&slow_model(400));
    let mut child = Command::new(BIN)
        .args([
            OsStr::new("inspect"),
            OsStr::new("--json"),
            case.input.as_os_str(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Interrupted runs

/// A model that takes a while to write: `blocks` blocks, each fused and probed in turn, with a
/// pass-through tensor between them.
fn slow_model(blocks: usize) -> Vec<T> {
    let mut m = Vec::new();
    for i in 0..blocks {
        m.extend(timm_block(&format!("stages.{i}"), 16, 16, 3, true));
        m.push(f32t(&format!("stages.{i}.extra"), &[2048], |j| j as f32));
    }
    m
}

/// Starts a conversion of `slow_model(blocks)` over an existing output and report, sends
/// `signal` once the temp file exists (the handlers are registered and writing has begun), and
/// checks what is left. Returns false if the run finished before the signal landed.
fn interrupt_once(signal: &str, blocks: usize) -> bool {
    let case = Case::of(&slow_model(blocks));
    std::fs::write(&case.out, b"an older deploy file").unwrap();
    std::fs::write(case.path("out.report.json"), b"{\"older\": true}\n").unwrap();
    let before = case.snapshot();
    let mut child = Command::new(BIN)
        .arg(&case.input)
        .arg("-o")
        .arg(&case.out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    loop {
        let writing = std::fs::read_dir(case.dir.path())
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
        if writing {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0), "failed before writing");
            return false;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "never started writing"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let killed = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(0) {
        // Past the last check already: a finished run, which is allowed.
        return false;
    }
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(
        case.snapshot(),
        before,
        "an interrupted run changed the folder"
    );
    true
}

/// A signal mid-write leaves the folder as it was; the model grows until the signal lands
/// mid-write (a fast build may finish a small one first).
fn interrupted_leaves_nothing(signal: &str) {
    for blocks in [400, 1600, 6400] {
        if interrupt_once(signal, blocks) {
            return;
        }
    }
    panic!("SIG{signal} never stopped a run: every run finished despite the signal");
}

#[test]
fn sigint_mid_write_leaves_nothing() {
    interrupted_leaves_nothing("INT");
}

#[test]
fn sigterm_mid_write_leaves_nothing() {
    interrupted_leaves_nothing("TERM");
}
