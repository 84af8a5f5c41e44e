//! PyTorch checkpoints (`torch.save`, zip and legacy formats), read as data.
//!
//! Two kinds of test. The fixtures under `fixtures/torch_*/` were written by torch.save itself
//! (fixtures/make_torch_fixtures.py) beside the framework's own deploy result: each converts,
//! verifies, and matches the framework's float64 fusion within 1 ulp with exactly its key set.
//! The bad inputs are built here from literal bytes — a pickle written opcode by opcode, put in
//! a stored zip or a legacy stream — and each is refused with exit 2, naming the file and the
//! entry, with nothing written and no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::{ordered, read_st, to_f64};
use half::{bf16, f16};
use safetensors::Dtype;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_repvgg-fuse");

// ---------------------------------------------------------------------------------------------
// Running the binary

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("repvgg-fuse runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

// ---------------------------------------------------------------------------------------------
// Reading safetensors files with the safetensors crate (not with this crate's reader)

/// Distance in ulps of `dtype` between element bits `got` and `want` rounded to `dtype`.
fn ulps(dtype: Dtype, got: f64, want: f64) -> i64 {
    let (a, b, w) = match dtype {
        Dtype::F32 => (
            (got as f32).to_bits() as u64,
            (want as f32).to_bits() as u64,
            32,
        ),
        Dtype::F16 => (
            f16::from_f64(got).to_bits() as u64,
            f16::from_f64(want).to_bits() as u64,
            16,
        ),
        Dtype::BF16 => (
            bf16::from_f64(got).to_bits() as u64,
            bf16::from_f64(want).to_bits() as u64,
            16,
        ),
        d => panic!("no ulps for {d:?}"),
    };
    (ordered(a, w) - ordered(b, w)).abs()
}

// ---------------------------------------------------------------------------------------------
// The fixtures

struct Fixture {
    name: String,
    dir: PathBuf,
    json: Value,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let dir = fixtures().join(name);
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap())
            .expect("case.json is JSON");
        Fixture {
            name: name.into(),
            dir,
            json,
        }
    }

    fn checkpoint(&self) -> PathBuf {
        self.dir.join(self.json["checkpoint"].as_str().unwrap())
    }
}

const FIXTURES: [&str; 8] = [
    "torch_state_dict_zip",
    "torch_state_dict_legacy",
    "torch_mmpretrain",
    "torch_module_prefix",
    "torch_timm_module",
    "torch_ultralytics_half",
    "torch_payload",
    "torch_strided",
];

/// Converts `input` with `--verify` and checks the output against the fixture's deploy files:
/// the same keys, dtypes and shapes as the framework's deploy state dict, every float within
/// 1 ulp of its float64 fusion, every other tensor byte for byte. Returns the report.
fn converts_like_framework(fx: &Fixture, input: &Path, extra: &[&str]) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("deploy.safetensors");
    let mut args = vec![s(input), "-o", s(&out), "--verify", "-q"];
    args.extend(extra);
    let run = run(&args);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}: {}",
        fx.name,
        text(&run.stderr)
    );
    let got = read_st(&out);
    let want = read_st(&fx.dir.join("deploy.safetensors"));
    let want64 = read_st(&fx.dir.join("deploy_f64.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{}: key set differs from the framework's deploy state dict",
        fx.name
    );
    for (k, w) in &want {
        let g = &got[k];
        assert_eq!(
            (g.dtype, &g.shape),
            (w.dtype, &w.shape),
            "{}: `{k}`",
            fx.name
        );
        if matches!(w.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            let exact = to_f64(&want64[k]);
            for (i, (a, b)) in to_f64(g).iter().zip(&exact).enumerate() {
                assert!(
                    ulps(w.dtype, *a, *b) <= 1,
                    "{}: `{k}`[{i}] = {a} but the framework's f64 fusion gives {b}",
                    fx.name
                );
            }
        } else {
            assert_eq!(g.data, w.data, "{}: `{k}` differs", fx.name);
        }
    }
    let report = tmp.path().join("deploy.report.json");
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

#[test]
fn every_fixture_converts_like_its_framework() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let report = converts_like_framework(&fx, &fx.checkpoint(), &[]);
        let source = &report["source"];
        for field in [
            "format",
            "key",
            "module_prefix_dropped",
            "suspicious_globals",
        ] {
            assert_eq!(
                source[field], fx.json[field],
                "{name}: report source.{field}"
            );
        }
        assert_eq!(report["layout"]["name"], fx.json["layout"], "{name}");
        let mut blocks: Vec<&str> = report["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap())
            .collect();
        let mut want: Vec<&str> = fx.json["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap())
            .collect();
        // Blocks are reported in file order: the model's order in a zip file; the legacy
        // format writes storages sorted by key.
        if fx.json["format"] == "torch-legacy" {
            blocks.sort();
            want.sort();
        }
        assert_eq!(blocks, want, "{name}: blocks");
        assert_eq!(report["bn_eps"]["value"], fx.json["bn_eps"], "{name}: ε");
    }
}

#[test]
fn strided_views_in_the_legacy_format_too() {
    let fx = Fixture::load("torch_strided");
    let report = converts_like_framework(&fx, &fx.dir.join("train_legacy.pth"), &[]);
    assert_eq!(report["source"]["format"], "torch-legacy");
}

#[test]
fn verify_and_inspect_accept_every_fixture() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let ckpt = fx.checkpoint();
        let deploy = fx.dir.join("deploy.safetensors");
        let v = run(&["verify", s(&ckpt), s(&deploy), "-q"]);
        assert_eq!(v.status.code(), Some(0), "{name}: {}", text(&v.stderr));
        let i = run(&["inspect", s(&ckpt), "--json"]);
        assert_eq!(i.status.code(), Some(0), "{name}: {}", text(&i.stderr));
        let j: Value = serde_json::from_slice(&i.stdout).unwrap();
        assert_eq!(j["layout"]["name"], fx.json["layout"], "{name}");
    }
}

