#!/usr/bin/env python3
"""Baseline: PyTorch's own per-block check of a RepVGG-B3 train checkpoint.

    python bench/pytorch_verify.py IN.safetensors [--input-size 16x16] [--seed 0]

For every timm RepVggBlock: deep-copy it, fuse the copy with timm's own `reparameterize()`, run the
unfused block and the fused copy on the same seeded random input of shape (1, C_in, H, W), and
compare outputs: max abs diff and relative diff = max|fused - unfused| / max|unfused|. (The block
applies its activation after the branch sum; that is the same for both, fine for a baseline.)
Prints per-block figures on stderr and the worst deviation on stdout.
"""
import argparse
import copy
import sys
import time

T0 = time.perf_counter()
import torch  # noqa: E402
import timm  # noqa: E402
from timm.models.byobnet import RepVggBlock  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def parse_hw(s: str):
    try:
        h, w = (int(p) for p in s.lower().split("x"))
        assert h > 0 and w > 0
        return h, w
    except Exception:
        raise argparse.ArgumentTypeError(f"expected HxW, got {s!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("--input-size", type=parse_hw, default=(16, 16))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no per-block lines")
    args = ap.parse_args()
    h, w = args.input_size

    model = timm.create_model("repvgg_b3", pretrained=False)
    model.load_state_dict(load_file(args.input), strict=True)
    model.eval()

    g = torch.Generator().manual_seed(args.seed)
    worst_abs = (0.0, None)
    worst_rel = (0.0, None)
    n = 0
    with torch.no_grad():
        for name, blk in model.named_modules():
            if not isinstance(blk, RepVggBlock):
                continue
            fused = copy.deepcopy(blk)
            fused.reparameterize()
            x = torch.randn(1, blk.conv_kxk.conv.in_channels, h, w, generator=g)
            ref = blk(x.clone())  # act may be inplace: give each its own input
            out = fused(x.clone())
            d = (out - ref).abs().max().item()
            r = d / max(ref.abs().max().item(), 1e-30)
            if d > worst_abs[0] or worst_abs[1] is None:
                worst_abs = (d, name)
            if r > worst_rel[0] or worst_rel[1] is None:
                worst_rel = (r, name)
            if not args.quiet:
                print(f"{name}: max_abs {d:.3e} max_rel {r:.3e}", file=sys.stderr)
            n += 1
            del fused

    if n == 0:
        print("error: no RepVggBlock found", file=sys.stderr)
        return 2
    print(f"{n} blocks checked at {h}x{w}; worst max_abs {worst_abs[0]:.3e} ({worst_abs[1]}), "
          f"worst max_rel {worst_rel[0]:.3e} ({worst_rel[1]}); "
          f"{time.perf_counter() - T0:.2f}s in process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
