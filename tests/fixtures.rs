//! Integration tests against the fixtures made by the real frameworks (fixtures/README.md).
//!
//! Expected values come from the fixture files only: `deploy.safetensors` (the framework's own
//! deploy state_dict), `deploy_f64.safetensors` (the same fusion in float64), `case.json` (read
//! from the framework's module objects) and `conv/conv.safetensors` (torch's conv2d). The
//! files are read here with the `safetensors` crate directly, never with this crate's reader.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::{
    Tensor, bin, describe, ordered, read_metadata, read_st, run, stderr, to_f64, write_st,
};
use half::{bf16, f16};
use repvgg_fuse::conv::{Input, conv2d};
use safetensors::Dtype;
use serde_json::Value;
use tempfile::TempDir;

/// How many case folders the fixtures README lists; more may be added, fewer is a broken tree.
const MIN_CASES: usize = 14;

// ---------------------------------------------------------------------------------------------
// Fixture access
// ---------------------------------------------------------------------------------------------

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// One case folder: `train.safetensors`, `deploy.safetensors`, `deploy_f64.safetensors`,
/// `case.json`.
struct Case {
    name: String,
    dir: PathBuf,
    json: Value,
}

impl Case {
    fn load(dir: PathBuf) -> Case {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(dir.join("case.json"))
            .unwrap_or_else(|e| panic!("{name}: cannot read case.json: {e}"));
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{name}: case.json is not JSON: {e}"));
        Case { name, dir, json }
    }

    fn train(&self) -> PathBuf {
        self.dir.join("train.safetensors")
    }

    fn deploy(&self) -> PathBuf {
        self.dir.join("deploy.safetensors")
    }

    fn deploy_f64(&self) -> PathBuf {
        self.dir.join("deploy_f64.safetensors")
    }

    fn blocks(&self) -> &Vec<Value> {
        self.json["blocks"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: case.json has no blocks[]", self.name))
    }

    fn block_names(&self) -> Vec<String> {
        self.blocks()
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn dtype(&self) -> &str {
        self.json["dtype"].as_str().unwrap()
    }

    /// The block a fused deploy key belongs to: the longest block name `n` with the key
    /// starting with `n.`.
    fn block_of(&self, key: &str) -> Option<String> {
        self.block_names()
            .into_iter()
            .filter(|n| key.starts_with(&format!("{n}.")))
            .max_by_key(|n| n.len())
    }

    /// The fused tensor of `block` in the framework's deploy file whose name ends with
    /// `.{suffix}` (`weight` or `bias`): a deploy key that is not a train key.
    fn fused_key(&self, train: &StFile, deploy: &StFile, block: &str, suffix: &str) -> String {
        let keys: Vec<&String> = deploy
            .tensors
            .keys()
            .filter(|k| !train.tensors.contains_key(*k))
            .filter(|k| k.ends_with(&format!(".{suffix}")))
            .filter(|k| self.block_of(k).as_deref() == Some(block))
            .collect();
        assert_eq!(
            keys.len(),
            1,
            "{}: expected exactly one fused `.{suffix}` for block `{block}` in deploy.safetensors, found {keys:?}",
            self.name
        );
        keys[0].clone()
    }
}

/// Folders of other suites, with their own tests and case formats: the re-parameterization
/// families (tests/families.rs, tests/families2.rs: `fam2_`, `foldbn_`, `doctor_`), PyTorch
/// pickles (tests/torch.rs), INT8 figures (tests/int8.rs), ONNX graphs (tests/onnx_*.rs).
const OTHER_SUITES: [&str; 7] = [
    "fam_", "fam2_", "foldbn_", "doctor_", "torch_", "int8_", "onnx",
];

/// Every folder under fixtures/ with a train.safetensors, sorted by name (other suites'
/// folders left out).
fn cases() -> Vec<Case> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures/ is readable")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("train.safetensors").is_file())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            !OTHER_SUITES.iter().any(|s| name.starts_with(s))
        })
        .collect();
    dirs.sort();
    let cases: Vec<Case> = dirs.into_iter().map(Case::load).collect();
    assert!(
        cases.len() >= MIN_CASES,
        "found only {} case folders with a train.safetensors under {}: {:?}",
        cases.len(),
        fixtures_dir().display(),
        cases.iter().map(|c| &c.name).collect::<Vec<_>>()
    );
    cases
}

