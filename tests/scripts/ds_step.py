"""One DeepSpeed training step on a fixed batch; each rank takes its slice. Run alone or under torchrun.

Writes the updated weights to argv[1] (rank 0) so a test can compare them with a plain PyTorch step.
"""
import sys

import torch
from torch import nn

from bench.engine import build_engine, world
from methods.base import BaseConfig


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)


if __name__ == "__main__":
    out, stage = sys.argv[1], int(sys.argv[2])
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = BaseConfig(batch_size=8, zero_stage=stage)
    engine = build_engine(model, opt, cfg)
    rank, n = world()
    x, y = batch()
    per = len(x) // n
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    loss = nn.functional.cross_entropy(engine(xs), ys)
    engine.backward(loss)
    engine.step()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, out)
