#!/usr/bin/env python3
"""Write a deterministic train-form checkpoint of a large re-parameterizable timm model.

    python bench/make_family.py OUT.safetensors [--model fastvit_ma36] [--seed N]

Builds the timm model (pretrained=False, no network), eval mode, gives every BatchNorm
non-trivial random statistics and every layer scale a non-trivial value, and saves the
train-form state_dict as safetensors. For bench/family.sh (convert time vs `cp`).
"""
import argparse
import sys

import timm
import torch
from safetensors.torch import save_file


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--model", default="fastvit_ma36")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(1000)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, args.out)
    n = sum(v.numel() for v in sd.values())
    print(f"{args.model}: {len(sd)} tensors, {n / 1e6:.1f} M elements -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
