//! Reading ONNX losslessly and writing it back (src/onnx/). The fixtures in fixtures/onnx_io/
//! and their expected readings (`*.json`, by onnx's own `numpy_helper.to_array`) come from
//! fixtures/make_onnx_io_fixtures.py; bad inputs are built here from literal protobuf.
//!
//! `deploy_graph_*` also write their outputs to target/onnx_io_written/, which
//! `make_onnx_io_fixtures.py --check target/onnx_io_written` runs through
//! `onnx.checker.check_model(full_check=True)` and onnxruntime against the train graph.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use protobuf::Message;
use repvgg_fuse::Error;
use repvgg_fuse::app::write_graph;
use repvgg_fuse::onnx::graph::Attr;
use repvgg_fuse::onnx::proto::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    ValueInfoProto,
};
use repvgg_fuse::onnx::{
    DataPlacement, GraphEdit, NewAttr, NewNode, NewTensor, OnnxError, OnnxModel, TensorBytes,
    TensorOrigin, graph_view, looks_like_onnx,
};
use safetensors::Dtype;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/onnx_io")
        .join(name)
}

fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(&format!("{name}.json"))).expect("fixture json");
    serde_json::from_str(&text).expect("valid json")
}

fn open(name: &str) -> OnnxModel {
    OnnxModel::open(&fixture(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// Writes the model with no edit.
fn no_edit(model: &OnnxModel, out: &Path, placement: DataPlacement) {
    let mut fill = |_: usize, _: &mut dyn Write| -> std::io::Result<()> { unreachable!() };
    write_graph(model, &GraphEdit::default(), out, placement, &mut fill)
        .unwrap_or_else(|e| panic!("{e}"));
}

fn parse(path: &Path) -> ModelProto {
    ModelProto::parse_from_bytes(&std::fs::read(path).expect("readable")).expect("parses")
}

/// The graph view's constants agree with onnx's reading of the model.
fn assert_constants_as_onnx_reads_them(model: &OnnxModel, name: &str) {
    let want = expected(name);
    let view = graph_view(model);
    let consts = want["constants"].as_object().expect("constants");
    assert_eq!(view.constants.len(), consts.len(), "{name}: constant count");
    for (tensor, w) in consts {
        let got = &view.constants[tensor];
        assert_eq!(i64::from(got.data_type), w["data_type"], "{tensor}");
        let dims: Vec<i64> = serde_json::from_value(w["dims"].clone()).expect("dims");
        assert_eq!(got.dims, dims, "{tensor}");
        let values: Vec<f64> = serde_json::from_value(w["values"].clone()).expect("values");
        assert_close(got.values.as_deref().expect("values"), &values, tensor);
        let entry = model.tensor(tensor).expect("in the table");
        let is_alias = matches!(entry.origin, TensorOrigin::Alias { .. });
        assert_eq!(
            is_alias,
            w.get("alias_of").is_some(),
            "{tensor}: alias flag"
        );
    }
    let names = |v: &Value| -> Vec<String> { serde_json::from_value(v.clone()).expect("names") };
    assert_eq!(view.inputs, names(&want["inputs"]));
    assert_eq!(view.outputs, names(&want["outputs"]));
    let ops: Vec<&str> = view.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, names(&want["op_types"]));
    assert_eq!(model.ir_version(), want["ir_version"]);
    assert_eq!(model.opset(), want["opset"]);
}

/// Equal to 2 ulp of f64: serde_json's float parsing is not correctly rounded.
fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= w.abs() * 4.0 * f64::EPSILON,
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn rich_model_reads_as_onnx_reads_it() {
    let model = open("rich.onnx");
    assert_constants_as_onnx_reads_them(&model, "rich");
    // Typed fields are decoded into owned bytes, raw_data stays a range of the file.
    assert!(matches!(
        model.tensor("B").map(|e| &e.bytes),
        Some(TensorBytes::Owned(_))
    ));
    assert_eq!(model.tensor("h").map(|e| e.dtype), Some(Dtype::F16));
    assert_eq!(model.tensor("flag").map(|e| e.dtype), Some(Dtype::BOOL));
    let alias = model.tensor("W_alias").expect("alias");
    assert_eq!(
        alias.origin,
        TensorOrigin::Alias {
            node: 2,
            of: "W".into()
        }
    );
    let view = graph_view(&model);
    let conv = &view.nodes[3];
    assert!(matches!(conv.attrs["pads"], Attr::Ints(ref p) if p == &[1, 1, 1, 1]));
    assert!(matches!(conv.attrs["group"], Attr::Int(1)));
}

#[test]
fn raw_data_is_a_byte_range_of_the_file() {
    let model = open("rich.onnx");
    let file = std::fs::read(fixture("rich.onnx")).expect("readable");
    let w = model.tensor("W").expect("W");
    let TensorBytes::Inline { offset, len } = w.bytes else {
        panic!("W is not inline: {:?}", w.bytes);
    };
    let want: Vec<f64> =
        serde_json::from_value(expected("rich")["constants"]["W"]["values"].clone()).expect("W");
    let bytes = &file[offset as usize..(offset + len) as usize];
    let got: Vec<f64> = bytes
        .chunks_exact(4)
        .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect();
    assert_close(&got, &want, "W");
    assert_eq!(w.shape, [3, 2, 3, 3]);
    let mut part = [0u8; 8];
    model.read_range(w, 4, &mut part).expect("in range");
    assert_eq!(part, bytes[4..12]);
    assert!(model.read_range(w, len - 4, &mut part).is_err());
}

#[test]
fn rich_model_round_trips_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("same.onnx");
    no_edit(&open("rich.onnx"), &out, DataPlacement::AsInput);
    let original = std::fs::read(fixture("rich.onnx")).expect("readable");
    let written = std::fs::read(&out).expect("written");
    assert_eq!(parse(&out), parse(&fixture("rich.onnx")));
    assert!(written == original, "not byte for byte");
}

#[test]
fn undeclared_fields_are_written_back_as_unknown_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("same.onnx");
    no_edit(&open("rich.onnx"), &out, DataPlacement::Inline);
    let m = parse(&out);
    let unknown = |fields: &protobuf::UnknownFields| -> BTreeSet<u32> {
        fields.iter().map(|(n, _)| n).collect()
    };
    // functions (25) is not in our schema; 97/98/99 are in no ONNX schema.
    assert_eq!(unknown(m.special_fields.unknown_fields()), [25].into());
    let g = m.graph.get_or_default();
    assert_eq!(unknown(g.special_fields.unknown_fields()), [99].into());
    assert_eq!(
        unknown(g.node[3].special_fields.unknown_fields()),
        [98].into()
    );
    assert_eq!(
        unknown(g.initializer[0].special_fields.unknown_fields()),
        [97].into()
    );
    assert_eq!(m.producer_name(), "onnx-io-fixtures");
    assert_eq!(m.doc_string(), b"model doc");
    let props: Vec<(&str, &str)> = m
        .metadata_props
        .iter()
        .map(|e| (e.key(), e.value()))
        .collect();
    assert_eq!(props, [("names", "{0: 'cat', 1: 'dog'}"), ("stride", "32")]);
    assert_eq!(g.node[3].metadata_props.len(), 1);
    assert_eq!(g.node[3].doc_string(), b"a conv with everything");
}