fn case(name: &str) -> Case {
    let dir = fixtures_dir().join(name);
    assert!(
        dir.join("train.safetensors").is_file(),
        "no fixture case {name}"
    );
    Case::load(dir)
}

/// A safetensors file read with the `safetensors` crate: metadata and owned tensors.
#[derive(Clone, Debug)]
struct StFile {
    metadata: Option<HashMap<String, String>>,
    tensors: BTreeMap<String, Tensor>,
}

fn read_st_file(path: &Path) -> StFile {
    StFile {
        metadata: read_metadata(path),
        tensors: read_st(path),
    }
}

fn write_st_file(path: &Path, file: &StFile) {
    write_st(path, &file.tensors, file.metadata.clone());
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Raw bit patterns of a float tensor's elements (F32, F16, BF16).
fn bit_patterns(t: &Tensor) -> Vec<u64> {
    match t.dtype {
        Dtype::F32 => t
            .data
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as u64)
            .collect(),
        Dtype::F16 | Dtype::BF16 => t
            .data
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes(c.try_into().unwrap()) as u64)
            .collect(),
        d => panic!("no ulp comparison for {d:?}"),
    }
}

/// `v` rounded to nearest (ties to even) in `dtype`, as its bit pattern.
fn round_bits(v: f64, dtype: Dtype) -> u64 {
    match dtype {
        Dtype::F32 => (v as f32).to_bits() as u64,
        Dtype::F16 => f16::from_f64(v).to_bits() as u64,
        Dtype::BF16 => bf16::from_f64(v).to_bits() as u64,
        d => panic!("no rounding to {d:?}"),
    }
}

fn width(d: Dtype) -> u32 {
    match d {
        Dtype::F32 => 32,
        Dtype::F16 | Dtype::BF16 => 16,
        d => panic!("no width for {d:?}"),
    }
}

