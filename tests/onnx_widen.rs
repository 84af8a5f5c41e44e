//! f16 graphs run widened to f32 (`Compute::F16AsF32`, what the whole-graph check of
//! `--verify` does since tract's f16 kernels are scalar on x86-64): the same weights, computed
//! without f16's rounding of every op. Expected values are onnxruntime's, stored by
//! fixtures/make_onnx_run_fixtures.py beside each graph.
//!
//! - Against ORT's f16 run of the same f16 graph: within 1e-2 of the output's max (f16
//!   arithmetic, ≤ 2^-11 per op, against none), and not identical (it really runs in f32).
//! - The keep_io_types f16 graph widened against the f32 graph it was made from: the f16
//!   rounding of the weights is still seen (over 1e-5, f32's graph tolerance) and small
//!   (under 1e-2): widening keeps what the comparison of two graphs is about.
#![cfg(feature = "graph-run")]

mod common;

use std::path::{Path, PathBuf};

use repvgg_fuse::verify::graph::{Compute, Graph, Optimization, Tensor64, check_graphs, compare};

fn fixture(dir: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(dir)
        .join(name)
}

/// The stored (inputs, ORT outputs) of graph `name` of fixtures/onnx_run.
fn expected(name: &str) -> (Vec<Tensor64>, Vec<Tensor64>) {
    common::ort_expected(&fixture(
        "onnx_run",
        &format!("{name}.expected.safetensors"),
    ))
}

fn widened(name: &str, inputs: &[Tensor64]) -> Vec<Tensor64> {
    let path = fixture("onnx_run", &format!("{name}.onnx"));
    let graph = Graph::load_as(&path, &[], Optimization::Optimized, Compute::F16AsF32)
        .unwrap_or_else(|e| panic!("{name}: {:?}", anyhow::Error::from(e)));
    graph.run(inputs).expect("runs")
}

#[test]
fn a_widened_f16_graph_is_close_to_onnxruntimes_f16_run_and_keeps_its_dtypes() {
    for name in ["helper_f16", "helper_f16_keepio"] {
        let (inputs, ort) = expected(name);
        let ours = widened(name, &inputs);
        for (o, t) in ours.iter().zip(&ort) {
            assert_eq!(o.dtype, t.dtype, "{name}: output `{}` dtype", o.name);
        }
        for d in compare(&ort, &ours).expect("same outputs") {
            eprintln!("{name} widened: {d:?}");
            assert!(d.max_abs_output > 0.0, "{name}: all zero");
            assert!(d.within(0.0, 1e-2), "{name}: {d:?}");
        }
    }
    // helper_f16 takes f16 input: the widened run computes in f32, so its outputs are not
    // ORT's f16-rounded ones.
    let (inputs, ort) = expected("helper_f16");
    let devs = compare(&ort, &widened("helper_f16", &inputs)).expect("same outputs");
    assert!(devs.iter().any(|d| d.max_abs > 0.0), "{devs:?}");
}

#[test]
fn widening_still_sees_the_f16_rounding_of_the_weights() {
    let (inputs, _) = expected("helper_f32");
    let path = fixture("onnx_run", "helper_f32.onnx");
    let f32_graph = Graph::load(&path, &[], Optimization::Optimized).expect("loads");
    let full = f32_graph.run(&inputs).expect("runs");
    let half = widened("helper_f16_keepio", &inputs);
    let devs = compare(&full, &half).expect("same outputs");
    assert!(devs.iter().any(|d| !d.within(0.0, 1e-5)), "{devs:?}");
    assert!(devs.iter().all(|d| d.within(0.0, 1e-2)), "{devs:?}");
}

#[test]
fn the_whole_graph_check_of_an_f16_export_passes_and_sees_its_rounding() {
    let train = fixture("onnx_repvgg_f16", "train.onnx");
    let deploy = fixture("onnx_repvgg_f16", "deploy.onnx");
    let f16 = safetensors::Dtype::F16;
    let (check, failures) = check_graphs(&train, &deploy, &[], 0, (None, None), f16).unwrap();
    assert!(
        check.passed && failures.is_empty(),
        "{check:?} {failures:?}"
    );
    assert_eq!(check.rtol, 2e-2);
    // The framework's f16 deploy graph is not the same numbers: a tolerance below its f16
    // rounding fails it, as exit 1 would.
    let (check, failures) =
        check_graphs(&train, &deploy, &[], 0, (Some(0.0), Some(1e-7)), f16).unwrap();
    assert!(!check.passed && failures.len() == 1, "{check:?}");
}
