"""PyTorch Lightning on 2 CPU processes, BatchNorm synced by bnpass's Lightning plugin.

Run (Lightning starts the second process itself; `pip install lightning`):

    python examples/lightning_demo.py            # Trainer(plugins=[bnpass.lightning.SyncBatchNorm()])
    python examples/lightning_demo.py --compile  # trainer.fit(torch.compile(module, backend="bnpass"))

Each rank sees differently distributed synthetic images (rank r's are shifted by 2*r). With bnpass
every rank normalizes with the statistics of the global batch, so after `fit` the running
statistics are identical on both ranks and sit between the ranks' own means; Lightning's
`Trainer(sync_batchnorm=True)` would raise on the CPU ("SyncBatchNorm layers only work with GPU
modules").
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

import bnpass


from train_demo import SmallConvNet  # noqa: E402 - the main demo's model (this folder is on sys.path)


class ShiftedImages(torch.utils.data.Dataset):
    """Synthetic images; each rank's are shifted by 2 * its rank (read when the loader starts)."""

    def __init__(self, size: int = 64):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        rank = dist.get_rank() if dist.is_initialized() else 0
        return torch.randn(3, 16, 16, generator=g) + 2.0 * rank, torch.randint(0, 10, (), generator=g)


def main() -> None:
    import lightning.pytorch as pl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="per-rank batch size")
    parser.add_argument("--compile", action="store_true",
                        help="compile the module yourself instead of the plugin")
    args = parser.parse_args()
    bnpass.register()  # a source-tree run (an installed bnpass registers itself)
    torch.set_num_threads(1)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = SmallConvNet()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            images, labels = batch
            return F.cross_entropy(self(images), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    plugins = [] if args.compile else [bnpass.lightning.SyncBatchNorm()]
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=args.steps,
                         plugins=plugins, enable_checkpointing=False, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    # a sampler per rank: DistributedSampler (Lightning's default) splits the indices
    loader = torch.utils.data.DataLoader(ShiftedImages(), batch_size=args.batch)
    trainer.fit(torch.compile(module, backend="bnpass") if args.compile else module, loader)

    rank = dist.get_rank()
    records = bnpass.compile_records()
    mean = module.net.bn1.running_mean.clone()
    gathered = [torch.empty_like(mean) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mean)
    if rank == 0:
        for site in records[0].sites:
            print(f"  site {site.index}  {site.name.split('.')[-1]}  {site.op}: {site.action} ({site.reason})")
        fwd = sum(r.collectives["forward"] for r in records)
        bwd = sum(r.collectives["backward"] for r in records)
        print(f"  collectives per step: forward {fwd}, backward {bwd}")
        diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
        print(f"steps trained: {trainer.global_step}; bn1.running_mean[:4] on rank 0: "
              f"{[round(v, 4) for v in gathered[0][:4].tolist()]}")
        print(f"largest difference of bn1's running statistics between ranks: {diff:.1e} "
              f"({'identical: synced' if diff == 0 else 'NOT synced'})")


if __name__ == "__main__":
    main()
