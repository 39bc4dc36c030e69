"""The harness with ``class_parallel``: two gloo ranks (DDP network, sharded proxies) train as one
process does, and their checkpoint loads into the replicated, single-process loss."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from training import config, distributed
from training.engine import Run

_WORKER = """
import json, sys, torch
from pathlib import Path
from torch.utils.data import default_collate
from training import config, distributed
from training.engine import Run
torch.set_num_threads(1)
(cfg,) = config.build(json.loads(sys.argv[1]))
out = Path(sys.argv[2])
ctx = distributed.init("cpu")
name = f"rank{ctx.rank}" if ctx.distributed else "single"
for loss in cfg["losses"]:
    run = Run(cfg, loss, cfg["seed"], out / name / loss, ctx)
    assert run.model.criterion.world_size == ctx.world_size
    # First-step gradients after DDP's averaging (Adam would hide a wrong overall scale); the
    # proxies' gradient is gathered from the shards.
    x, y = default_collate([run.splits.train[i] for i in next(iter(run.sampler))])
    run.train_model(x, y).backward()
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    grads["criterion.proxies"] = distributed.gather(grads["criterion.proxies"], ctx)
    run.optimizer.zero_grad()
    run.fit()
    state = run.model_state()
    if ctx.is_main:
        torch.save({"model": state, "history": run.history, "grads": grads},
                   out / f"{loss}_{name}.pt")
distributed.shutdown(ctx)
"""


def _values(**over) -> dict:
    values = {"dataset": "synthetic", "backbone": "mlp", "hidden_size": 16, "embedding_size": 8,
              "synthetic_train_classes": 5, "synthetic_test_classes": 3, "synthetic_centres": 3,
              "synthetic_samples": 5, "synthetic_dim": 8, "batch_size": 20, "epochs": 2,
              "lr_step": 1, "lr": 1e-2, "num_workers": 0, "progress": False,
              "proxies_per_class": 2, "recall_ks": [1, 2], "ndcg_ks": [2],
              "losses": ["mpa", "mpa_dw"], "class_parallel": True, "backend": "reference"}
    values.update(over)
    return values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_sharded_proxies_match_one_process(tmp_path):
    """5 classes over 2 ranks (3 + 2): the same first-step gradients (network after DDP's average,
    every proxy row), weights, proxies and history as one process running the same config."""
    values = _values()
    port = _free_port()
    envs = [dict(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo") for r in range(2)]
    procs = []
    for extra in envs + [{}]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER, json.dumps(values), str(tmp_path)],
            env=dict(env, OMP_NUM_THREADS="1", **extra), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    for loss in values["losses"]:
        ranks, single = (torch.load(tmp_path / f"{loss}_{name}.pt", weights_only=False)
                         for name in ("rank0", "single"))
        assert single["grads"].keys() == ranks["grads"].keys()
        for key, grad in single["grads"].items():
            torch.testing.assert_close(ranks["grads"][key], grad, rtol=1e-4, atol=1e-6)
        assert ranks["model"]["criterion.proxies"].shape == (5 * 2, 8)
        for key, value in single["model"].items():
            torch.testing.assert_close(ranks["model"][key], value, rtol=1e-4, atol=1e-5)
        for cp_row, row in zip(ranks["history"], single["history"]):
            for col in ("train_loss", "R@1", "MAP@R"):
                assert cp_row[col] == pytest.approx(row[col], rel=1e-4, abs=1e-3), (loss, col)
        # The 2-rank checkpoint (full proxies) loads into the replicated single-process model.
        last = torch.load(tmp_path / "rank0" / loss / "last.pt", weights_only=False)
        assert len(last["optimizer"]) == 2  # each rank's state of its own proxies
        (cfg,) = config.build(_values(class_parallel=False, losses=[loss]))
        plain = Run(cfg, loss, 0, tmp_path / "plain", distributed.Context(0, 1,
                                                                           torch.device("cpu")))
        plain.model.load_state_dict(last["model"])
        assert torch.equal(plain.model.criterion.proxies.detach(),
                           last["model"]["criterion.proxies"])
