//! The whole-graph runner (`repvgg_fuse::verify::graph`) against onnxruntime: each graph of
//! fixtures/onnx_run/ (made by fixtures/make_onnx_run_fixtures.py) is run by tract on the input
//! stored beside it and its outputs compared with onnxruntime's; plus the refusals.
//!
//! Tolerances, relative to the output's largest magnitude (`max |a−b| ≤ rtol · max |a|`):
//! - graphs computed in f32: 1e-5. Both runtimes compute each op in f32, in their own
//!   summation order and kernels (tract's tiled GEMM, ORT's MLAS); measured on these nets of
//!   ≤ 4 layers: at most 8.0e-7 (a few f32 ulps of the output scale), so 1e-5 leaves 12× room
//!   for deeper graphs and still fails on an f16 rounding of the weights (~1e-3, tested below);
//! - f64 graphs: 1e-12 (measured 5.5e-17);
//! - graphs computed in f16 (onnxconverter-common's conversions, with and without
//!   `keep_io_types`): 1e-2. Each f16 rounding is ≤ 2^-11 ≈ 4.9e-4 relative and the two runtimes
//!   round at different places (their Conv/MatMul kernels accumulate at their own precision
//!   and cast back per op); measured: at most 1.9e-3.
#![cfg(feature = "graph-run")]

mod common;

use std::path::{Path, PathBuf};

use repvgg_fuse::verify::graph::{
    Graph, InputSpec, Optimization, RunError, Tensor64, compare, run_graph, run_graph_with,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/onnx_run")
        .join(name)
}

/// The stored (inputs, ORT outputs) of graph `name`, as [`Tensor64`]s.
fn expected(name: &str) -> (Vec<Tensor64>, Vec<Tensor64>) {
    common::ort_expected(&fixture(&format!("{name}.expected.safetensors")))
}

/// Runs graph `name` with tract on its stored input and checks every output against ORT's.
fn matches_onnxruntime(name: &str, rtol: f64, opt: Optimization) {
    let (inputs, ort) = expected(name);
    let ours = run_graph_with(&fixture(&format!("{name}.onnx")), &inputs, opt)
        .unwrap_or_else(|e| panic!("{name}: {:?}", anyhow::Error::from(e)));
    let deviations = compare(&ort, &ours).expect("same outputs");
    assert_eq!(deviations.len(), ort.len());
    for d in &deviations {
        eprintln!("{name} {opt:?}: {d:?}");
        assert!(
            d.max_abs_output > 0.0,
            "{name}: output `{}` is all zero",
            d.name
        );
        assert!(
            d.within(0.0, rtol),
            "{name}: output `{}` {d:?} over rtol {rtol}",
            d.name
        );
    }
    for (o, t) in ours.iter().zip(&ort) {
        assert_eq!(o.dtype, t.dtype, "{name}: output `{}` dtype", o.name);
    }
}

#[test]
fn helper_f32_matches_onnxruntime() {
    for opt in [
        Optimization::Typed,
        Optimization::Decluttered,
        Optimization::Optimized,
    ] {
        matches_onnxruntime("helper_f32", 1e-5, opt);
    }
}

#[test]
fn external_data_matches_onnxruntime() {
    matches_onnxruntime("external", 1e-5, Optimization::Optimized);
}

#[test]
fn f16_inside_f32_io_matches_onnxruntime() {
    matches_onnxruntime("helper_f16_keepio", 1e-2, Optimization::Optimized);
}

#[test]
fn f16_graph_matches_onnxruntime() {
    for opt in [Optimization::Typed, Optimization::Optimized] {
        matches_onnxruntime("helper_f16", 1e-2, opt);
    }
}

#[test]
fn f64_graph_matches_onnxruntime() {
    matches_onnxruntime("helper_f64", 1e-12, Optimization::Optimized);
}

#[test]
fn torch_exports_match_onnxruntime() {
    for name in [
        "torch_opset11",
        "torch_opset17",
        "torch_dynamo18",
        "symbolic",
    ] {
        matches_onnxruntime(name, 1e-5, Optimization::Optimized);
    }
}