#[test]
fn verify_judges_a_deploy_pth() {
    let fx = Fixture::load("torch_state_dict_zip");
    let deploy = fx.dir.join("deploy.pth");
    let v = run(&["verify", s(&fx.checkpoint()), s(&deploy), "-q"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v.stderr));
    // A deploy .pth judged against the wrong train file fails (exit 1), it is not unreadable.
    let other = Fixture::load("torch_module_prefix");
    let v = run(&["verify", s(&other.checkpoint()), s(&deploy), "-q"]);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v.stderr));
}

#[test]
fn keep_prefix_keeps_module_prefix() {
    let fx = Fixture::load("torch_module_prefix");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d.safetensors");
    let r = run(&[s(&fx.checkpoint()), "-o", s(&out), "--keep-prefix", "-q"]);
    assert_eq!(r.status.code(), Some(0), "{}", text(&r.stderr));
    let got = read_st(&out);
    let want = read_st(&fx.dir.join("deploy.safetensors"));
    let prefixed: Vec<String> = want.keys().map(|k| format!("module.{k}")).collect();
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), prefixed);
}

#[test]
fn payload_never_runs_and_is_named() {
    let fx = Fixture::load("torch_payload");
    let marker = Path::new(fx.json["marker"].as_str().unwrap());
    let _ = std::fs::remove_file(marker);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d.safetensors");
    let ckpt = fx.checkpoint();
    for args in [
        vec![s(&ckpt), "-o", s(&out), "--verify"],
        vec!["inspect", s(&ckpt)],
        vec!["verify", s(&ckpt), s(&out)],
    ] {
        let r = run(&args);
        assert_eq!(r.status.code(), Some(0), "{args:?}: {}", text(&r.stderr));
        let err = text(&r.stderr);
        assert!(
            err.contains("posix.system") && err.contains(s(&ckpt)),
            "{args:?}: the warning must name the global and the file: {err}"
        );
        assert!(
            !marker.exists(),
            "{args:?}: the payload ran: {} exists",
            marker.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Building torch.save files from bytes

/// A pickle, written opcode by opcode (protocol 2, as torch.save writes it).
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Pickle {
        Pickle(vec![0x80, 2])
    }
    fn op(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, v: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend((v.len() as u32).to_le_bytes());
        self.op(v.as_bytes())
    }
    fn int(&mut self, v: u32) -> &mut Self {
        self.0.push(b'J');
        self.op(&v.to_le_bytes())
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn ints(&mut self, v: &[u32]) -> &mut Self {
        self.op(b"(");
        for &x in v {
            self.int(x);
        }
        self.op(b"t")
    }
    /// `_rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())`.
    fn tensor(
        &mut self,
        storage: &str,
        key: &str,
        numel: u32,
        offset: u32,
        shape: &[u32],
        stride: &[u32],
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"((");
        self.str("storage")
            .global("torch", storage)
            .str(key)
            .str("cpu")
            .int(numel);
        self.op(b"tQ")
            .int(offset)
            .ints(shape)
            .ints(stride)
            .op(b"\x89");
        self.global("collections", "OrderedDict").op(b")RtR")
    }
    fn stop(&mut self) -> Vec<u8> {
        self.0.push(b'.');
        self.0.clone()
    }
}

/// One tensor of a hand-built state dict: F32, contiguous, its own storage.
struct Tn {
    name: &'static str,
    shape: Vec<u32>,
}

fn strides(shape: &[u32]) -> Vec<u32> {
    let mut out = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        out[d] = out[d + 1] * shape[d + 1];
    }
    out
}

/// A timm RepVggBlock `stem` (3→4 channels, 3×3 and 1×1 branches), positive BN variances.
fn block() -> Vec<Tn> {
    let mut v = vec![
        Tn {
            name: "stem.conv_kxk.conv.weight",
            shape: vec![4, 3, 3, 3],
        },
        Tn {
            name: "stem.conv_1x1.conv.weight",
            shape: vec![4, 3, 1, 1],
        },
    ];
    for b in ["stem.conv_kxk.bn", "stem.conv_1x1.bn"] {
        for p in ["weight", "bias", "running_mean", "running_var"] {
            v.push(Tn {
                name: Box::leak(format!("{b}.{p}").into_boxed_str()),
                shape: vec![4],
            });
        }
    }
    v
}

/// Writes the dict `{name: tensor}` of `tensors` (storage keys 0, 1, ...); returns the
/// storages' bytes by key.
fn state_dict(p: &mut Pickle, tensors: &[Tn]) -> Vec<(String, Vec<u8>)> {
    p.op(b"}(");
    let mut storages = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let n: u32 = t.shape.iter().product();
        p.str(t.name).tensor(
            "FloatStorage",
            &i.to_string(),
            n,
            0,
            &t.shape,
            &strides(&t.shape),
        );
        let data = (0..n)
            .flat_map(|j| (0.5 + (j % 7) as f32 * 0.1).to_le_bytes())
            .collect();
        storages.push((i.to_string(), data));
    }
    p.op(b"u");
    storages
}

