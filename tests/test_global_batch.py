"""Data-parallel extraction computes the single-process loss: each rank's slice of the global batch is
gathered (distributed.extract.gather_global_batch) before the contrastive and distillation losses, and
the ranks' mean gradient (what DeepSpeed applies) equals one process's gradient on the whole batch.
Two gloo processes, no Ray, tiny tensors."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from mmlg_ray.distributed.extract import gather_global_batch
from mmlg_ray.method.train import extraction_step

N, D, E = 12, 6, 4  # global batch, input width, embedding width


class Tiny(nn.Module):
    """Stands in for the auxiliary CLIP / the teacher: (images, tokens) -> (image emb, text emb, scale)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.img, self.txt = nn.Linear(D, E), nn.Embedding(20, E)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images, tokens, shapes=None):
        return (F.normalize(self.img(images), dim=-1), F.normalize(self.txt(tokens).mean(1), dim=-1), self.scale.exp())


def batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 20, (N, 5), generator=g)
    tokens[5] = tokens[2]  # two identical captions: both count as positives across the ranks too
    return torch.randn(N, D, generator=g), tokens


def grads(model, loss):
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _rank(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        student, teacher = Tiny(0), Tiny(1)
        images, tokens = batch()
        part = slice(rank * N // world, (rank + 1) * N // world)
        step = extraction_step(student, teacher, 1.0, 2.0, 0.5, gather=gather_global_batch)
        loss, _ = step((images[part], tokens[part], None))
        g = grads(student, loss)
        for v in g.values():  # DeepSpeed's data-parallel mean
            dist.all_reduce(v)
            v /= world
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": g}, out)
    finally:
        dist.destroy_process_group()


def test_ranks_compute_the_single_process_loss_and_gradient(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out)

    student, teacher = Tiny(0), Tiny(1)
    images, tokens = batch()
    loss, _ = extraction_step(student, teacher, 1.0, 2.0, 0.5)((images, tokens, None))
    want = grads(student, loss)
    assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
    for k in want:
        assert torch.allclose(got["grads"][k], want[k], atol=1e-6), k

    # without the gather, each rank's loss sees only its own half: a different loss
    student = Tiny(0)
    half, _ = extraction_step(student, teacher, 1.0, 2.0, 0.5)((images[: N // 2], tokens[: N // 2], None))
    assert abs(float(half.detach()) - float(loss.detach())) > 1e-3