#[test]
fn symbolic_batch_runs_at_the_given_shape() {
    let path = fixture("symbolic.onnx");
    let spec = InputSpec::parse("x:3x3x16x16").unwrap();
    let (inputs, outputs) = run_graph(&path, &[spec], 7, Optimization::Optimized).unwrap();
    assert_eq!(inputs[0].shape, [3, 3, 16, 16]);
    assert_eq!(outputs[0].name, "y");
    assert_eq!(outputs[0].shape, [3, 10]);
    let unnamed = InputSpec::parse("2x3x16x16").unwrap();
    let graph = Graph::load(&path, &[unnamed], Optimization::Optimized).unwrap();
    assert_eq!(
        graph.input_shapes(),
        [("x".to_string(), vec![2, 3, 16, 16])]
    );
}

#[test]
fn symbolic_dim_without_a_shape_is_refused_naming_the_input_and_dim() {
    let err = Graph::load(&fixture("symbolic.onnx"), &[], Optimization::Optimized).unwrap_err();
    assert!(
        matches!(&err, RunError::MissingShape { input, dim, .. } if input == "x" && dim == "batch"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("symbolic.onnx") && text.contains("x:1x3x16x16"),
        "{text}"
    );
}

#[test]
fn a_shape_disagreeing_with_the_graph_is_refused() {
    let path = fixture("symbolic.onnx");
    for spec in ["x:2x4x16x16", "x:2x3x16", "2x3x16x16x1"] {
        let spec = InputSpec::parse(spec).unwrap();
        let err = Graph::load(&path, &[spec], Optimization::Optimized).unwrap_err();
        assert!(matches!(err, RunError::ShapeMismatch { .. }), "{err:?}");
    }
    let spec = InputSpec::parse("images:2x3x16x16").unwrap();
    let err = Graph::load(&path, &[spec], Optimization::Optimized).unwrap_err();
    assert!(
        matches!(&err, RunError::UnknownInput { name, .. } if name == "images"),
        "{err:?}"
    );
}

#[test]
fn a_wrong_input_tensor_is_refused() {
    let graph = Graph::load(&fixture("helper_f32.onnx"), &[], Optimization::Optimized).unwrap();
    let mut inputs = graph.random_inputs(1).unwrap();
    inputs[0].shape = vec![1, 4, 12, 13];
    inputs[0].values.resize(4 * 12 * 13, 0.0);
    let err = graph.run(&inputs).unwrap_err();
    assert!(matches!(err, RunError::ShapeMismatch { .. }), "{err:?}");
    let err = run_graph_with(
        &fixture("helper_f32.onnx"),
        &inputs,
        Optimization::Optimized,
    )
    .unwrap_err();
    assert!(matches!(err, RunError::ShapeMismatch { .. }), "{err:?}");
    inputs[0].name = "y".to_string();
    let err = graph.run(&inputs).unwrap_err();
    assert!(matches!(err, RunError::UnknownInput { .. }), "{err:?}");
    let err = graph.run(&[]).unwrap_err();
    assert!(matches!(err, RunError::MissingInput { .. }), "{err:?}");
}

#[test]
fn the_same_seed_gives_the_same_input_and_output() {
    let path = fixture("helper_f16.onnx");
    let a = run_graph(&path, &[], 5, Optimization::Optimized).unwrap();
    let b = run_graph(&path, &[], 5, Optimization::Optimized).unwrap();
    let c = run_graph(&path, &[], 6, Optimization::Optimized).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.0, c.0);
    let x = &a.0[0];
    assert_eq!(x.dtype, safetensors::Dtype::F16);
    assert!(x.values.iter().all(|v| (-1.0..=1.0).contains(v)));
    // values are f16-rounded, so the deploy graph gets exactly the same numbers
    assert!(
        x.values
            .iter()
            .all(|&v| half::f16::from_f64(v).to_f64() == v)
    );
}

#[test]
fn a_graph_against_itself_in_another_form_deviates_little() {
    // the f32 graph and its external-data copy are the same function: deviation ~0
    let (inputs, train) =
        run_graph(&fixture("helper_f32.onnx"), &[], 3, Optimization::Optimized).unwrap();
    let deploy =
        run_graph_with(&fixture("external.onnx"), &inputs, Optimization::Optimized).unwrap();
    for d in compare(&train, &deploy).unwrap() {
        assert_eq!(d.max_abs, 0.0, "{d:?}");
    }
    // and the f16 conversion is a small but visible deviation, caught at f32's tolerance
    let half = run_graph_with(
        &fixture("helper_f16_keepio.onnx"),
        &inputs,
        Optimization::Optimized,
    )
    .unwrap();
    let devs = compare(&train, &half).unwrap();
    assert!(devs.iter().any(|d| !d.within(0.0, 1e-5)), "{devs:?}");
    assert!(devs.iter().all(|d| d.within(0.0, 1e-2)), "{devs:?}");
}