/// A stored zip of `entries`, as torch's writer lays it out (minus the alignment padding).
fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let n = data.len() as u32;
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method 0, time, date
        out.extend(0u32.to_le_bytes()); // crc (not checked)
        out.extend(n.to_le_bytes());
        out.extend(n.to_le_bytes());
        out.extend((name.len() as u16).to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out.extend(name.as_bytes());
        out.extend(*data);
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        central.extend(0u32.to_le_bytes());
        central.extend(n.to_le_bytes());
        central.extend(n.to_le_bytes());
        central.extend((name.len() as u16).to_le_bytes());
        central.extend([0u8; 12]); // extra, comment, disk, attributes
        central.extend(offset.to_le_bytes());
        central.extend(name.as_bytes());
    }
    let cd_start = out.len() as u32;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_start.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

/// A torch zip checkpoint: `archive/data.pkl`, `archive/byteorder`, `archive/data/{key}`.
fn torch_zip(pickle: &[u8], storages: &[(String, Vec<u8>)]) -> Vec<u8> {
    let names: Vec<String> = storages
        .iter()
        .map(|(k, _)| format!("archive/data/{k}"))
        .collect();
    let mut entries: Vec<(&str, &[u8])> = vec![
        ("archive/data.pkl", pickle),
        ("archive/byteorder", b"little"),
    ];
    for ((_, d), n) in storages.iter().zip(&names) {
        entries.push((n, d));
    }
    zip(&entries)
}

/// A legacy torch.save stream: magic, protocol, sys info, the pickle, the keys, the storages.
fn torch_legacy(pickle: &[u8], storages: &[(String, Vec<u8>)], little_endian: bool) -> Vec<u8> {
    let mut out = vec![
        0x80, 2, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
    ];
    out.extend(Pickle::new().op(b"M\xe9\x03").stop());
    let mut sys = Pickle::new();
    sys.op(b"}(")
        .str("protocol_version")
        .op(b"M\xe9\x03")
        .str("little_endian");
    sys.op(if little_endian { b"\x88" } else { b"\x89" })
        .op(b"u");
    out.extend(sys.stop());
    out.extend(pickle);
    let mut keys = Pickle::new();
    keys.op(b"(");
    for (k, _) in storages {
        keys.str(k);
    }
    out.extend(keys.op(b"l").stop());
    for (_, d) in storages {
        out.extend(((d.len() / 4) as u64).to_le_bytes());
        out.extend(d);
    }
    out
}

