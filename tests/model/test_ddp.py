"""DDP smoke test: the model trains under DistributedDataParallel without find_unused_parameters."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.model.reference_vilbert import make_batch
from vilbert.model import ViLBERTConfig, ViLBERTForPretraining


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict, changes: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = ViLBERTConfig.from_name("tiny", **changes)
        model = torch.nn.parallel.DistributedDataParallel(ViLBERTForPretraining(cfg))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(3):
            loss = model(**make_batch(cfg, seed=10 * step + rank)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        w = model.module.bert.encoder.c_layer[0].biattention.query2.weight.detach().clone()
        out[rank] = (losses, w)
    finally:
        dist.destroy_process_group()


# Frozen text layers (official --freeze) and objective 2 (no alignment loss) leave parameters without a
# gradient: the model must mark them, or DDP fails without find_unused_parameters.
@pytest.mark.parametrize("changes", [{}, {"fixed_t_layer": 1}, {"objective": 2}], ids=["default", "freeze", "objective2"])
def test_ddp_without_find_unused_parameters(changes):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), out, changes), nprocs=2, join=True)
        result = dict(out)
    assert set(result) == {0, 1}
    # Same weights on both ranks after the all-reduced steps, different data per rank.
    torch.testing.assert_close(result[0][1], result[1][1])
    assert result[0][0] != result[1][0]