#[test]
fn external_data_is_read_from_the_side_file() {
    let model = open("ext.onnx");
    assert!(model.has_external_data());
    assert_constants_as_onnx_reads_them(&model, "ext");
    let w = model.tensor("W").expect("W");
    assert!(
        matches!(&w.bytes, TensorBytes::External { file, offset: 0, len: 288 } if file.ends_with("ext.onnx.data")),
        "{:?}",
        w.bytes
    );
    assert!(matches!(
        model.tensor("B").map(|e| &e.bytes),
        Some(TensorBytes::Inline { .. })
    ));
}

#[test]
fn external_data_is_written_as_external_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("copy.onnx");
    no_edit(&open("ext.onnx"), &out, DataPlacement::AsInput);
    assert!(dir.path().join("copy.onnx.data").is_file());
    let copy = OnnxModel::open(&out).expect("reopens");
    assert_constants_as_onnx_reads_them(&copy, "ext");
    let m = parse(&out);
    let loc = &m.graph.get_or_default().initializer[0].external_data[0];
    assert_eq!((loc.key(), loc.value()), ("location", "copy.onnx.data"));
    // And pulled inline on request.
    let inline = dir.path().join("inline.onnx");
    no_edit(&open("ext.onnx"), &inline, DataPlacement::Inline);
    let model = OnnxModel::open(&inline).expect("reopens");
    assert!(!model.has_external_data());
    assert_constants_as_onnx_reads_them(&model, "ext");
}