fn good_zip() -> Vec<u8> {
    let mut p = Pickle::new();
    let st = state_dict(&mut p, &block());
    torch_zip(&p.stop(), &st)
}

// ---------------------------------------------------------------------------------------------
// Running hand-built files

struct Case {
    dir: tempfile::TempDir,
    input: PathBuf,
}

impl Case {
    fn new(bytes: &[u8]) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.pth");
        std::fs::write(&input, bytes).unwrap();
        Case { dir, input }
    }

    fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn run(&self, extra: &[&str]) -> Output {
        let out = self.dir.path().join("out.safetensors");
        let mut args = vec![s(&self.input), "-o", s(&out)];
        args.extend(extra);
        run(&args)
    }

    /// Exit 2 from convert and inspect, naming the file and `culprits`; nothing written.
    fn refused(&self, extra: &[&str], culprits: &[&str]) {
        let inspect_args: Vec<&str> = ["inspect", s(&self.input)]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        for out in [self.run(extra), run(&inspect_args)] {
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "expected exit 2: {err}");
            assert!(!err.contains("panicked"), "panic: {err}");
            assert!(err.contains(s(&self.input)), "the file is not named: {err}");
            for c in culprits {
                assert!(err.contains(c), "stderr does not say `{c}`: {err}");
            }
            assert_eq!(
                self.listing(),
                vec!["in.pth".to_string()],
                "something was written"
            );
        }
    }

    fn converts(&self, extra: &[&str]) -> Value {
        let out = self.run(extra);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let report = self.dir.path().join("out.report.json");
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-built files that read

#[test]
fn hand_built_zip_and_legacy_convert() {
    Case::new(&good_zip()).converts(&["--verify"]);
    let mut p = Pickle::new();
    let st = state_dict(&mut p, &block());
    let r = Case::new(&torch_legacy(&p.stop(), &st, true)).converts(&["--verify"]);
    assert_eq!(r["source"]["format"], "torch-legacy");
}

#[test]
fn dotted_key_reaches_a_nested_dict() {
    let mut p = Pickle::new();
    p.op(b"}(").str("ckpt").op(b"}(").str("weights");
    let st = state_dict(&mut p, &block());
    p.op(b"uu");
    let bytes = torch_zip(&p.stop(), &st);
    let case = Case::new(&bytes);
    case.refused(&[], &["no state dict", "ckpt", "--key"]);
    case.refused(
        &["--key", "ckpt.nope"],
        &["--key ckpt.nope", "`ckpt` has no entry `nope`", "weights"],
    );
    let r = case.converts(&["--key", "ckpt.weights"]);
    assert_eq!(r["source"]["key"], "ckpt.weights");
}

/// A checkpoint with two weight entries `first` and `second`, naming the same storages.
fn two_entries(first: &str, second: &str) -> Case {
    let mut p = Pickle::new();
    p.op(b"}(").str(first);
    let mut st = state_dict(&mut p, &block());
    p.str(second);
    // The second dict names the same storages (keys 0..), as a real EMA copy would have its own.
    let st2 = state_dict(&mut p, &block());
    st.truncate(st2.len());
    p.op(b"u");
    Case::new(&torch_zip(&p.stop(), &st))
}

#[test]
fn two_candidates_need_key() {
    let case = two_entries("model", "net");
    case.refused(
        &[],
        &["2 entries could be the weights", "model, net", "--key"],
    );
    let r = case.converts(&["--key", "net"]);
    assert_eq!(r["source"]["key"], "net");
}

/// A raw/EMA pair is read as the framework's loader reads it, with a warning (the fixtures
/// doctor_ema_* hold real ones; tests/doctor_ema.rs).
#[test]
fn raw_and_ema_pairs_pick_the_framework_loaders_entry() {
    for (first, second, read) in [
        ("model", "ema", "ema"),
        ("ema", "model", "ema"),
        ("state_dict", "state_dict_ema", "state_dict"),
        ("model_ema", "state_dict", "state_dict"),
    ] {
        let r = two_entries(first, second).converts(&[]);
        assert_eq!(r["source"]["key"], read, "{first} + {second}");
        let warned = r["warnings"].as_array().unwrap();
        assert!(
            warned.iter().any(|w| w["kind"] == "raw_and_ema"),
            "{first} + {second}: {warned:?}"
        );
    }
}

#[test]
fn eval_global_is_named_and_not_run() {
    let mut p = Pickle::new();
    p.op(b"}(").str("state_dict");
    let st = state_dict(&mut p, &block());
    p.str("x")
        .global("builtins", "eval")
        .op(b"(")
        .str("__import__('os').system('false')")
        .op(b"tR");
    p.op(b"u");
    let case = Case::new(&torch_zip(&p.stop(), &st));
    let r = case.converts(&[]);
    assert_eq!(
        r["source"]["suspicious_globals"][0],
        "builtins.eval (called)"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input: exit 2, the file and the entry named, nothing written

#[test]
fn torn_zip() {
    let z = good_zip();
    Case::new(&z[..z.len() - 10]).refused(&[], &["torch-zip", "end-of-central-directory", "torn"]);
    // The central directory cut off after its first entry.
    let cut = z.len() - 30;
    let mut torn = z[..cut - 200].to_vec();
    torn.extend(&z[cut..]);
    Case::new(&torn).refused(&[], &["torch-zip"]);
}

#[test]
fn pickle_ending_early() {
    let mut p = Pickle::new();
    let st = state_dict(&mut p, &block());
    let pkl = p.stop();
    Case::new(&torch_zip(&pkl[..pkl.len() / 2], &st))
        .refused(&[], &["archive/data.pkl", "ends early"]);
    Case::new(&torch_legacy(&pkl[..pkl.len() - 1], &[], true)).refused(&[], &["torch-legacy"]);
}

#[test]
fn storage_missing_or_short() {
    let mut p = Pickle::new();
    let mut st = state_dict(&mut p, &block());
    let pkl = p.stop();
    let gone = st.remove(3);
    Case::new(&torch_zip(&pkl, &st)).refused(&[], &["stem.conv_kxk.bn.bias", "data/3", "missing"]);
    st.insert(3, (gone.0, gone.1[..8].to_vec()));
    Case::new(&torch_zip(&pkl, &st)).refused(&[], &["stem.conv_kxk.bn.bias", "data/3", "short"]);
    // Legacy: the file ends inside the storages.
    let mut p = Pickle::new();
    let st = state_dict(&mut p, &block());
    let legacy = torch_legacy(&p.stop(), &st, true);
    Case::new(&legacy[..legacy.len() - 5]).refused(&[], &["torch-legacy", "truncated"]);
}

#[test]
fn view_past_its_storage() {
    let mut p = Pickle::new();
    p.op(b"}(")
        .str("w")
        .tensor("FloatStorage", "0", 4, 2, &[2, 2], &[2, 1])
        .op(b"u");
    let st = vec![("0".to_string(), vec![0u8; 16])];
    Case::new(&torch_zip(&p.stop(), &st)).refused(&[], &["tensor `w`", "data/0", "short"]);
}

#[test]
fn unsupported_tensor_kinds() {
    for (storage, what) in [
        ("ComplexFloatStorage", "complex"),
        ("QInt8Storage", "quantized"),
        ("NoSuchStorage", "NoSuchStorage"),
    ] {
        let mut p = Pickle::new();
        p.op(b"}(")
            .str("w")
            .tensor(storage, "0", 4, 0, &[4], &[1])
            .op(b"u");
        let st = vec![("0".to_string(), vec![0u8; 64])];
        Case::new(&torch_zip(&p.stop(), &st)).refused(&[], &["tensor `w`", what]);
    }
    let mut p = Pickle::new();
    p.op(b"}(")
        .str("w")
        .global("torch._utils", "_rebuild_sparse_tensor")
        .op(b"(K\x00tR")
        .op(b"u");
    Case::new(&torch_zip(&p.stop(), &[])).refused(&[], &["tensor `w`", "_rebuild_sparse_tensor"]);
}

#[test]
fn big_endian_files() {
    let mut p = Pickle::new();
    let st = state_dict(&mut p, &block());
    let pkl = p.stop();
    let mut entries: Vec<(String, Vec<u8>)> = vec![
        ("archive/data.pkl".into(), pkl.clone()),
        ("archive/byteorder".into(), b"big".to_vec()),
    ];
    entries.extend(
        st.iter()
            .map(|(k, d)| (format!("archive/data/{k}"), d.clone())),
    );
    let refs: Vec<(&str, &[u8])> = entries
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    Case::new(&zip(&refs)).refused(&[], &["archive/byteorder", "little-endian"]);
    Case::new(&torch_legacy(&pkl, &st, false)).refused(&[], &["big-endian"]);
}

#[test]
fn no_tensor_at_all() {
    let mut p = Pickle::new();
    p.op(b"}(")
        .str("epoch")
        .int(3)
        .str("state_dict")
        .op(b"}")
        .op(b"u");
    Case::new(&torch_zip(&p.stop(), &[])).refused(&[], &["no state dict", "epoch, state_dict"]);
    let mut p = Pickle::new();
    p.op(b"]");
    Case::new(&torch_zip(&p.stop(), &[])).refused(&[], &["a list, not a dict"]);
}

#[test]
fn zip_bomb_and_lying_sizes() {
    // A deflated entry is refused, not inflated.
    let mut z = good_zip();
    let at = 8; // method of the first local header
    z[at] = 8;
    let cd = z
        .windows(4)
        .position(|w| w == [0x50, 0x4b, 0x01, 0x02])
        .unwrap();
    z[cd + 10] = 8;
    Case::new(&z).refused(&[], &["archive/data.pkl", "compressed"]);
    // An entry that claims 4 GB.
    let mut z = good_zip();
    let cd = z
        .windows(4)
        .position(|w| w == [0x50, 0x4b, 0x01, 0x02])
        .unwrap();
    z[cd + 20..cd + 28].copy_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xfe, 0xff, 0xff, 0xff]);
    Case::new(&z).refused(&[], &["archive/data.pkl", "past the end"]);
    // An end record that claims 65535 entries.
    let mut z = good_zip();
    let n = z.len();
    z[n - 12..n - 10].copy_from_slice(&[0xff, 0xfe]);
    Case::new(&z).refused(&[], &["entries"]);
}

#[test]
fn lengths_beyond_the_file_are_refused_before_allocating() {
    for op in [
        &b"X\xff\xff\xff\xff"[..],
        b"\x8d\xff\xff\xff\xff\xff\xff\xff\x7f",
        b"\x8b\xff\xff\xff\x7f",
        b"B\xff\xff\xff\xff",
    ] {
        let mut p = Pickle::new();
        p.op(op);
        Case::new(&torch_zip(&p.stop(), &[])).refused(&[], &["archive/data.pkl", "only"]);
    }
    let mut p = Pickle::new();
    p.op(b"j\xff\xff\xff\xff");
    Case::new(&torch_zip(&p.stop(), &[])).refused(&[], &["memo GET of entry 4294967295"]);
    let mut p = Pickle::new();
    p.op(b"\xf0");
    Case::new(&torch_zip(&p.stop(), &[])).refused(&[], &["opcode 0xf0"]);
}

#[test]
fn deep_nesting() {
    // A million nested lists: read, refused as no state dict, and dropped without recursion.
    let n = 1_000_000;
    let mut p = Pickle::new();
    p.op(b"}(").str("state_dict");
    p.op(&vec![b']'; n]).op(&vec![b'a'; n - 1]).op(b"u");
    Case::new(&torch_zip(&p.stop(), &[])).refused(&[], &["no state dict"]);
    // Dicts nested 200 deep around a tensor: refused by the walk.
    let mut p = Pickle::new();
    for _ in 0..200 {
        p.op(b"}(").str("a");
    }
    p.tensor("FloatStorage", "0", 1, 0, &[1], &[1]);
    p.op(&[b'u'; 200]);
    let st = vec![("0".to_string(), vec![0u8; 4])];
    Case::new(&torch_zip(&p.stop(), &st)).refused(&["--key", "a"], &["nested more than"]);
}

#[test]
fn shared_dicts_at_every_level_do_not_hang() {
    // Each level's dict holds the level below twice (memo GETs): 2^60 paths to one tensor.
    let mut p = Pickle::new();
    p.tensor("FloatStorage", "0", 1, 0, &[1], &[1])
        .op(b"q\x000");
    for i in 1..=60u8 {
        p.op(b"}(")
            .str("a")
            .op(&[b'h', i - 1])
            .str("b")
            .op(&[b'h', i - 1]);
        p.op(b"u").op(&[b'q', i]).op(b"0");
    }
    p.op(b"}(").str("state_dict").op(&[b'h', 60]).op(b"u");
    let st = vec![("0".to_string(), vec![0u8; 4])];
    let start = std::time::Instant::now();
    Case::new(&torch_zip(&p.stop(), &st)).refused(&[], &["shares its values"]);
    assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
}
