"""Activation memory a training step keeps for its backward, per provider, without a GPU.

A training forward of the model runs under FakeTensorMode (shapes, dtypes and strides only: no
memory, no kernels) inside ``saved_tensors_hooks``, which see every tensor autograd saves for
the backward, the fused ops' included (the fake path goes through their torch.library custom
ops, whose autograd saves what the eager fast path saves). The bytes of the distinct storages
saved are the activation memory held at the start of the backward: most of a training step's
peak, which adds parameters, gradients, optimizer state and transient workspace. Each storage
is put down to the innermost module running when it was first saved, so the table says which
layers hold the memory.

Providers: ``eager`` (the reference model) and ``backend:<b>[:no-<op>...]`` as in
``coatnet-fast bench``. Autocast runs in fp16 (2 bytes, as bf16; the Triton backend refuses
bf16 on the CPU interpreter, where its tl.dot is wrong, and fake tensors check that too).

    TRITON_INTERPRET=1 PYTHONPATH=. python bench/bench_saved_memory.py --out bench/results/saved_memory_fake.json
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from _common import environment, write_json  # noqa: E402

from coatnet_fast import benchmark  # noqa: E402

# backend:triton leaves the BatchNorm + GELU blocks unfused in training (ConvBN.fused_in_training),
# as backend:triton:no-batch_norm_act does; train-batch_norm_act shows what fusing them keeps.
DEFAULT_PROVIDERS = ("eager,backend:triton:no-dwconv_bn_gelu:no-batch_norm_act,"
                     "backend:triton:no-batch_norm_act:no-se-gate,backend:triton,"
                     "backend:triton:no-se-gate:train-batch_norm_act,backend:triton:train-batch_norm_act")


def saved_activation_bytes(provider: str, model: str, batch: int, image_size: int, channels_last: bool) -> dict:
    """Bytes of the storages a training forward saves for the backward, in total and by module."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    net, ops = benchmark.build(provider, model, {"image_size": image_size, "smoke": False})
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format).train()
    running = ["(outside any module)"]

    def enter(name):
        return lambda module, args: running.append(name)  # returns None: the input stays

    def leave(module, args, output):
        running.pop()

    handles = []
    for name, module in net.named_modules():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    storages = {}
    by_type = defaultdict(int)
    classes = {name: type(m).__name__ for name, m in net.named_modules()}

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in storages:
            storages[key] = storage.nbytes()
            by_type[classes.get(running[-1], running[-1])] += storage.nbytes()
        return t

    try:
        # Parameters stay real tensors: their fp16 autocast copies are what gets saved, and fake.
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.randn(batch, 3, image_size, image_size).to(memory_format=memory_format)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cpu", dtype=torch.float16):
                    net(x)
    finally:
        for h in handles:
            h.remove()
    return {"provider": provider, "ops": ops, "saved_bytes": sum(storages.values()),
            "saved_gib": sum(storages.values()) / 2**30,
            "by_module_type_gib": {k: v / 2**30 for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="coatnet_0")
    p.add_argument("--providers", default=DEFAULT_PROVIDERS)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--out", help="JSON path (default: bench/results/saved_memory_fake.json)")
    args = p.parse_args(argv)
    out_path = Path(args.out or Path(__file__).parent / "results" / "saved_memory_fake.json")
    payload = {"benchmark": "saved_memory", "env": environment(), "method": "FakeTensorMode + saved_tensors_hooks",
               "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
               "config": {k: v for k, v in vars(args).items() if k != "out"}, "results": []}
    failed = False
    for model in args.models.split(","):
        baseline = None
        for provider in args.providers.split(","):
            try:
                row = saved_activation_bytes(provider, model, args.batch, args.image_size, args.channels_last)
            except Exception as e:  # a provider that cannot run here is recorded, and the exit code says so
                failed = True
                row = {"provider": provider, "error": f"{type(e).__name__}: {e}"[:400]}
            row["model"] = model
            if provider == "eager" and "saved_bytes" in row:
                baseline = row["saved_bytes"]
            if baseline and "saved_bytes" in row:
                row["fraction_of_eager"] = row["saved_bytes"] / baseline
            payload["results"].append(row)
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(row.get("by_module_type_gib", {}).items())[:4])
            print(f"{model} {provider:55s} {row.get('saved_gib', float('nan')):6.2f} GiB "
                  f"({row.get('fraction_of_eager', float('nan')):.2f} of eager)  {row.get('error', top)}", flush=True)
    write_json(out_path, payload)
    print(f"wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