// ---- the deploy graph of a RepVGG-style block ----

/// `conv_train`: fuses its 3×3 and 1×1 branches the simple way (the engine's job in the
/// tool) and writes the deploy graph through the writer.
fn write_fused(
    train: &str,
    out: &Path,
    placement: DataPlacement,
) -> repvgg_fuse::onnx::WriteSummary {
    let model = open(&format!("{train}.onnx"));
    let f32s = |name: &str| -> Vec<f32> {
        let e = model.tensor(name).expect(name);
        let b = model.tensor_bytes(e).expect("bytes");
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let (w3, b3, w1, b1) = (f32s("W3"), f32s("B3"), f32s("W1"), f32s("B1"));
    let c = b3.len();
    let mut w = w3.clone();
    for (i, v) in w1.iter().enumerate() {
        w[i * 9 + 4] += v; // the 1×1 kernel at the centre of the 3×3
    }
    let b: Vec<f32> = b3.iter().zip(&b1).map(|(x, y)| x + y).collect();
    let graph = model.graph();
    let index = |name: &str| {
        graph
            .node
            .iter()
            .position(|n| n.name() == name)
            .expect(name)
    };
    let first = index("conv3x3");
    let edit = GraphEdit {
        remove: [first, index("conv1x1"), index("add")].into(),
        insert: vec![NewNode {
            at: first,
            name: "block.fused".into(),
            op_type: "Conv".into(),
            domain: String::new(),
            inputs: vec!["X".into(), "block.weight".into(), "block.bias".into()],
            outputs: vec!["s".into()],
            attrs: vec![
                ("kernel_shape".into(), NewAttr::Ints(vec![3, 3])),
                ("pads".into(), NewAttr::Ints(vec![1, 1, 1, 1])),
                ("group".into(), NewAttr::Int(1)),
            ],
        }],
        tensors: vec![
            NewTensor {
                name: "block.weight".into(),
                dtype: Dtype::F32,
                shape: vec![c, c, 3, 3],
            },
            NewTensor {
                name: "block.bias".into(),
                dtype: Dtype::F32,
                shape: vec![c],
            },
        ],
    };
    let mut fill = |i: usize, out: &mut dyn Write| -> std::io::Result<()> {
        let values = if i == 0 { &w } else { &b };
        for v in values {
            out.write_all(&v.to_le_bytes())?;
        }
        Ok(())
    };
    write_graph(&model, &edit, out, placement, &mut fill).unwrap_or_else(|e| panic!("{e}"))
}

/// Every node input is a graph input, an initializer or an earlier node's output; every
/// value_info and graph output is produced.
fn assert_references_resolve(g: &GraphProto) {
    let mut known: HashSet<&str> = g.input.iter().map(|v| v.name()).collect();
    known.extend(g.initializer.iter().map(|t| t.name()));
    for node in &g.node {
        for input in node.input.iter().filter(|i| !i.is_empty()) {
            assert!(
                known.contains(input.as_str()),
                "{}: `{input}` unresolved",
                node.name()
            );
        }
        known.extend(node.output.iter().map(String::as_str));
    }
    for v in g.value_info.iter().chain(&g.output) {
        assert!(
            known.contains(v.name()),
            "`{}` is produced by nothing",
            v.name()
        );
    }
}

fn written_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/onnx_io_written");
    std::fs::create_dir_all(&dir).expect("target/ is writable");
    dir
}

