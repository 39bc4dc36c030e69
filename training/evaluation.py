"""The paper's columns from :func:`mpa_kernels.metrics.evaluate`, named as in its Tables 4-6."""

from __future__ import annotations

import torch

from mpa_kernels import metrics


def columns(recall_ks: list[int], ndcg_ks: list[int]) -> list[str]:
    return [f"R@{k}" for k in recall_ks] + [f"nDCG@{k}" for k in ndcg_ks] + ["MAP@R"]


def evaluate(embeddings: torch.Tensor, labels: torch.Tensor, recall_ks: list[int],
             ndcg_ks: list[int]) -> dict[str, float]:
    """Recall@k, nDCG@k and MAP@R (x100) of the test set retrieving itself (query excluded)."""
    result = metrics.evaluate(embeddings.float(), labels, ks=tuple(recall_ks),
                              ndcg_ks=tuple(ndcg_ks))
    out = {f"R@{k}": result[f"recall@{k}"] for k in recall_ks}
    out.update({f"nDCG@{k}": result[f"ndcg@{k}"] for k in ndcg_ks})
    out["MAP@R"] = result["map@r"]
    return {k: float(v) for k, v in out.items()}