#[test]
fn compare_refuses_different_outputs() {
    let t = |name: &str, shape: Vec<usize>| Tensor64 {
        name: name.to_string(),
        dtype: safetensors::Dtype::F32,
        values: vec![1.0; shape.iter().product()],
        shape,
    };
    let err = compare(&[t("a", vec![2])], &[t("b", vec![2])]).unwrap_err();
    assert!(matches!(err, RunError::OutputSet { .. }), "{err:?}");
    let err = compare(&[t("a", vec![2]), t("b", vec![1])], &[t("a", vec![2])]).unwrap_err();
    assert!(matches!(err, RunError::OutputSet { .. }), "{err:?}");
    let err = compare(&[t("a", vec![2, 1])], &[t("a", vec![1, 2])]).unwrap_err();
    assert!(matches!(err, RunError::OutputShape { .. }), "{err:?}");
    let mut nan = t("a", vec![2]);
    nan.values[1] = f64::NAN;
    let d = compare(&[t("a", vec![2])], &[nan]).unwrap();
    assert_eq!(d[0].max_abs, f64::INFINITY);
}

#[test]
fn compare_measures_abs_and_rel_deviation() {
    let t = |values: Vec<f64>| Tensor64 {
        name: "y".to_string(),
        dtype: safetensors::Dtype::F32,
        shape: vec![values.len()],
        values,
    };
    let d = compare(&[t(vec![-4.0, 1.0, 2.0])], &[t(vec![-4.0, 1.5, 1.0])]).unwrap();
    assert_eq!(d[0].max_abs, 1.0);
    assert_eq!(d[0].max_abs_output, 4.0);
    assert_eq!(d[0].max_rel, 0.25);
}

#[test]
fn a_truncated_graph_is_an_error_not_a_panic() {
    let bytes = std::fs::read(fixture("helper_f32.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for cut in [1, 10, bytes.len() / 2, bytes.len() - 1] {
        let path = dir.path().join("cut.onnx");
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = Graph::load(&path, &[], Optimization::Optimized).unwrap_err();
        assert!(err.to_string().contains("cut.onnx"), "{err}");
    }
    let err = Graph::load(
        &dir.path().join("missing.onnx"),
        &[],
        Optimization::Optimized,
    )
    .unwrap_err();
    assert!(matches!(err, RunError::Read { .. }), "{err:?}");
}

#[test]
fn external_data_outside_the_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("model");
    std::fs::create_dir(&inner).unwrap();
    std::fs::copy(
        fixture("external.onnx.data"),
        dir.path().join("external.onnx.data"),
    )
    .unwrap();
    std::fs::copy(fixture("external.onnx"), inner.join("external.onnx")).unwrap();
    // the side file is one folder up: not found next to the graph
    let err = Graph::load(&inner.join("external.onnx"), &[], Optimization::Optimized).unwrap_err();
    assert!(matches!(err, RunError::Load { .. }), "{err:?}");
    // a symlink next to the graph that leaves its folder is refused as well
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(
            dir.path().join("external.onnx.data"),
            inner.join("external.onnx.data"),
        )
        .unwrap();
        let err =
            Graph::load(&inner.join("external.onnx"), &[], Optimization::Optimized).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains("outside the model directory"), "{chain}");
    }
}

/// The whole chain of `err`, as the binary prints it.
fn chain(err: RunError) -> String {
    format!("{:#}", anyhow::Error::from(err))
}

#[test]
fn an_external_location_leaving_the_folder_is_refused() {
    for name in ["bad_location_parent", "bad_location_absolute"] {
        let err = Graph::load(
            &fixture(&format!("{name}.onnx")),
            &[],
            Optimization::Optimized,
        )
        .unwrap_err();
        assert!(matches!(err, RunError::Load { .. }), "{name}: {err:?}");
        let text = chain(err);
        assert!(
            text.contains(&format!("{name}.onnx"))
                && text.contains("must be a relative path inside the model directory"),
            "{name}: {text}"
        );
    }
}