fn assert_deploy_graph(out: &Path, train: &str) {
    std::fs::write(
        out.with_extension("json"),
        format!("{{\"train\": \"{train}\"}}\n"),
    )
    .expect("writable");
    let deploy = OnnxModel::open(out).unwrap_or_else(|e| panic!("{e}"));
    let g = deploy.graph();
    let ops: Vec<&str> = g.node.iter().map(|n| n.op_type()).collect();
    assert_eq!(ops, ["Conv", "Constant", "Mul", "Relu"]);
    let inits: Vec<&str> = g.initializer.iter().map(|t| t.name()).collect();
    assert_eq!(inits, ["block.weight", "block.bias"]);
    let inputs: Vec<&str> = g.input.iter().map(|v| v.name()).collect();
    assert_eq!(inputs, ["X"], "W1 was an input only as an initializer");
    let vi: Vec<&str> = g.value_info.iter().map(|v| v.name()).collect();
    assert_eq!(vi, ["s"]);
    assert_references_resolve(g);
    let train = open(&format!("{train}.onnx"));
    assert_eq!(deploy.proto().metadata_props, train.proto().metadata_props);
    assert_eq!(deploy.proto().opset_import, train.proto().opset_import);
    assert_eq!(g.output, train.graph().output);
    assert_eq!(
        g.node[3],
        train.graph().node[7],
        "untouched nodes are as read"
    );
}

#[test]
fn deploy_graph_of_a_repvgg_block() {
    let out = written_dir().join("conv_train_deploy.onnx");
    let summary = write_fused("conv_train", &out, DataPlacement::AsInput);
    assert_eq!(
        summary.constant_nodes_dropped,
        [0, 1],
        "the Identity and the Constant"
    );
    let mut dropped = summary.initializers_dropped.clone();
    dropped.sort();
    assert_eq!(dropped, ["B3", "W1", "W3"]);
    assert_eq!(summary.value_info_dropped, ["a", "b"]);
    assert_eq!(summary.side_file, None);
    assert_deploy_graph(&out, "conv_train");
}

#[test]
fn deploy_graph_with_external_data() {
    let out = written_dir().join("conv_train_ext_deploy.onnx");
    let summary = write_fused("conv_train_ext", &out, DataPlacement::AsInput);
    assert_eq!(
        summary.side_file,
        Some(written_dir().join("conv_train_ext_deploy.onnx.data"))
    );
    // block.weight (8·8·3·3 f32: 2304 bytes) goes to the side file, block.bias (32) stays
    // inline: under ONNX's 1 KiB threshold.
    assert_eq!(summary.side_bytes, 2304);
    assert_deploy_graph(&out, "conv_train_ext");
    let deploy = OnnxModel::open(&out).expect("reopens");
    let inline = written_dir().join("conv_train_deploy.onnx");
    write_fused("conv_train", &inline, DataPlacement::Inline);
    let inline = OnnxModel::open(&inline).expect("reopens");
    for name in ["block.weight", "block.bias"] {
        let a = deploy
            .tensor_bytes(deploy.tensor(name).expect(name))
            .expect("bytes");
        let b = inline
            .tensor_bytes(inline.tensor(name).expect(name))
            .expect("bytes");
        assert_eq!(a, b, "{name}");
    }
    assert!(matches!(
        deploy.tensor("block.weight").map(|e| &e.bytes),
        Some(TensorBytes::External { .. })
    ));
}