/// Writes `v` (rounded to the tensor's dtype) as element `i` of a float tensor.
fn set_element(t: &mut Tensor, i: usize, v: f64) {
    match t.dtype {
        Dtype::F64 => t.data[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes()),
        Dtype::F32 => t.data[i * 4..i * 4 + 4].copy_from_slice(&(v as f32).to_le_bytes()),
        Dtype::F16 => t.data[i * 2..i * 2 + 2].copy_from_slice(&f16::from_f64(v).to_le_bytes()),
        Dtype::BF16 => t.data[i * 2..i * 2 + 2].copy_from_slice(&bf16::from_f64(v).to_le_bytes()),
        d => panic!("not a float dtype: {d:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// A case converted with `--verify` into a fresh tempdir.
struct Converted {
    _dir: TempDir,
    output: PathBuf,
    run: Output,
}

impl Converted {
    fn report_path(&self) -> PathBuf {
        self.output.with_file_name("deploy.report.json")
    }
}

fn convert(case: &Case, extra: &[&str]) -> Converted {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("deploy.safetensors");
    let run = run(bin()
        .arg(case.train())
        .arg("-o")
        .arg(&output)
        .arg("--verify")
        .args(extra));
    Converted {
        _dir: dir,
        output,
        run,
    }
}

/// Converts every case with `--verify` and asserts exit 0 for each.
fn convert_all() -> Vec<(Case, Converted)> {
    cases()
        .into_iter()
        .map(|case| {
            let conv = convert(&case, &[]);
            assert_eq!(
                conv.run.status.code(),
                Some(0),
                "{}: `repvgg-fuse train.safetensors -o … --verify` failed:\n{}",
                case.name,
                describe(&conv.run)
            );
            (case, conv)
        })
        .collect()
}

fn signature(file: &StFile) -> BTreeMap<String, (Dtype, Vec<usize>)> {
    file.tensors
        .iter()
        .map(|(k, t)| (k.clone(), (t.dtype, t.shape.clone())))
        .collect()
}

/// Panics with every problem found, one per line.
fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Convert every case
// ---------------------------------------------------------------------------------------------

#[test]
fn every_case_folder_is_found_and_complete() {
    let cases = cases();
    for c in &cases {
        for f in [c.deploy(), c.deploy_f64()] {
            assert!(f.is_file(), "{}: missing {}", c.name, f.display());
        }
        assert!(
            !c.blocks().is_empty(),
            "{}: case.json lists no blocks",
            c.name
        );
    }
}

#[test]
fn convert_with_verify_exits_0_for_every_case() {
    for (case, conv) in convert_all() {
        assert!(conv.output.is_file(), "{}: no output written", case.name);
        assert!(
            conv.report_path().is_file(),
            "{}: no report written",
            case.name
        );
    }
}

#[test]
fn converted_keys_shapes_dtypes_equal_framework_deploy() {
    let mut problems = Vec::new();
    for (case, conv) in convert_all() {
        let ours = signature(&read_st_file(&conv.output));
        let theirs = signature(&read_st_file(&case.deploy()));
        for (k, v) in &theirs {
            match ours.get(k) {
                None => problems.push(format!("{}: missing `{k}` {v:?}", case.name)),
                Some(o) if o != v => problems.push(format!(
                    "{}: `{k}` is {o:?}, the framework's deploy has {v:?}",
                    case.name
                )),
                Some(_) => {}
            }
        }
        for k in ours.keys().filter(|k| !theirs.contains_key(*k)) {
            problems.push(format!(
                "{}: unexpected key `{k}` (strict loading refuses it)",
                case.name
            ));
        }
    }
    assert_no_problems("output vs deploy.safetensors key/shape/dtype", &problems);
}

#[test]
fn fused_tensors_within_one_ulp_of_f64_reference() {
    let mut problems = Vec::new();
    let mut compared = 0usize;
    for (case, conv) in convert_all() {
        let train = read_st_file(&case.train());
        let ours = read_st_file(&conv.output);
        let reference = read_st_file(&case.deploy_f64());
        let fused: Vec<&String> = ours
            .tensors
            .keys()
            .filter(|k| !train.tensors.contains_key(*k))
            .collect();
        // Two fused tensors (weight, bias) per block of case.json.
        if fused.len() != 2 * case.blocks().len() {
            problems.push(format!(
                "{}: {} fused tensors for {} blocks",
                case.name,
                fused.len(),
                case.blocks().len()
            ));
        }
        for key in fused {
            let t = &ours.tensors[key];
            let Some(r) = reference.tensors.get(key) else {
                problems.push(format!("{}: `{key}` not in deploy_f64", case.name));
                continue;
            };
            if r.shape != t.shape || !is_float(t.dtype) {
                problems.push(format!(
                    "{}: `{key}` is {:?} {:?}, reference {:?}",
                    case.name, t.dtype, t.shape, r.shape
                ));
                continue;
            }
            let w = width(t.dtype);
            let got = bit_patterns(t);
            let want: Vec<u64> = to_f64(r).iter().map(|&v| round_bits(v, t.dtype)).collect();
            let ref_values = to_f64(r);
            let (mut worst, mut at) = (0i64, 0usize);
            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                let d = (ordered(g, w) - ordered(e, w)).abs();
                if d > worst {
                    (worst, at) = (d, i);
                }
            }
            compared += 1;
            if worst > 1 {
                problems.push(format!(
                    "{}: `{key}` ({:?}) element {at} is {} ulp from the f64 reference {:e} (got bits {:#x}, expected {:#x})",
                    case.name, t.dtype, worst, ref_values[at], got[at], want[at]
                ));
            }
        }
    }
    assert!(
        compared >= 2 * MIN_CASES,
        "only {compared} fused tensors compared"
    );
    assert_no_problems("fused tensors vs deploy_f64 rounded", &problems);
}

#[test]
fn passthrough_tensors_are_byte_identical_to_train() {
    let mut problems = Vec::new();
    let mut compared = 0usize;
    for (case, conv) in convert_all() {
        let train = read_st_file(&case.train());
        let ours = read_st_file(&conv.output);
        for (key, t) in &ours.tensors {
            if let Some(src) = train.tensors.get(key) {
                compared += 1;
                if src != t {
                    problems.push(format!(
                        "{}: `{key}` differs from the train file's ({:?} {:?} vs {:?} {:?}, bytes equal: {})",
                        case.name,
                        t.dtype,
                        t.shape,
                        src.dtype,
                        src.shape,
                        src.data == t.data
                    ));
                }
            }
        }
    }
    // SE / head tensors exist in most cases; a run where none passes through is suspicious.
    assert!(compared > 0, "no pass-through tensor was compared at all");
    assert_no_problems("pass-through tensors vs train", &problems);
}

#[test]
fn output_metadata_equals_input_metadata() {
    for (case, conv) in convert_all() {
        let train = read_st_file(&case.train());
        let ours = read_st_file(&conv.output);
        assert_eq!(
            ours.metadata, train.metadata,
            "{}: __metadata__ of the output differs from the input's",
            case.name
        );
    }
}

#[test]
fn report_blocks_match_case_json() {
    let mut problems = Vec::new();
    for (case, conv) in convert_all() {
        let report = read_json(&conv.report_path());
        let name = &case.name;
        let Some(blocks) = report["blocks"].as_array() else {
            problems.push(format!("{name}: report has no blocks[]"));
            continue;
        };
        let got: Vec<&str> = blocks
            .iter()
            .map(|b| b["name"].as_str().unwrap_or("?"))
            .collect();
        let got_set: BTreeSet<&str> = got.iter().copied().collect();
        let want = case.block_names();
        let want_set: BTreeSet<&str> = want.iter().map(String::as_str).collect();
        if got.len() != want.len() || got_set != want_set {
            problems.push(format!("{name}: report blocks {got:?}, case.json {want:?}"));
            continue;
        }
        let by_name: HashMap<&str, &Value> = case
            .blocks()
            .iter()
            .map(|b| (b["name"].as_str().unwrap(), b))
            .collect();
        let mut worst_abs = 0.0f64;
        for b in blocks {
            let bn = b["name"].as_str().unwrap();
            let c = by_name[bn];
            for field in ["out_channels", "kernel", "identity"] {
                if b[field] != c[field] {
                    problems.push(format!(
                        "{name}: block `{bn}` {field} is {}, case.json says {}",
                        b[field], c[field]
                    ));
                }
            }
            for field in ["in_channels", "groups"] {
                if !b[field].is_null() && b[field] != c[field] {
                    problems.push(format!(
                        "{name}: block `{bn}` {field} is {}, case.json says {}",
                        b[field], c[field]
                    ));
                }
            }
            // The kernel's second dimension is settled by the weights in every block.
            let per_group = c["in_channels"].as_u64().unwrap() / c["groups"].as_u64().unwrap();
            if b["in_channels_per_group"].as_u64() != Some(per_group) {
                problems.push(format!(
                    "{name}: block `{bn}` in_channels_per_group is {}, case.json gives {per_group}",
                    b["in_channels_per_group"]
                ));
            }
            let abs = b["max_abs_deviation"].as_f64();
            let rel = b["max_rel_deviation"].as_f64();
            match (abs, rel) {
                (Some(a), Some(r)) if a.is_finite() && r.is_finite() && a >= 0.0 && r >= 0.0 => {
                    worst_abs = worst_abs.max(a);
                    if case.dtype() == "F32" && r > 1e-5 {
                        problems.push(format!(
                            "{name}: block `{bn}` max_rel_deviation {r:e} > 1e-5 for an F32 case"
                        ));
                    }
                }
                _ => problems.push(format!(
                    "{name}: block `{bn}` deviations are not numbers ≥ 0: abs {}, rel {}",
                    b["max_abs_deviation"], b["max_rel_deviation"]
                )),
            }
        }
        match report["summary"]["max_abs_deviation"].as_f64() {
            Some(s) if s == worst_abs => {}
            other => problems.push(format!(
                "{name}: summary.max_abs_deviation is {other:?}, the blocks' largest is {worst_abs:e}"
            )),
        }
        if report["verify"]["passed"] != Value::Bool(true)
            || report["verify"]["failures"]
                .as_array()
                .is_none_or(|f| !f.is_empty())
        {
            problems.push(format!("{name}: report verify is {}", report["verify"]));
        }
    }
    assert_no_problems("report blocks vs case.json", &problems);
}

#[test]
fn report_bn_eps_and_layout_match_case_json() {
    let mut problems = Vec::new();
    for (case, conv) in convert_all() {
        let report = read_json(&conv.report_path());
        let eps = case.json["bn_eps"].as_f64().unwrap();
        if report["bn_eps"]["value"].as_f64() != Some(eps) {
            problems.push(format!(
                "{}: bn_eps.value {}, case.json {eps:e}",
                case.name, report["bn_eps"]["value"]
            ));
        }
        if report["layout"]["name"] != case.json["layout"] {
            problems.push(format!(
                "{}: layout.name {}, case.json {}",
                case.name, report["layout"]["name"], case.json["layout"]
            ));
        }
    }
    assert_no_problems("report eps/layout vs case.json", &problems);
}

// ---------------------------------------------------------------------------------------------
// 2. verify accepts the frameworks' own deploy files
// ---------------------------------------------------------------------------------------------

#[test]
fn verify_accepts_framework_deploy_and_f64_deploy_for_every_case() {
    let mut problems = Vec::new();
    for case in cases() {
        for deploy in [case.deploy(), case.deploy_f64()] {
            let out = run(bin().arg("verify").arg(case.train()).arg(&deploy));
            if out.status.code() != Some(0) {
                problems.push(format!(
                    "{}: verify train {}:\n{}",
                    case.name,
                    deploy.file_name().unwrap().to_string_lossy(),
                    describe(&out)
                ));
            }
        }
    }
    assert_no_problems("verify of the frameworks' deploy files", &problems);
}

// ---------------------------------------------------------------------------------------------
// 3. verify refuses broken deploy files, naming the culprit
// ---------------------------------------------------------------------------------------------

/// Runs `verify train broken` with `--report`; asserts exit 1, stderr naming `culprit`, and
/// `verify.failures` naming exactly `culprit`.
fn assert_verify_refuses(case: &Case, broken: &StFile, culprit: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let deploy = dir.path().join("deploy.safetensors");
    let report = dir.path().join("verify.json");
    write_st_file(&deploy, broken);
    let out = run(bin()
        .arg("verify")
        .arg(case.train())
        .arg(&deploy)
        .arg("--report")
        .arg(&report));
    let ctx = format!("{}: deploy with {what}", case.name);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{ctx}: verify should exit 1:\n{}",
        describe(&out)
    );
    assert!(
        stderr(&out).contains(culprit),
        "{ctx}: stderr does not name `{culprit}`:\n{}",
        describe(&out)
    );
    let json = read_json(&report);
    assert_eq!(
        json["verify"]["passed"],
        Value::Bool(false),
        "{ctx}: report verify.passed"
    );
    let failures: Vec<&str> = json["verify"]["failures"]
        .as_array()
        .unwrap_or_else(|| panic!("{ctx}: report has no verify.failures"))
        .iter()
        .map(|f| f["name"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        failures,
        vec![culprit],
        "{ctx}: verify.failures should name only `{culprit}`"
    );
}

/// The block of a case that the broken-file tests pick: the middle one in case.json.
fn middle_block(case: &Case) -> String {
    let names = case.block_names();
    names[names.len() / 2].clone()
}

#[test]
fn verify_refuses_one_perturbed_fused_bias_and_names_only_its_block() {
    for case in cases() {
        let train = read_st_file(&case.train());
        let mut deploy = read_st_file(&case.deploy());
        let block = middle_block(&case);
        let key = case.fused_key(&train, &deploy, &block, "bias");
        let bias = deploy.tensors.get_mut(&key).unwrap();
        let values = to_f64(bias);
        let (i, &b) = values
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        // 1 % of the element for F32: ~100× the F32 tolerance. Half-precision tolerances are
        // ~1000× looser, so there the element is doubled instead.
        let delta = if bias.dtype == Dtype::F32 {
            0.01 * b.abs()
        } else {
            b.abs().max(0.5)
        };
        set_element(bias, i, b + delta);
        assert_ne!(
            to_f64(bias)[i],
            b,
            "{}: perturbation lost in rounding",
            case.name
        );
        assert_verify_refuses(
            &case,
            &deploy,
            &block,
            &format!("`{key}`[{i}] {b} → {}", b + delta),
        );
    }
}

#[test]
fn verify_refuses_missing_fused_weight_and_names_its_block() {
    for case in cases() {
        let train = read_st_file(&case.train());
        let mut deploy = read_st_file(&case.deploy());
        let block = middle_block(&case);
        let key = case.fused_key(&train, &deploy, &block, "weight");
        deploy.tensors.remove(&key);
        assert_verify_refuses(&case, &deploy, &block, &format!("`{key}` removed"));
    }
}

#[test]
fn verify_refuses_missing_passthrough_tensor_and_names_it() {
    let mut checked = 0;
    for case in cases() {
        let train = read_st_file(&case.train());
        let mut deploy = read_st_file(&case.deploy());
        let Some(key) = deploy
            .tensors
            .keys()
            .find(|k| train.tensors.contains_key(*k))
            .cloned()
        else {
            continue; // nothing passes through in this model
        };
        deploy.tensors.remove(&key);
        assert_verify_refuses(&case, &deploy, &key, "a pass-through tensor removed");
        checked += 1;
    }
    assert!(
        checked >= 10,
        "only {checked} cases have a pass-through tensor to remove"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The BN ε pitfall
// ---------------------------------------------------------------------------------------------

#[test]
fn ultralytics_verify_fails_with_forced_eps_1e5_and_passes_with_default() {
    let case = case("ultralytics_repconv");
    assert_eq!(
        case.json["bn_eps"].as_f64(),
        Some(1e-3),
        "fixture trained with ε 1e-3"
    );
    let wrong = run(bin()
        .arg("verify")
        .arg(case.train())
        .arg(case.deploy())
        .args(["--bn-eps", "1e-5"]));
    assert_eq!(
        wrong.status.code(),
        Some(1),
        "wrong ε must be caught:\n{}",
        describe(&wrong)
    );
    let right = run(bin().arg("verify").arg(case.train()).arg(case.deploy()));
    assert_eq!(
        right.status.code(),
        Some(0),
        "default ε must pass:\n{}",
        describe(&right)
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The convolution against torch's conv2d
// ---------------------------------------------------------------------------------------------

#[test]
fn conv2d_matches_torch_reference_convolutions() {
    let file = read_st_file(&fixtures_dir().join("conv").join("conv.safetensors"));
    let meta = file
        .metadata
        .clone()
        .expect("conv.safetensors has __metadata__");
    let names: Vec<String> = file
        .tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".input").map(str::to_string))
        .collect();
    assert!(
        names.len() >= 8,
        "only {} conv cases: {names:?}",
        names.len()
    );
    for name in &names {
        let x = &file.tensors[&format!("{name}.input")];
        let w = &file.tensors[&format!("{name}.weight")];
        let y = &file.tensors[&format!("{name}.output")];
        let groups: usize = meta
            .get(&format!("{name}.groups"))
            .unwrap_or_else(|| panic!("no {name}.groups in __metadata__"))
            .parse()
            .unwrap();
        let [n, c, h, wd] = x.shape[..] else {
            panic!("{name}.input is not NCHW")
        };
        let input = Input {
            n,
            c,
            h,
            w: wd,
            data: to_f64(x),
        };
        let out = w.shape[0];
        let got = conv2d(&input, &to_f64(w), None, out, groups);
        assert_eq!(
            [got.n, got.c, got.h, got.w][..],
            y.shape[..],
            "{name}: output shape"
        );
        let want = to_f64(y);
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = got
            .data
            .iter()
            .zip(&want)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(scale > 0.0, "{name}: reference output is all zero");
        assert!(
            err <= 1e-12 * scale,
            "{name} (groups {groups}): max |conv2d − torch| = {err:e}, {:e} of max |output| {scale:e}",
            err / scale
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. inspect --json
// ---------------------------------------------------------------------------------------------

#[test]
fn inspect_json_blocks_and_output_match_case_and_framework_deploy() {
    for name in [
        "timm_repvgg",
        "ultralytics_repconv",
        "mmpretrain_mobileone",
        "apple_mobileone",
    ] {
        let case = case(name);
        let out = run(bin().arg("inspect").arg(case.train()).arg("--json"));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: inspect --json:\n{}",
            describe(&out)
        );
        let json: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{name}: inspect --json stdout is not JSON: {e}"));

        let mut got: Vec<String> = json["blocks"]
            .as_array()
            .expect("blocks[]")
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect();
        let mut want = case.block_names();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{name}: inspect blocks vs case.json");

        let got: BTreeMap<String, (String, Vec<usize>)> = json["output"]
            .as_array()
            .expect("output[]")
            .iter()
            .map(|o| {
                let shape = o["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                (
                    o["name"].as_str().unwrap().to_string(),
                    (o["dtype"].as_str().unwrap().to_string(), shape),
                )
            })
            .collect();
        assert_eq!(
            json["output"].as_array().unwrap().len(),
            got.len(),
            "{name}: inspect output[] repeats a name"
        );
        let want: BTreeMap<String, (String, Vec<usize>)> = read_st_file(&case.deploy())
            .tensors
            .into_iter()
            .map(|(k, t)| (k, (format!("{:?}", t.dtype), t.shape)))
            .collect();
        assert_eq!(got, want, "{name}: inspect output[] vs deploy.safetensors");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Where the report goes
// ---------------------------------------------------------------------------------------------

fn dir_listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn report_defaults_to_stem_report_json_beside_output() {
    let case = case("timm_repvgg");
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("dir");
    std::fs::create_dir(&out_dir).unwrap();
    let out = run(bin()
        .arg(case.train())
        .arg("-o")
        .arg(out_dir.join("deploy.safetensors")));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        dir_listing(&out_dir),
        BTreeSet::from([
            "deploy.safetensors".to_string(),
            "deploy.report.json".to_string()
        ]),
        "dir/ should hold the output and its report, nothing else"
    );
    let report = read_json(&out_dir.join("deploy.report.json"));
    assert_eq!(
        report["blocks"].as_array().map(Vec::len),
        Some(case.blocks().len()),
        "default report blocks[]"
    );
}

#[test]
fn report_flag_writes_there_and_not_beside_output() {
    let case = case("timm_repvgg");
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("dir");
    let rep_dir = dir.path().join("elsewhere");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::create_dir(&rep_dir).unwrap();
    let report_path = rep_dir.join("other.json");
    let out = run(bin()
        .arg(case.train())
        .arg("-o")
        .arg(out_dir.join("deploy.safetensors"))
        .arg("--report")
        .arg(&report_path));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        dir_listing(&out_dir),
        BTreeSet::from(["deploy.safetensors".to_string()]),
        "with --report, nothing but the output beside it"
    );
    assert_eq!(
        dir_listing(&rep_dir),
        BTreeSet::from(["other.json".to_string()])
    );
    let report = read_json(&report_path);
    assert_eq!(
        report["blocks"].as_array().map(Vec::len),
        Some(case.blocks().len())
    );
}

// ---------------------------------------------------------------------------------------------
// 8. --dtype f16
// ---------------------------------------------------------------------------------------------

#[test]
fn dtype_f16_casts_every_float_tensor_and_still_verifies() {
    let case = case("timm_repvgg");
    let conv = convert(&case, &["--dtype", "f16"]);
    assert_eq!(conv.run.status.code(), Some(0), "{}", describe(&conv.run));
    let train = read_st_file(&case.train());
    let ours = read_st_file(&conv.output);
    let deploy = read_st_file(&case.deploy());
    // Same keys and shapes as the framework's deploy file; only the dtype changes.
    let shapes = |f: &StFile| -> BTreeMap<String, Vec<usize>> {
        f.tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect()
    };
    assert_eq!(
        shapes(&ours),
        shapes(&deploy),
        "keys/shapes vs deploy.safetensors"
    );
    for (key, t) in &ours.tensors {
        let expected = deploy.tensors[key].dtype;
        if is_float(expected) {
            assert_eq!(t.dtype, Dtype::F16, "`{key}` should be F16");
        } else {
            assert_eq!(
                Some(t),
                train.tensors.get(key),
                "integer `{key}` should be unchanged"
            );
        }
        if let Some(src) = train.tensors.get(key).filter(|s| is_float(s.dtype)) {
            // A cast pass-through tensor is the train value rounded to F16.
            let want: Vec<u64> = to_f64(src)
                .iter()
                .map(|&v| round_bits(v, Dtype::F16))
                .collect();
            assert_eq!(
                bit_patterns(t),
                want,
                "`{key}` is not the train value rounded to F16"
            );
        }
    }
    let out = run(bin().arg("verify").arg(case.train()).arg(&conv.output));
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify TRAIN f16-OUT:\n{}",
        describe(&out)
    );
}
