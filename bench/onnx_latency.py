#!/usr/bin/env python3
"""onnxruntime latency of train-form vs deploy-form ONNX graphs: the payoff of re-parameterization.

    /work/venv/py/bin/python bench/onnx_latency.py [--models repvgg_a0,dbb] [--runs 20] [--workdir DIR]
                                                   [--ours DIR] [--levels disable_all,default]

For each model: random init (timm, pretrained=False), every BN given random statistics and affine
parameters (fixtures/make_fixtures.randomize), eval; exported with the TorchScript exporter (dynamo=False,
opset 17, do_constant_folding=True, batch 1 at the model's natural input size) as WORKDIR/<model>.train.onnx
and, after the framework's own conversion (timm.utils.reparameterize_model; DBB: switch_to_deploy), as
WORKDIR/<model>.deploy.onnx. Both are timed with onnxruntime's CPU EP, intra/inter_op_num_threads=1, at
graph_optimization_level ORT_DISABLE_ALL ("disable_all") and at onnxruntime's default (ORT_ENABLE_ALL):
median wall time of --runs runs after --warmup runs, same random input for all graphs.

--ours DIR also times DIR/<model>.onnx (the deploy graph our tool wrote from WORKDIR/<model>.train.onnx)
and prints ours/train beside deploy/train, so the same script measures our output.

The machine is shared: read the ratio more than the milliseconds.
"""
import argparse
import copy
import io
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))

MODELS = {   # name -> input size (natural size of the timm model)
    "repvgg_a0": 224, "mobileone_s0": 224, "fastvit_t8": 256, "ghostnetv3_100": 224, "lcnetv2_small": 224,
    "repvit_m0_9": 224, "dbb": 224,
}
DEFAULT = "repvgg_a0,mobileone_s0,fastvit_t8,ghostnetv3_100,lcnetv2_small,dbb"

# A small DBB network (the official DiverseBranchBlock re-implemented in fixtures/make_family_fixtures.py):
# five blocks, three stride-2, ReLU between.
DBB_SPECS = [dict(in_channels=3, out_channels=32, kernel_size=3, stride=2, padding=1),
             dict(in_channels=32, out_channels=64, kernel_size=3, stride=2, padding=1),
             dict(in_channels=64, out_channels=64, kernel_size=3, stride=1, padding=1),
             dict(in_channels=64, out_channels=128, kernel_size=3, stride=2, padding=1),
             dict(in_channels=128, out_channels=128, kernel_size=3, stride=1, padding=1)]


def build(name, seed=0):
    """(train model, deploy model), both eval."""
    import make_fixtures as mf
    torch.manual_seed(seed)
    if name == "dbb":
        import make_family_fixtures as fam
        m = fam.BlockNet(DBB_SPECS, fam.DiverseBranchBlock, False)
        mf.randomize(m, seed)
        m.eval()
        d = copy.deepcopy(m)
        for b in d.blocks:
            b.switch_to_deploy()
        return m, d.eval()
    import timm
    from timm.utils.model import reparameterize_model
    m = timm.create_model(name, pretrained=False)
    mf.randomize(m, seed)
    m.eval()
    return m, reparameterize_model(m).eval()


def export(model, x, path):
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, do_constant_folding=True,
                      input_names=["input"], output_names=["output"])
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(onnx.load_from_string(buf.getvalue()), str(tmp))
    os.replace(tmp, path)


def session(path, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if level == "disable_all"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def median_ms(path, level, x, warmup, runs):
    s = session(path, level)
    feed = {s.get_inputs()[0].name: x}
    for _ in range(warmup):
        s.run(None, feed)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feed)
        t.append(time.perf_counter() - t0)
    return statistics.median(t) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT, help=f"comma-separated, from {list(MODELS)}")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/onnx_latency")
    ap.add_argument("--ours", help="DIR with <model>.onnx written by our tool from WORKDIR/<model>.train.onnx")
    ap.add_argument("--levels", default="disable_all,default")
    ap.add_argument("--reexport", action="store_true", help="export again even if the graphs exist")
    a = ap.parse_args()
    if a.runs < 10:
        sys.exit("--runs must be >= 10")
    torch.set_num_threads(1)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    levels = a.levels.split(",")
    names = a.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; known: {list(MODELS)}")
    print(f"onnxruntime {ort.__version__}, CPU EP, 1 thread, median of {a.runs} runs after {a.warmup} warmup\n")
    head = "| model | input | ORT level | train ms | deploy ms | deploy/train |"
    sep = "|---|---|---|---:|---:|---:|"
    if a.ours:
        head += " ours ms | ours/train |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for name in names:
        hw = MODELS[name]
        tp, dp = work / f"{name}.train.onnx", work / f"{name}.deploy.onnx"
        x = np.random.default_rng(0).standard_normal((1, 3, hw, hw)).astype(np.float32)
        if a.reexport or not (tp.exists() and dp.exists()):
            m, d = build(name)
            export(m, torch.from_numpy(x), tp)
            export(d, torch.from_numpy(x), dp)
        for level in levels:
            t = median_ms(tp, level, x, a.warmup, a.runs)
            d = median_ms(dp, level, x, a.warmup, a.runs)
            row = f"| {name} | {hw}x{hw} | {level} | {t:.2f} | {d:.2f} | {d / t:.2f}x |"
            if a.ours:
                op = Path(a.ours) / f"{name}.onnx"
                if op.exists():
                    o = median_ms(op, level, x, a.warmup, a.runs)
                    row += f" {o:.2f} | {o / t:.2f}x |"
                else:
                    row += " missing | |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