// ---- the writer refuses and leaves nothing ----

#[test]
fn a_failing_producer_leaves_nothing_and_the_old_output_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("deploy.onnx");
    std::fs::write(&out, b"old").expect("writable");
    let model = open("conv_train.onnx");
    let edit = GraphEdit {
        tensors: vec![NewTensor {
            name: "t".into(),
            dtype: Dtype::F32,
            shape: vec![2],
        }],
        ..Default::default()
    };
    let mut failing = |_: usize, _: &mut dyn Write| Err(std::io::Error::other("fusion failed"));
    let err =
        write_graph(&model, &edit, &out, DataPlacement::Inline, &mut failing).expect_err("fails");
    assert!(
        matches!(&err, Error::Onnx(OnnxError::Fill { tensor, .. }) if tensor == "t"),
        "{err}"
    );
    let mut short = |_: usize, w: &mut dyn Write| w.write_all(&[0; 4]);
    let err =
        write_graph(&model, &edit, &out, DataPlacement::Inline, &mut short).expect_err("fails");
    assert!(
        err.to_string()
            .contains("4 bytes were written for a tensor of 8"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).expect("still there"), b"old");
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert_eq!(left.len(), 1, "temp files left behind");
}

#[test]
fn the_input_and_its_side_file_are_never_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    // other.onnx keeps its weight in ext.onnx.data.
    std::fs::copy(fixture("ext.onnx"), dir.path().join("other.onnx")).expect("copy");
    std::fs::copy(fixture("ext.onnx.data"), dir.path().join("ext.onnx.data")).expect("copy");
    let model = OnnxModel::open(&dir.path().join("other.onnx")).expect("opens");
    let mut fill = |_: usize, _: &mut dyn Write| Ok(());
    // The input, its side file, and an output whose own side file would be the input's.
    for target in ["other.onnx", "ext.onnx.data", "ext.onnx"] {
        let out = dir.path().join(target);
        let err = write_graph(
            &model,
            &GraphEdit::default(),
            &out,
            DataPlacement::AsInput,
            &mut fill,
        )
        .expect_err("refused");
        assert!(
            matches!(err, Error::Onnx(OnnxError::Output { .. })),
            "{target}: {err}"
        );
    }
    let out = dir.path().join("fine.onnx");
    write_graph(
        &model,
        &GraphEdit::default(),
        &out,
        DataPlacement::AsInput,
        &mut fill,
    )
    .expect("another name is fine");
    let original = std::fs::read(fixture("ext.onnx.data")).expect("readable");
    assert_eq!(
        std::fs::read(dir.path().join("ext.onnx.data")).expect("kept"),
        original
    );
    assert_eq!(
        std::fs::read(dir.path().join("other.onnx")).expect("kept"),
        std::fs::read(fixture("ext.onnx")).expect("readable")
    );
}

#[test]
fn edits_that_do_not_fit_are_refused() {
    let model = open("conv_train.onnx");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("d.onnx");
    let mut fill = |_: usize, w: &mut dyn Write| w.write_all(&[0; 4]);
    let bad = [
        GraphEdit {
            remove: [99].into(),
            ..Default::default()
        },
        GraphEdit {
            tensors: vec![NewTensor {
                name: "W3".into(),
                dtype: Dtype::F32,
                shape: vec![1],
            }],
            ..Default::default()
        },
        GraphEdit {
            tensors: vec![NewTensor {
                name: "Y".into(),
                dtype: Dtype::F32,
                shape: vec![1],
            }],
            ..Default::default()
        },
    ];
    for edit in bad {
        let err = write_graph(&model, &edit, &out, DataPlacement::Inline, &mut fill)
            .expect_err("refused");
        assert!(matches!(err, Error::Onnx(OnnxError::Edit { .. })), "{err}");
    }
    assert!(!out.exists());
}

// ---- bad input, from literal protobuf ----

