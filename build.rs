//! Generates the Rust types of `src/onnx/onnx_subset.proto` with rust-protobuf's own parser
//! (pure Rust: no `protoc` binary needed) into `$OUT_DIR/onnx_proto/`.

fn main() {
    let customize = protobuf_codegen::Customize::default()
        // `bytes` fields become `bytes::Bytes`: parsing a file held in one `Bytes` buffer
        // leaves every `raw_data` a slice of it, not a copy.
        .tokio_bytes(true)
        // No reflection or descriptors: we only parse, compare and write.
        .lite_runtime(true)
        .gen_mod_rs(true);
    protobuf_codegen::Codegen::new()
        .pure()
        .include("src/onnx")
        .input("src/onnx/onnx_subset.proto")
        .customize(customize)
        .cargo_out_dir("onnx_proto")
        .run_from_script();
    println!("cargo:rerun-if-changed=src/onnx/onnx_subset.proto");
}
