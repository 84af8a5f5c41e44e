#!/usr/bin/env python3
"""Export a RepVGG-B3 train graph and its deploy graph to ONNX, for timing whole-graph runs.

    /work/venv/py/bin/python bench/make_b3_onnx.py OUT_DIR [--seed N] [--model repvgg_b3]

Writes OUT_DIR/train.onnx (timm `repvgg_b3`, pretrained=False, every BatchNorm given random
non-trivial statistics as in bench/make_b3.py) and OUT_DIR/deploy.onnx (the same weights after
`timm.utils.reparameterize_model`), both with `torch.onnx.export(dynamo=False, opset_version=17)`
at 1x3x224x224, weights inline, input `x`, output `y`; OUT_DIR/deploy_f16.onnx, the deploy graph
through onnxconverter-common `convert_float_to_float16(keep_io_types=True)` (which clamps
weights below 1e-7 in magnitude to ±1e-7, it warns). Also OUT_DIR/input.npy (seeded standard
normal input) and prints onnxruntime's max |train - deploy| on it.
"""
import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import numpy as np
import onnxruntime as ort
import timm
import torch
from timm.utils import reparameterize_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_b3 import randomize_bn  # noqa: E402  (the same statistics as the other benchmarks)


def export(model, x, path):
    t0 = time.perf_counter()
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="repvgg_b3")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    randomize_bn(model, args.seed)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed + 2))
    np.save(os.path.join(args.out_dir, "input.npy"), x.numpy())
    train = os.path.join(args.out_dir, "train.onnx")
    deploy = os.path.join(args.out_dir, "deploy.onnx")
    with torch.no_grad():
        export(model, x, train)
        export(reparameterize_model(model), x, deploy)
    import onnx
    from onnxconverter_common import float16
    t0 = time.perf_counter()
    m16 = float16.convert_float_to_float16(onnx.load(deploy), keep_io_types=True)
    onnx.save(m16, os.path.join(args.out_dir, "deploy_f16.onnx"))
    print(f"deploy_f16.onnx in {time.perf_counter() - t0:.1f} s")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
         for p in (train, deploy)]
    print(f"onnxruntime max|train-deploy| = {np.abs(y[0] - y[1]).max():.3e}, max|train| = {np.abs(y[0]).max():.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
