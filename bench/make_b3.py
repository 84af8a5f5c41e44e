#!/usr/bin/env python3
"""Write a deterministic RepVGG-B3 *train-form* checkpoint for benchmarking.

    python bench/make_b3.py OUT.safetensors [--seed N] [--model repvgg_b3]
    python bench/make_b3.py OUT.pth --pth     # the same state dict written by torch.save

Builds timm `repvgg_b3` (pretrained=False, no network), puts it in eval mode, gives every
BatchNorm non-trivial random statistics (gamma, beta, running_mean, running_var,
num_batches_tracked), and saves the train-form state_dict as safetensors (~493 MB f32).
Same seed + same pinned torch/timm => byte-identical file.
"""
import argparse
import os
import sys
import time

import torch
import timm
from safetensors.torch import save_file


def randomize_bn(model, seed):
    """Sets every BatchNorm2d's statistics and affine parameters from `seed`; returns how many.
    bench/make_b3_train_onnx.py uses it too, so both benchmarks convert one model."""
    g = torch.Generator().manual_seed(seed + 1)
    n_bn = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                # gamma in [0.25, 1.5) with ~10% negative signs, beta ~ N(0, 0.2)
                sign = torch.where(torch.rand(c, generator=g) < 0.1, -1.0, 1.0)
                m.weight.copy_(sign * (0.25 + 1.25 * torch.rand(c, generator=g)))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                # variances spread over ~2 decades: [0.05, 5)
                m.running_var.copy_(torch.exp(torch.empty(c).uniform_(-3.0, 1.6, generator=g)))
                m.num_batches_tracked.fill_(1000 + n_bn)
                n_bn += 1
    return n_bn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="repvgg_b3", help="timm repvgg_* model name (default repvgg_b3)")
    ap.add_argument("--pth", action="store_true",
                    help="write the state dict with torch.save (zip format) instead of safetensors")
    args = ap.parse_args()

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False)
    model.eval()

    n_bn = randomize_bn(model, args.seed)

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = args.out + ".tmp"
    if args.pth:
        torch.save(sd, tmp)
    else:
        save_file(sd, tmp, metadata={"format": "pt", "source": f"bench/make_b3.py seed={args.seed}"})
    os.replace(tmp, args.out)
    n_params = sum(v.numel() for v in sd.values() if v.is_floating_point())
    print(
        f"wrote {args.out}: {len(sd)} tensors, {n_params} float params, {n_bn} BNs, "
        f"{os.path.getsize(args.out) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
