"""Retrieval and clustering metrics of deep metric learning, from one exact nearest-neighbour pass.

Every retrieval metric here is a function of one thing: for each query, the binary relevance of its
ranked neighbours (1 where a neighbour shares the query's label) and ``R``, the number of items in
the searched set that share the query's label (the query itself not counted).
:func:`ranking_metrics` scores such rows directly (the paper's Table 3 is five of them);
:func:`retrieval_metrics` builds the rows from embeddings with one exact search and feeds them to
the same scorer; :func:`evaluate` is the paper's evaluation in one call. Values are x100, like the
paper's.

Metric names (``kind@depth``, where ``depth`` is a positive integer ``k`` or ``r``, meaning each
query's own ``R``):

* ``recall@k``: the DML "Recall@k", a hit rate: 1 if any of the ``k`` nearest neighbours is
  relevant.
* ``precision@k``: relevant items among the first ``k``, divided by ``k``. ``precision@1`` is
  Precision@1 (numerically equal to ``recall@1``); ``precision@r`` is R-precision.
* ``map@k``: ``(1/k) * sum_{i<=k} P(i) * rel(i)`` with ``P(i)`` the precision of the first ``i``.
  ``map@r`` is MAP@R of Musgrave et al. ("A Metric Learning Reality Check", 2020) and of
  pytorch-metric-learning's ``mean_average_precision_at_r``; ``map@k`` with a fixed ``k`` is the
  paper's MAP@10 of Table 3 (divided by ``k``, not by ``R``).
* ``ndcg@k``: eq. 19-20 with binary relevance: ``DCG(k) = sum_{i<=k} rel(i) / log2(i + 1)``, divided
  by the best DCG, which puts all ``min(k, R)`` relevant items first.

Search (:func:`retrieval_metrics`): embeddings are L2-normalised here and neighbours ranked by
cosine similarity, exactly (a matrix product per block of queries and ``torch.topk``, on CPU or
CUDA). When no separate reference set is given, each query searches all the other embeddings: its
own row is excluded, and a query whose label no other row has (``R = 0``) is left out of every
average and counted in ``num_queries_without_positive``. Memory above the inputs is one normalised
copy of the searched embeddings plus one block of ``chunk_size x M`` similarities (``M`` searched
rows); the default block is sized to about 256 MiB whatever the search depth, so a dataset with one
huge class (large ``R``, so a deep search) does not blow up memory, it only takes smaller blocks.

Ties: neighbours with equal similarity are ranked by index, lowest first, on every device. A block's
``torch.topk`` keeps one neighbour more than needed; rows where two of those kept similarities are
equal (an order that ``topk`` leaves unspecified) are re-ranked by a stable full sort of the row.
This is exact given the computed similarities; similarities themselves may differ in the last bit
between devices or BLAS libraries, as any floating-point product may.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

from mpa_kernels._checks import check_embeddings_and_labels
from mpa_kernels._spec import check_int

__all__ = [
    "evaluate",
    "map_at_r",
    "ndcg_at_k",
    "nmi",
    "precision_at_1",
    "r_precision",
    "ranking_metrics",
    "recall_at_k",
    "retrieval_metrics",
]

_KINDS = ("recall", "precision", "map", "ndcg")
_NAME = re.compile(r"(recall|precision|map|ndcg)@(r|[1-9][0-9]*)")
# Working set of one block of queries; see _block_rows for what it covers.
_BLOCK_BYTES = 256 * 2**20
# Bytes per retrieved position spent by the float64 temporaries of _score_rows.
_BYTES_PER_RANK = 128


# --------------------------------------------------------------------------------------------
# Scoring ranked relevance rows
# --------------------------------------------------------------------------------------------


def _parse_metrics(metrics: Sequence[str]) -> list[tuple[str, str, int | None]]:
    """``["recall@4", "map@r"]`` -> ``[("recall@4", "recall", 4), ("map@r", "map", None)]``."""
    if isinstance(metrics, str) or not isinstance(metrics, Iterable):
        raise TypeError(f"metrics must be a sequence of metric names, got {type(metrics).__name__}")
    parsed = []
    for name in metrics:
        if not isinstance(name, str):
            raise TypeError(f"metric names must be strings, got {type(name).__name__}")
        match = _NAME.fullmatch(name)
        if match is None:
            raise ValueError(
                f"unknown metric {name!r}: expected KIND@k or KIND@r with KIND in {_KINDS} and k a "
                "positive integer"
            )
        kind, depth = match.groups()
        parsed.append((name, kind, None if depth == "r" else int(depth)))
    if not parsed:
        raise ValueError("metrics is empty")
    return list(dict.fromkeys(parsed))  # drop repeats, keep order


def _required_width(parsed, num_relevant: torch.Tensor) -> int:
    """How many ranked positions the metrics read: the largest ``k``, and ``max R`` for ``@r``."""
    depths = [d for _, _, d in parsed if d is not None]
    if any(d is None for _, _, d in parsed):
        depths.append(int(num_relevant.max()))
    return max(depths)


def _score_rows(relevance: torch.Tensor, num_relevant: torch.Tensor, parsed) -> dict:
    """Per-row values x100 (float64) of each parsed metric; inputs already checked.

    ``relevance`` (Q, W) holds at least as many positions as the metrics read; ``num_relevant``
    (Q,) is each row's ``R >= 1``.
    """
    rel = relevance.to(torch.float64)
    width = rel.shape[1]
    rank = torch.arange(1, width + 1, dtype=torch.float64, device=rel.device)
    discount = 1.0 / torch.log2(rank + 1.0)
    best_dcg = discount.cumsum(0)  # best_dcg[j - 1]: DCG of j relevant items ranked first
    hits_so_far = rel.cumsum(1)
    r = num_relevant.to(torch.float64)
    out = {}
    for name, kind, depth in parsed:
        if depth is None:
            within = rank <= r[:, None]
            denominator = r
            num_best = num_relevant
        else:
            within = rank <= depth
            denominator = float(depth)
            num_best = num_relevant.clamp(max=depth)
        hits = rel * within
        if kind == "recall":
            value = hits.amax(1)
        elif kind == "precision":
            value = hits.sum(1) / denominator
        elif kind == "map":
            value = (hits * hits_so_far / rank).sum(1) / denominator
        else:  # ndcg; binary relevance, so the gain 2^rel - 1 is rel
            value = (hits * discount).sum(1) / best_dcg[num_best - 1]
        out[name] = 100.0 * value
    return out


def ranking_metrics(relevance, num_relevant, metrics: Sequence[str]) -> dict[str, torch.Tensor]:
    """Score ranked binary relevance rows; one float64 value x100 per row for each metric.

    Args:
        relevance: (Q, W) bools or 0/1 numbers (a tensor or nested lists); ``relevance[q, i]``
            says whether the ``(i+1)``-th retrieved item of query ``q`` is relevant. A row must hold
            every position a metric reads: at least the largest ``k`` asked for, and at least the
            row's ``R`` when an ``@r`` metric is asked for.
        num_relevant: ``R``, the number of relevant items in the searched set for each row (an int
            for all rows, or Q ints), each >= 1 and at least the number of ones in the row.
        metrics: names as in the module docstring, e.g. ``["recall@10", "ndcg@10", "map@r"]``.

    Returns:
        ``{name: tensor of shape (Q,)}``.

    >>> ranking_metrics([[1, 0, 1, 0, 0, 0, 0, 0, 0, 0]], 4, ["map@r", "ndcg@10"])["map@r"]
    tensor([41.6667], dtype=torch.float64)
    """
    parsed = _parse_metrics(metrics)
    rel = torch.as_tensor(relevance)
    if rel.dim() != 2:
        raise ValueError(f"relevance must have shape (Q, W), got {tuple(rel.shape)}")
    if rel.shape[0] == 0 or rel.shape[1] == 0:
        raise ValueError(f"relevance is empty: shape {tuple(rel.shape)}")
    if rel.is_complex() or not bool(((rel == 0) | (rel == 1)).all()):
        raise ValueError("relevance must be binary: bools or the numbers 0 and 1")
    r = torch.as_tensor(num_relevant, device=rel.device)
    if r.dtype == torch.bool or r.is_floating_point() or r.is_complex():
        raise TypeError(f"num_relevant must hold integers, got {r.dtype}")
    if r.dim() == 0:
        r = r.expand(rel.shape[0])
    if r.shape != rel.shape[:1]:
        raise ValueError(
            f"num_relevant must be an int or have shape ({rel.shape[0]},), got {tuple(r.shape)}"
        )
    if bool((r < 1).any()):
        raise ValueError("num_relevant must be at least 1 for every row (R = 0 has no metric)")
    if bool((rel.sum(1) > r).any()):
        raise ValueError("a relevance row holds more relevant items than its num_relevant")
    needed = _required_width(parsed, r)
    if rel.shape[1] < needed:
        raise ValueError(
            f"relevance rows hold {rel.shape[1]} positions but the metrics read {needed} "
            "(the largest k, or the largest R for an @r metric)"
        )
    return _score_rows(rel, r.to(torch.int64), parsed)


# --------------------------------------------------------------------------------------------
# Exact nearest-neighbour search
# --------------------------------------------------------------------------------------------


def _compute_dtype(*embeddings: torch.Tensor) -> torch.dtype:
    """float64 if any input is, else float32: half-precision similarities would tie too often."""
    return torch.float64 if any(e.dtype == torch.float64 for e in embeddings) else torch.float32


def _normalise(embeddings: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """L2-normalised copy in ``dtype`` on ``device``. Rows without a direction (zero, or a norm
    that overflows) were refused by :func:`check_embeddings_and_labels`, as the losses refuse
    them."""
    x = embeddings.to(device=device, dtype=dtype)
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def _block_rows(num_searched: int, search_depth: int, width: int, element_size: int) -> int:
    """Query rows per block so that the block's working set stays near ``_BLOCK_BYTES``.

    Per query row: its similarities to all ``num_searched`` rows, the ``search_depth + 1`` top-k
    values and int64 indices, and ``width`` ranked positions of scoring temporaries. Because the
    search depth (the largest ``R``) counts, one huge class gives smaller blocks, not more memory.
    """
    per_row = (
        num_searched * element_size
        + (search_depth + 1) * (element_size + 8)
        + width * _BYTES_PER_RANK
    )
    return max(1, _BLOCK_BYTES // per_row)


def _top_indices(sims: torch.Tensor, depth: int, tie_group_rows: int) -> torch.Tensor:
    """Indices of the ``depth`` largest entries of each row, largest first, ties lowest index first.

    One entry more than asked for is kept, so that a row whose kept values are all distinct has a
    unique answer (everything not kept is <= the extra entry < the last one returned). Rows with a
    repeated kept value are re-ranked by a stable sort of the whole row, in groups of
    ``tie_group_rows`` rows so that the sort's buffers stay bounded.
    """
    kept = min(depth + 1, sims.shape[1])
    values, indices = sims.topk(kept, dim=1)
    tied = (values[:, 1:] == values[:, :-1]).any(1).nonzero().squeeze(1)
    for rows in tied.split(tie_group_rows):
        order = torch.sort(sims[rows], dim=1, descending=True, stable=True).indices
        indices[rows] = order[:, :kept]
    return indices[:, :depth]


def retrieval_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    metrics: Sequence[str],
    *,
    reference_embeddings: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float | int]:
    """Retrieval metrics of ``embeddings`` from one exact cosine-similarity k-NN search.

    Args:
        embeddings: (N, d) floating-point query embeddings; normalised here.
        labels: (N,) integer class labels (any integers).
        metrics: names as in the module docstring, e.g. ``["recall@1", "ndcg@8", "map@r"]``.
        reference_embeddings, reference_labels: a separate searched set (M, d) and (M,), e.g. a
            gallery split; give both or neither. Without them each query searches the other N - 1
            embeddings (the usual DML protocol). Do not pass the queries again as the reference:
            they would then find themselves.
        chunk_size: query rows per block; the block holds ``chunk_size x M`` similarities. ``None``
            picks the most rows that keep a block near 256 MiB (fewer when the search is deep).
        device: where to compute (e.g. ``"cuda"`` for CPU embeddings); default: the embeddings'.

    Returns:
        ``{name: mean over the queries with R >= 1}`` for each metric (floats, x100), plus
        ``num_queries`` (the queries averaged over) and ``num_queries_without_positive``.

    The search depth is the largest ``k`` asked for and, for ``@r`` metrics, the largest ``R``,
    capped at the number of searched rows; positions past the end of the searched set count as not
    relevant (so ``recall@8`` of a 5-row set is its ``recall@4``).
    """
    parsed = _parse_metrics(metrics)
    check_embeddings_and_labels(embeddings, labels)
    same_source = reference_embeddings is None and reference_labels is None
    if same_source:
        reference_embeddings, reference_labels = embeddings, labels
    elif reference_embeddings is None or reference_labels is None:
        raise ValueError("give reference_embeddings and reference_labels together, or neither")
    else:
        check_embeddings_and_labels(
            reference_embeddings, reference_labels,
            names=("reference_embeddings", "reference_labels"),
        )
        if reference_embeddings.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"embeddings have size {embeddings.shape[1]} but reference_embeddings have size "
                f"{reference_embeddings.shape[1]}"
            )
    if chunk_size is not None:
        check_int("chunk_size", chunk_size)
    device = embeddings.device if device is None else torch.device(device)

    dtype = _compute_dtype(embeddings, reference_embeddings)
    if same_source:
        searched = queries = _normalise(embeddings, device, dtype)
    else:
        searched = _normalise(reference_embeddings, device, dtype)
        queries = _normalise(embeddings, device, dtype)
    searched_labels = reference_labels.to(device=device, dtype=torch.int64)
    query_labels = labels.to(device=device, dtype=torch.int64)

    # R of each query: rows of the searched set with its label, less the query itself.
    classes, counts = torch.unique(searched_labels, return_counts=True)
    slot = torch.searchsorted(classes, query_labels).clamp(max=classes.numel() - 1)
    num_relevant = torch.where(classes[slot] == query_labels, counts[slot], 0) - int(same_source)
    answered = (num_relevant > 0).nonzero().squeeze(1)
    num_without = labels.shape[0] - answered.numel()
    if answered.numel() == 0:
        raise ValueError(
            "no query has a relevant item to retrieve (every label occurs once in the searched "
            "set, or not at all); retrieval metrics are undefined"
        )

    width = _required_width(parsed, num_relevant[answered])
    num_searched = searched.shape[0]
    depth = min(width, num_searched - int(same_source))
    rows = chunk_size or _block_rows(num_searched, depth, width, searched.element_size())
    # A tied row's stable sort holds about 6x its similarities (values, int64 indices, buffers).
    tie_group_rows = max(1, rows // 6)

    # Per-query values, summed once at the end, so the result does not depend on the blocking.
    values = {
        name: torch.empty(answered.numel(), dtype=torch.float64, device=device)
        for name, _, _ in parsed
    }
    for start, block in zip(range(0, answered.numel(), rows), answered.split(rows)):
        sims = queries[block] @ searched.T
        if same_source:
            sims[torch.arange(block.numel(), device=device), block] = float("-inf")
        neighbours = _top_indices(sims, depth, tie_group_rows)
        del sims
        relevance = searched_labels[neighbours] == query_labels[block, None]
        if width > depth:  # the searched set is shorter than k: the rest is not relevant
            relevance = torch.nn.functional.pad(relevance, (0, width - depth))
        for name, value in _score_rows(relevance, num_relevant[block], parsed).items():
            values[name][start : start + block.numel()] = value
    result: dict[str, float | int] = {name: v.mean().item() for name, v in values.items()}
    result["num_queries"] = answered.numel()
    result["num_queries_without_positive"] = num_without
    return result


def _one_metric(name: str, embeddings, labels, options) -> float:
    return retrieval_metrics(embeddings, labels, [name], **options)[name]


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, k: int = 1, **options) -> float:
    """Recall@k x100, the DML hit rate; ``options`` as in :func:`retrieval_metrics`."""
    return _one_metric(f"recall@{check_int('k', k)}", embeddings, labels, options)


def ndcg_at_k(embeddings: torch.Tensor, labels: torch.Tensor, k: int = 10, **options) -> float:
    """nDCG@k x100 (eq. 19-20, binary relevance); ``options`` as in :func:`retrieval_metrics`."""
    return _one_metric(f"ndcg@{check_int('k', k)}", embeddings, labels, options)


def map_at_r(embeddings: torch.Tensor, labels: torch.Tensor, **options) -> float:
    """MAP@R x100 (Musgrave et al.); ``options`` as in :func:`retrieval_metrics`."""
    return _one_metric("map@r", embeddings, labels, options)


def r_precision(embeddings: torch.Tensor, labels: torch.Tensor, **options) -> float:
    """R-precision x100; ``options`` as in :func:`retrieval_metrics`."""
    return _one_metric("precision@r", embeddings, labels, options)


def precision_at_1(embeddings: torch.Tensor, labels: torch.Tensor, **options) -> float:
    """Precision@1 x100; ``options`` as in :func:`retrieval_metrics`."""
    return _one_metric("precision@1", embeddings, labels, options)


# --------------------------------------------------------------------------------------------
# Clustering and the paper's evaluation
# --------------------------------------------------------------------------------------------


def nmi(embeddings: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> float:
    """NMI x100 of k-means clusters of the normalised embeddings against the labels.

    k-means (scikit-learn, one k-means++ initialisation seeded by ``seed``, so deterministic) with
    as many clusters as there are distinct labels; NMI with the arithmetic mean of the entropies,
    scikit-learn's default and pytorch-metric-learning's. Costs about N x C x d per iteration, which
    for SOP (11,316 classes) is minutes on a CPU.
    """
    check_embeddings_and_labels(embeddings, labels)
    check_int("seed", seed, minimum=0)
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    x = _normalise(embeddings, torch.device("cpu"), torch.float32).numpy()
    y = labels.cpu().numpy()
    num_classes = len(set(y.tolist()))
    clusters = KMeans(n_clusters=num_classes, n_init=1, random_state=seed).fit_predict(x)
    return 100.0 * float(normalized_mutual_info_score(y, clusters))


def _check_ks(name: str, ks) -> tuple[int, ...]:
    if isinstance(ks, int) and not isinstance(ks, bool):
        ks = (ks,)
    if not isinstance(ks, Iterable) or isinstance(ks, str):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(ks).__name__}")
    return tuple(check_int(f"each of {name}", k) for k in ks)


def evaluate(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    ndcg_ks: Sequence[int] = (2, 4, 8),
    *,
    include_nmi: bool = False,
    reference_embeddings: torch.Tensor | None = None,
    reference_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float | int]:
    """The paper's evaluation: Recall@k, nDCG@k, MAP@R, R-precision and Precision@1 (x100).

    One exact k-NN search (see :func:`retrieval_metrics`, which documents ``reference_*``,
    ``chunk_size`` and ``device``). Returns ``{"recall@1": ..., "ndcg@2": ..., "map@r": ...,
    "precision@r": ..., "precision@1": ..., "num_queries": ..., "num_queries_without_positive":
    ...}``, and ``"nmi"`` when ``include_nmi`` (off by default: k-means is far slower than the
    search for many classes; it clusters the query embeddings only). The paper's SOP protocol is
    ``ks=(1, 10, 100), ndcg_ks=(10, 100)``.
    """
    ks = _check_ks("ks", ks)
    ndcg_ks = _check_ks("ndcg_ks", ndcg_ks)
    if not isinstance(include_nmi, bool):
        raise TypeError(f"include_nmi must be a bool, got {type(include_nmi).__name__}")
    names = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ndcg_ks]
    names += ["map@r", "precision@r", "precision@1"]
    result = retrieval_metrics(
        embeddings,
        labels,
        names,
        reference_embeddings=reference_embeddings,
        reference_labels=reference_labels,
        chunk_size=chunk_size,
        device=device,
    )
    if include_nmi:
        result["nmi"] = nmi(embeddings, labels)
    return result