fn tensor(name: &str, dims: &[i64], raw: &[u8]) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        data_type: Some(1),
        name: Some(name.into()),
        raw_data: Some(raw.to_vec().into()),
        ..Default::default()
    }
}

fn value(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: Some(format!("{op}_{}", outputs.first().unwrap_or(&""))),
        op_type: Some(op.into()),
        ..Default::default()
    }
}

/// X → Mul(X, w) → Y, `w` a 2-float initializer; ir 8, opset 17.
fn small_model() -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
            ..Default::default()
        }],
        graph: Some(GraphProto {
            node: vec![node("Mul", &["X", "w"], &["Y"])],
            name: Some("g".into()),
            initializer: vec![tensor("w", &[2], &[0; 8])],
            input: vec![value("X")],
            output: vec![value("Y")],
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

fn graph_mut(m: &mut ModelProto) -> &mut GraphProto {
    m.graph.mut_or_insert_default()
}

/// Writes `m` as `model.onnx` in a new folder and opens it.
fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<OnnxModel, OnnxError>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, bytes).expect("writable");
    let res = OnnxModel::open(&path);
    (dir, res)
}

fn open_model(m: &ModelProto) -> (tempfile::TempDir, Result<OnnxModel, OnnxError>) {
    open_bytes(&m.write_to_bytes().expect("serializes"))
}

fn refused(m: &ModelProto) -> String {
    let (_dir, res) = open_model(m);
    let err = res.expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("model.onnx"), "names the file: {msg}");
    msg
}

#[test]
fn the_small_model_is_fine() {
    let (_dir, res) = open_model(&small_model());
    let model = res.expect("opens");
    assert_eq!(model.tensors().len(), 1);
}

#[test]
fn a_truncated_protobuf_is_refused() {
    let bytes = std::fs::read(fixture("rich.onnx")).expect("readable");
    for cut in [bytes.len() / 2, bytes.len() - 3] {
        let (_dir, res) = open_bytes(&bytes[..cut]);
        let err = res.expect_err("refused");
        assert!(matches!(err, OnnxError::Malformed { .. }), "{err}");
    }
}

#[test]
fn other_formats_are_told_apart() {
    for (file, onnx) in [
        ("onnx_io/rich.onnx", true),
        ("onnx_io/ext.onnx", true),
        ("timm_repvgg/train.safetensors", false),
        ("torch_state_dict_zip/train.pt", false),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(file);
        let Ok(bytes) = std::fs::read(&path) else {
            assert!(!onnx, "{file} missing");
            continue;
        };
        assert_eq!(
            looks_like_onnx(&bytes[..bytes.len().min(64)]),
            onnx,
            "{file}"
        );
    }
    let (_dir, res) = open_bytes(b"PK\x03\x04rest of a zip");
    assert!(matches!(res, Err(OnnxError::NotOnnx { .. })));
}

#[test]
fn raw_data_that_disagrees_with_the_shape_is_refused() {
    let mut m = small_model();
    graph_mut(&mut m).initializer[0] = tensor("w", &[3], &[0; 8]);
    let msg = refused(&m);
    assert!(
        msg.contains("tensor `w`")
            && msg.contains("raw_data holds 8 bytes")
            && msg.contains("needs 12"),
        "{msg}"
    );
    let mut m = small_model();
    let t = &mut graph_mut(&mut m).initializer[0];
    t.raw_data = None;
    t.float_data = vec![1.0];
    let msg = refused(&m);
    assert!(msg.contains("float_data holds 4 bytes"), "{msg}");
    let mut m = small_model();
    graph_mut(&mut m).initializer[0].dims = vec![-2];
    assert!(refused(&m).contains("negative dimension"));
}

