"""Two-rank CPU training demo: torch.compile(model, backend="bnpass") syncs BatchNorm statistics.

Run (2 gloo ranks on this machine):

    torchrun --nproc-per-node 2 examples/train_demo.py

Each rank sees differently distributed synthetic data (rank r's images are shifted by 2*r), as ranks
of a real job see different images. With bnpass every rank normalizes with the statistics of the
global batch, so the running statistics stay identical on all ranks and equal those of the global
batch; a stock compile would give each rank its own.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bnpass


class SmallConvNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def batch(rank: int, step: int, size: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    images = torch.randn(size, 3, 16, 16, generator=g) + 2.0 * rank
    labels = torch.randint(0, 10, (size,), generator=g)
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="per-rank batch size")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = SmallConvNet()
    ddp = nn.parallel.DistributedDataParallel(model)
    compiled = torch.compile(ddp, backend="bnpass")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    for step in range(args.steps):
        start = time.perf_counter()
        images, labels = batch(rank, step, args.batch)
        loss = F.cross_entropy(compiled(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.2f} s"
                  f"{', includes compiling' if step == 0 else ''})", flush=True)

    # What bnpass did, from its own record.
    if rank == 0:
        for record in bnpass.compile_records():
            for site in record.sites:
                print(f"  site {site.index} {site.name:>5} {site.op}: {site.action} ({site.reason})")
            print(f"  collectives per step: forward {record.collectives['forward']}, "
                  f"backward {record.collectives['backward']}")

    # Synced statistics: identical on every rank, though each rank's own data differ.
    stats = torch.cat([model.bn1.running_mean, model.bn1.running_var])
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        fmt = lambda t: " ".join(f"{float(v):+.3f}" for v in t[:4])  # noqa: E731
        with torch.no_grad():
            inputs = [model.conv1(batch(r, 0, args.batch)[0]) for r in range(world)]
        for r, inp in enumerate(inputs):
            print(f"bn1 input mean (conv1 as trained), rank {r}'s data of step 0: {fmt(inp.mean((0, 2, 3)))}")
        print(f"bn1 input mean (conv1 as trained), global batch of step 0:  {fmt(torch.cat(inputs).mean((0, 2, 3)))}")
        for r, g in enumerate(gathered):
            print(f"bn1.running_mean after {args.steps} steps, rank {r}:                 {fmt(g)}")
        spread = max(float((g - gathered[0]).abs().max()) for g in gathered)
        print(f"largest difference of bn1's running statistics between ranks: {spread:.1e}"
              f" ({'identical: synced' if spread == 0 else 'NOT synced'})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
