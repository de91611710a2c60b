"""What splitting a convolution backward costs on the CPU: for each convolution of resnet18 (64x64,
batch 8), ``aten.convolution_backward`` computing the input and weight gradients in one call, against
one call for each (what bnpass's schedule does where a collective is in flight meanwhile:
bnpass/schedule.py, backends/inductor.py ``split_conv_backwards``). One process, 1 thread, the two
forms interleaved per repetition; sum over the model's 20 convolutions, median of the repetitions.

    python benchmarks/conv_backward_split.py [--reps 20] [--batch 8] [--size 64] [--channels-last]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

aten = torch.ops.aten


def conv_cases(batch: int, size: int, channels_last: bool) -> list[tuple]:
    """(grad_output, input, weight, stride, padding) of every Conv2d of resnet18 on one batch."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    cases = []

    def hook(module, args, out):
        cases.append((torch.randn_like(out), args[0].detach(), module.weight.detach(), module.stride,
                      module.padding))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
    return cases


def backward(case, mask):
    grad, x, w, stride, padding = case
    return aten.convolution_backward(grad, x, w, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
                                     mask)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = conv_cases(args.batch, args.size, args.channels_last)
    forms = {"whole": lambda c: backward(c, [True, True, False]),
             "split": lambda c: (backward(c, [True, False, False]), backward(c, [False, True, False]))}
    for form in forms.values():  # warm up oneDNN's primitive cache
        for case in cases:
            form(case)
    times = {name: [] for name in forms}
    per_conv = {name: [[] for _ in cases] for name in forms}
    for _ in range(args.reps):
        for name, form in forms.items():
            total = 0.0
            for i, case in enumerate(cases):
                start = time.perf_counter()
                form(case)
                took = time.perf_counter() - start
                per_conv[name][i].append(took)
                total += took
            times[name].append(total * 1e3)
    whole, split = statistics.median(times["whole"]), statistics.median(times["split"])
    print(f"resnet18 {args.size}x{args.size} batch {args.batch}{' channels_last' if args.channels_last else ''}, "
          f"{len(cases)} convolutions, 1 thread, median of {args.reps}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    print(f"convolution backwards per step: whole {whole:.1f} ms, split {split:.1f} ms "
          f"(split / whole {split / whole:.3f}, +{split - whole:.1f} ms)")
    print("per convolution (input shape, weight shape: whole / split ms): " + "; ".join(
        f"{tuple(c[1].shape)} {tuple(c[2].shape)}: {statistics.median(per_conv['whole'][i]) * 1e3:.2f} / "
        f"{statistics.median(per_conv['split'][i]) * 1e3:.2f}" for i, c in enumerate(cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