#[test]
fn unsupported_versions_are_refused() {
    for ir in [3, 11] {
        let mut m = small_model();
        m.ir_version = Some(ir);
        assert!(refused(&m).contains(&format!(
            "IR version {ir} is not supported (supported: 6 to 10)"
        )));
    }
    for opset in [9, 22] {
        let mut m = small_model();
        m.opset_import[0].version = Some(opset);
        assert!(refused(&m).contains(&format!("opset {opset} of the default domain")));
    }
    let mut m = small_model();
    m.opset_import[0].domain = Some("com.microsoft".into());
    assert!(refused(&m).contains("no version of the default operator set"));
}

#[test]
fn a_graph_output_that_is_an_initializer_is_refused() {
    let mut m = small_model();
    graph_mut(&mut m).output.push(value("w"));
    let (_dir, res) = open_model(&m);
    assert!(matches!(res, Err(OnnxError::OutputIsInitializer { ref tensor, .. }) if tensor == "w"));
}

#[test]
fn a_cycle_or_nodes_out_of_order_are_refused() {
    let mut m = small_model();
    let g = graph_mut(&mut m);
    g.node = vec![node("Relu", &["a"], &["Y"]), node("Relu", &["X"], &["a"])];
    let msg = refused(&m);
    assert!(
        msg.contains("node `Relu_Y`") && msg.contains("input `a`"),
        "{msg}"
    );
    let mut m = small_model();
    graph_mut(&mut m).node.push(node("Relu", &["X"], &["Y"]));
    assert!(refused(&m).contains("output `Y` is already"));
    let mut m = small_model();
    graph_mut(&mut m)
        .node
        .insert(0, node("Constant", &[], &["c"]));
    assert!(refused(&m).contains("exactly one attribute"));
}

/// `small_model` with `w` in a side file `w.data` at `location`.
fn external_model(location: &str, offset: u64, length: Option<u64>) -> ModelProto {
    let mut m = small_model();
    let t = &mut graph_mut(&mut m).initializer[0];
    t.raw_data = None;
    t.data_location = Some(1);
    let entry = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
        ..Default::default()
    };
    t.external_data = vec![
        entry("location", location.into()),
        entry("offset", offset.to_string()),
    ];
    if let Some(l) = length {
        t.external_data.push(entry("length", l.to_string()));
    }
    m
}

/// Writes `m` and a side file `side` of `len` bytes in a new folder and opens the model.
fn open_external(
    m: &ModelProto,
    side: &str,
    len: usize,
) -> (tempfile::TempDir, Result<OnnxModel, OnnxError>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, m.write_to_bytes().expect("serializes")).expect("writable");
    std::fs::write(dir.path().join(side), vec![7u8; len]).expect("writable");
    let res = OnnxModel::open(&path);
    (dir, res)
}

#[test]
fn external_data_that_is_missing_or_short_is_refused() {
    let (_d, res) = open_external(&external_model("w.data", 4, Some(8)), "w.data", 12);
    let model = res.expect("12 bytes hold offset 4 + length 8");
    let w = model.tensor("w").expect("w");
    assert_eq!(model.tensor_bytes(w).expect("reads").as_ref(), [7u8; 8]);
    let (_d, res) = open_external(&external_model("w.data", 8, None), "w.data", 12);
    let err = res.expect_err("short");
    assert!(
        matches!(&err, OnnxError::SideFileShort { tensor, len: 12, offset: 8, length: 8, .. } if tensor == "w"),
        "{err}"
    );
    let (_d, res) = open_external(&external_model("other.data", 0, None), "w.data", 8);
    let err = res.expect_err("missing");
    assert!(
        matches!(&err, OnnxError::SideFileMissing { tensor, .. } if tensor == "w"),
        "{err}"
    );
    let (_d, res) = open_external(&external_model("w.data", 0, Some(12)), "w.data", 12);
    let err = res.expect_err("length disagrees with the shape");
    assert!(
        err.to_string()
            .contains("the external `length` holds 12 bytes"),
        "{err}"
    );
    // The missing side file of a fixture.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(fixture("ext.onnx"), dir.path().join("ext.onnx")).expect("copy");
    let err = OnnxModel::open(&dir.path().join("ext.onnx")).expect_err("missing");
    assert!(
        err.to_string().contains("tensor `W`") && err.to_string().contains("ext.onnx.data"),
        "{err}"
    );
}

