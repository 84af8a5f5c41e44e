#!/usr/bin/env python3
"""Write RepVGG-B3 as ONNX for the issue-17 benchmark: train form and timm's own deploy form.

    /work/venv/py/bin/python bench/make_b3_train_onnx.py OUTDIR [--external-data] [--seed N] [--model repvgg_b3]

Builds timm `repvgg_b3` (pretrained=False, random init), gives every BatchNorm random statistics and affine
parameters exactly as bench/make_b3.py does (same seed => the same weights as its safetensors file), puts it
in eval mode and exports with the TorchScript exporter (dynamo=False, opset 17, do_constant_folding=True,
input "input" 1x3x224x224, output "output"):

  OUTDIR/train.onnx    the train-form graph (~490 MB, weights inline unless --external-data)
  OUTDIR/deploy.onnx   the same weights after timm.utils.reparameterize_model, same exporter settings

With --external-data the weights go to train.onnx.data / deploy.onnx.data (one file each,
size_threshold=0). Same seed + the pinned versions of fixtures/requirements-onnx.txt => the same bytes.

    /work/venv/py/bin/python bench/make_b3_train_onnx.py OUTDIR --load-save

does not export: it times the Python baseline of issue 17's benchmark on OUTDIR/train.onnx, i.e.
`onnx.load` + `onnx.save` to OUTDIR/resaved.onnx (then removed), and prints seconds and peak RSS
(ru_maxrss of this process, which includes the ~0.3 GB of the interpreter with onnx imported).

    /work/venv/py/bin/python bench/make_b3_train_onnx.py OUTDIR --f16

does not export either: it converts OUTDIR/train.onnx to OUTDIR/train_f16.onnx with onnxconverter-common
`convert_float_to_float16(keep_io_types=True)` (f16 weights and arithmetic, f32 input and output), the graph
bench/onnx.sh times `--verify` on for f16.
"""
import argparse
import io
import os
import sys
import time
from pathlib import Path

import onnx
import timm
import torch
from timm.utils.model import reparameterize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_b3 import randomize_bn  # noqa: E402  (one model for both benchmarks)


def export(model, path, external):
    x = torch.zeros(1, 3, 224, 224)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, do_constant_folding=True,
                      input_names=["input"], output_names=["output"])
    g = onnx.load_from_string(buf.getvalue())
    del buf
    tmp = path.with_name(path.name + ".tmp")
    if external:
        data = path.name + ".data"
        # the data file name is fixed by `location`, so write it in place; the graph goes via a temp name
        onnx.save_model(g, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                        size_threshold=0)
    else:
        onnx.save_model(g, str(tmp))
    os.replace(tmp, path)
    return path.stat().st_size + ((path.parent / (path.name + ".data")).stat().st_size if external else 0)


def load_save(out):
    import resource
    src, dst = out / "train.onnx", out / "resaved.onnx"
    t0 = time.perf_counter()
    g = onnx.load(str(src))
    t1 = time.perf_counter()
    onnx.save_model(g, str(dst))
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = src.stat().st_size
    dst.unlink()
    print(f"onnx.load {t1 - t0:.2f} s + onnx.save {t2 - t1:.2f} s = {t2 - t0:.2f} s for {size / 1e6:.1f} MB; "
          f"peak RSS {peak / 1e6:.0f} MB = {peak / size:.2f}x the file")
    return 0


def to_f16(out):
    import warnings
    warnings.filterwarnings("ignore")  # one line per weight it clamps to +-1e-7
    from onnxconverter_common import float16
    m16 = float16.convert_float_to_float16(onnx.load(str(out / "train.onnx")), keep_io_types=True)
    onnx.save(m16, str(out / "train_f16.onnx"))
    print(f"train_f16.onnx {(out / 'train_f16.onnx').stat().st_size / 1e6:.1f} MB", file=sys.stderr)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="repvgg_b3")
    ap.add_argument("--external-data", action="store_true")
    ap.add_argument("--load-save", action="store_true", help="time onnx.load + onnx.save of OUTDIR/train.onnx")
    ap.add_argument("--f16", action="store_true", help="convert OUTDIR/train.onnx to OUTDIR/train_f16.onnx")
    a = ap.parse_args()
    if a.load_save:
        return load_save(Path(a.outdir))
    if a.f16:
        return to_f16(Path(a.outdir))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    model = timm.create_model(a.model, pretrained=False).eval()
    n_bn = randomize_bn(model, a.seed)
    n_train = export(model, out / "train.onnx", a.external_data)
    deploy = reparameterize_model(model).eval()
    n_deploy = export(deploy, out / "deploy.onnx", a.external_data)
    print(f"{a.model}: {n_bn} BatchNorms randomised; train.onnx {n_train / 1e6:.1f} MB, deploy.onnx "
          f"{n_deploy / 1e6:.1f} MB{' (+ .data)' if a.external_data else ''} in {out} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
