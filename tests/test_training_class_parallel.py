"""The harness with ``class_parallel``: two gloo ranks (DDP network, sharded proxies) train as one
process does, and their checkpoint loads into the replicated, single-process loss."""

from __future__ import annotations

import pytest
import torch
from test_training_engine import _WORKER, run_two_ranks_and_one

from training import config, distributed
from training.engine import Run


def _values(**over) -> dict:
    values = {"dataset": "synthetic", "backbone": "mlp", "hidden_size": 16, "embedding_size": 8,
              "synthetic_train_classes": 5, "synthetic_test_classes": 3, "synthetic_centres": 3,
              "synthetic_samples": 5, "synthetic_dim": 8, "batch_size": 20, "epochs": 2,
              "lr_step": 1, "lr": 1e-2, "num_workers": 0, "progress": False,
              "proxies_per_class": 2, "recall_ks": [1, 2], "ndcg_ks": [2],
              "losses": ["mpa", "mpa_dw"], "class_parallel": True, "backend": "reference"}
    values.update(over)
    return values


def test_two_ranks_with_sharded_proxies_match_one_process(tmp_path):
    """5 classes over 2 ranks (3 + 2): the same first-step gradients (network after DDP's average,
    every proxy row), weights, proxies and history as one process running the same config."""
    values = _values()
    run_two_ranks_and_one(_WORKER, values, tmp_path)
    for loss in values["losses"]:
        ranks, single = (torch.load(tmp_path / f"{loss}_{name}.pt", weights_only=False)
                         for name in ("rank0", "single"))
        assert single["grads"].keys() == ranks["grads"].keys()
        for key, grad in single["grads"].items():
            torch.testing.assert_close(ranks["grads"][key], grad, rtol=1e-4, atol=1e-6)
        assert ranks["model"]["criterion.proxies"].shape == (5 * 2, 8)
        assert single["model"].keys() == ranks["model"].keys()
        for key, value in single["model"].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(ranks["model"][key], value, rtol=1e-4, atol=1e-5)
            else:  # the loss's spec: the same loss and hyper-parameters either way
                assert ranks["model"][key] == value, key
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