#[test]
fn external_locations_that_leave_the_folder_are_refused() {
    for location in ["/etc/passwd", "../w.data", "sub/../../w.data"] {
        let (_d, res) = open_external(&external_model(location, 0, None), "w.data", 8);
        let err = res.expect_err("refused");
        assert!(
            matches!(&err, OnnxError::Location { tensor, location: l, .. } if tensor == "w" && l == location),
            "{location}: {err}"
        );
    }
}

#[test]
fn symlinks_may_not_lead_out_of_the_models_folder() {
    let root = tempfile::tempdir().expect("tempdir");
    let (inside, outside) = (root.path().join("model"), root.path().join("secret"));
    std::fs::create_dir_all(&inside).expect("mkdir");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::write(outside.join("key"), [1u8; 8]).expect("writable");
    std::fs::write(inside.join("real.data"), [2u8; 8]).expect("writable");
    std::os::unix::fs::symlink(outside.join("key"), inside.join("w.data")).expect("symlink");
    std::os::unix::fs::symlink(&outside, inside.join("dir")).expect("symlink");
    std::os::unix::fs::symlink(inside.join("real.data"), inside.join("ok.data")).expect("symlink");
    let path = inside.join("model.onnx");
    for (location, ok) in [("w.data", false), ("dir/key", false), ("ok.data", true)] {
        let m = external_model(location, 0, None);
        std::fs::write(&path, m.write_to_bytes().expect("serializes")).expect("writable");
        match OnnxModel::open(&path) {
            Ok(_) => assert!(ok, "{location} accepted"),
            Err(e) => {
                assert!(!ok, "{location}: {e}");
                assert!(e.to_string().contains("outside the model's folder"), "{e}");
            }
        }
    }
}

#[test]
fn external_placement_writes_a_side_file_only_when_something_goes_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("deploy.onnx");
    let summary = write_fused("conv_train", &out, DataPlacement::External);
    assert_eq!(summary.side_file, Some(dir.path().join("deploy.onnx.data")));
    assert_eq!(summary.side_bytes, 2304);
    let deploy = OnnxModel::open(&out).expect("reopens");
    assert!(deploy.has_external_data());
    // Nothing large and new, nothing external before: no side file.
    let same = dir.path().join("same.onnx");
    no_edit(&open("rich.onnx"), &same, DataPlacement::External);
    assert!(!dir.path().join("same.onnx.data").exists());
    assert_eq!(
        std::fs::read(&same).expect("written"),
        std::fs::read(fixture("rich.onnx")).expect("readable")
    );
}

mod corrupt {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any damage to a model's bytes is an error or a model that writes and reopens;
        /// never a panic.
        #[test]
        fn damaged_models_never_panic(
            file in prop::sample::select(vec!["rich.onnx", "ext.onnx", "conv_train.onnx"]),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = std::fs::read(fixture(file)).expect("readable");
            for (at, v) in flips {
                let i = at.index(bytes.len());
                bytes[i] = v;
            }
            bytes.truncate(cut.index(bytes.len() + 1).max(1));
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("model.onnx");
            std::fs::write(&path, &bytes).expect("writable");
            if file == "ext.onnx" {
                std::fs::copy(fixture("ext.onnx.data"), dir.path().join("ext.onnx.data")).expect("copy");
            }
            if let Ok(model) = OnnxModel::open(&path) {
                let _ = graph_view(&model);
                let out = dir.path().join("out.onnx");
                let mut fill = |_: usize, _: &mut dyn Write| Ok(());
                if write_graph(&model, &GraphEdit::default(), &out, DataPlacement::AsInput, &mut fill).is_ok() {
                    prop_assert!(OnnxModel::open(&out).is_ok());
                }
            }
        }
    }
}