#[test]
fn external_data_shorter_than_its_offsets_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("external.onnx"), dir.path().join("external.onnx")).unwrap();
    let data = std::fs::read(fixture("external.onnx.data")).unwrap();
    std::fs::write(
        dir.path().join("external.onnx.data"),
        &data[..data.len() - 4],
    )
    .unwrap();
    let err = Graph::load(
        &dir.path().join("external.onnx"),
        &[],
        Optimization::Optimized,
    )
    .unwrap_err();
    let text = chain(err);
    assert!(text.contains("out of bounds"), "{text}");
}

#[test]
fn raw_data_of_the_wrong_length_is_refused_naming_the_tensor() {
    let err = Graph::load(&fixture("bad_raw_data.onnx"), &[], Optimization::Optimized).unwrap_err();
    assert!(
        matches!(&err, RunError::RawData { tensor, len: 288, expected: 576, .. } if tensor == "w3"),
        "{err:?}"
    );
}

#[test]
fn malformed_weights_are_an_error_not_a_panic() {
    for name in ["bad_raw_data", "bad_conv_channels"] {
        let path = fixture(&format!("{name}.onnx"));
        let result = Graph::load(&path, &[], Optimization::Optimized)
            .and_then(|g| g.random_inputs(0).and_then(|x| g.run(&x)));
        let err = result.expect_err(name);
        let text = chain(err);
        eprintln!("{name}: {text}");
        assert!(text.contains(&format!("{name}.onnx")), "{text}");
    }
}

#[test]
fn input_specs_parse() {
    assert_eq!(
        InputSpec::parse("1x3x64x64").unwrap(),
        InputSpec {
            name: None,
            shape: vec![1, 3, 64, 64]
        }
    );
    assert_eq!(
        InputSpec::parse("input:0:2x3").unwrap(),
        InputSpec {
            name: Some("input:0".to_string()),
            shape: vec![2, 3]
        }
    );
    for bad in ["", "1x", "x:", ":1x2", "1x-3", "axb"] {
        assert!(
            matches!(InputSpec::parse(bad), Err(RunError::BadSpec { .. })),
            "{bad}"
        );
    }
}

/// Not a test: the timing bench/onnx_run.sh runs (`--ignored`), on the graphs named by
/// ONNX_RUN_BENCH_TRAIN and ONNX_RUN_BENCH_DEPLOY (bench/make_b3_onnx.py writes them), at the
/// optimization ONNX_RUN_BENCH_OPT (`typed`, `decluttered`, `optimized`). Prints one line per
/// phase: load+plan time, run time, and the whole-graph deviation.
#[test]
#[ignore = "a benchmark: bench/onnx_run.sh runs it on RepVGG-B3"]
fn bench_whole_graph_check() {
    use std::time::Instant;
    let (Ok(train), Ok(deploy)) = (
        std::env::var("ONNX_RUN_BENCH_TRAIN"),
        std::env::var("ONNX_RUN_BENCH_DEPLOY"),
    ) else {
        eprintln!("ONNX_RUN_BENCH_TRAIN / ONNX_RUN_BENCH_DEPLOY not set; nothing to time");
        return;
    };
    let opt = match std::env::var("ONNX_RUN_BENCH_OPT").as_deref() {
        Ok("typed") => Optimization::Typed,
        Ok("decluttered") => Optimization::Decluttered,
        _ => Optimization::Optimized,
    };
    let start = Instant::now();
    let t0 = Instant::now();
    let train_graph = Graph::load(Path::new(&train), &[], opt).unwrap();
    let load_train = t0.elapsed().as_secs_f64();
    let inputs = train_graph.random_inputs(0).unwrap();
    let t0 = Instant::now();
    let train_out = train_graph.run(&inputs).unwrap();
    let run_train = t0.elapsed().as_secs_f64();
    drop(train_graph);
    let t0 = Instant::now();
    let deploy_graph = Graph::load(Path::new(&deploy), &[], opt).unwrap();
    let load_deploy = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let deploy_out = deploy_graph.run(&inputs).unwrap();
    let run_deploy = t0.elapsed().as_secs_f64();
    let dev = compare(&train_out, &deploy_out).unwrap();
    println!(
        "tract {opt:?}: train load {load_train:.2} s run {run_train:.2} s; deploy load {load_deploy:.2} s run {run_deploy:.2} s; total {:.2} s; {dev:?}",
        start.elapsed().as_secs_f64()
    );
}
