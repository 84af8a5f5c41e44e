#!/usr/bin/env python3
"""Baseline: what a user does today to get a deploy RepVGG-B3 with PyTorch + timm.

    python bench/pytorch_convert.py IN.safetensors OUT.safetensors

create timm repvgg_b3 -> load_state_dict(strict=True) -> eval -> timm.utils.model.reparameterize_model
-> save the deploy state_dict as safetensors. Wall time / peak RSS are measured from outside the
process (bench/run.sh uses /usr/bin/time); the in-process phase timings printed on stderr are
informational only.
"""
import sys
import time

T0 = time.perf_counter()
import torch  # noqa: E402
import timm  # noqa: E402
from timm.utils.model import reparameterize_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = sys.argv[1], sys.argv[2]
    t = {"import": time.perf_counter() - T0}

    s = time.perf_counter()
    sd = load_file(src)
    t["load"] = time.perf_counter() - s

    s = time.perf_counter()
    model = timm.create_model("repvgg_b3", pretrained=False)
    t["build"] = time.perf_counter() - s

    s = time.perf_counter()
    model.load_state_dict(sd, strict=True)
    model.eval()
    del sd
    t["load_state_dict"] = time.perf_counter() - s

    s = time.perf_counter()
    deploy = reparameterize_model(model)  # default inplace=False (deep copy), as users call it
    t["reparameterize"] = time.perf_counter() - s

    s = time.perf_counter()
    out = {k: v.detach().contiguous() for k, v in deploy.state_dict().items()}
    save_file(out, dst, metadata={"format": "pt"})
    t["save"] = time.perf_counter() - s

    t["total_in_process"] = time.perf_counter() - T0
    print("pytorch_convert: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items())
          + f"; {len(out)} tensors written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
