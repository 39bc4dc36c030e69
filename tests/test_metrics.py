"""Retrieval metrics against independent implementations, the paper's Table 3, and bad input.

Independent references: scikit-learn's ``ndcg_score`` (nDCG@k), pytorch-metric-learning's
``AccuracyCalculator`` (MAP@R, R-precision, Precision@1), and a brute-force numpy ranking (a full
stable argsort of every similarity row) for everything else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.metrics import ndcg_score

from mpa_kernels import metrics

ALL = ["recall@1", "recall@3", "recall@8", "precision@5", "map@6", "ndcg@1", "ndcg@4", "ndcg@9",
       "map@r", "precision@r", "recall@r", "ndcg@r"]


def clustered(n, d, num_classes, noise, seed, num_singletons=0, dtype=torch.float64):
    """Gaussian clusters; the first ``num_singletons`` rows get labels of their own."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[:num_singletons] = num_classes + torch.arange(num_singletons)
    centres = torch.randn(num_classes + num_singletons, d, generator=g)
    x = centres[labels] + noise * torch.randn(n, d, generator=g)
    return x.to(dtype), labels


def brute_force_rankings(x, labels, ref=None, ref_labels=None):
    """Relevance of every query's full ranking (self excluded, ties lowest index first) and R."""
    same_source = ref is None
    if same_source:
        ref, ref_labels = x, labels
    xn = x.double().numpy()
    rn = ref.double().numpy()
    xn = xn / np.linalg.norm(xn, axis=1, keepdims=True)
    rn = rn / np.linalg.norm(rn, axis=1, keepdims=True)
    sims = xn @ rn.T
    if same_source:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    if same_source:
        order = order[:, :-1]
    relevance = ref_labels.numpy()[order] == labels.numpy()[:, None]
    return relevance, relevance.sum(1)


def brute_force_metrics(relevance, num_relevant, names):
    """Per-query values of ``names`` from full rankings, written straight from the definitions."""
    out = {}
    for name in names:
        kind, depth = name.split("@")
        rows = []
        for rel, r in zip(relevance, num_relevant):
            cut = r if depth == "r" else int(depth)
            top = rel[:cut].astype(float)
            if kind == "recall":
                rows.append(float(top.any()))
            elif kind == "precision":
                rows.append(top.sum() / cut)
            elif kind == "map":
                precision_at_i = np.cumsum(top) / np.arange(1, len(top) + 1)
                rows.append((precision_at_i * top).sum() / cut)
            else:
                discount = 1 / np.log2(np.arange(2, cut + 2))
                rows.append((top * discount[: len(top)]).sum() / discount[: min(cut, r)].sum())
        out[name] = 100 * np.array(rows)
    return out


def brute_force_means(relevance, num_relevant, names):
    keep = num_relevant > 0
    per_query = brute_force_metrics(relevance[keep], num_relevant[keep], names)
    return {name: v.mean() for name, v in per_query.items()}


def assert_close(ours: dict, theirs: dict, tol=1e-9):
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=tol, rel=0), name


# --- the paper's Table 3 ----------------------------------------------------------------------

TABLE_3 = [  # search result, Recall@10, Precision@10, MAP@R (R = 4), MAP@10, nDCG@10, as printed
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], "100", "10", "25.0", "10.0", "39.0"),
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], "100", "20", "25.0", "12.0", "50.3"),
    ([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], "100", "20", "41.7", "16.7", "58.6"),
    ([1, 0, 1, 0, 0, 0, 1, 0, 0, 1], "100", "40", "41.7", "25.0", "82.9"),
    ([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], "100", "40", "100.0", "40.0", "100.0"),
]


def test_table_3_reproduced_to_printed_digits():
    names = ["recall@10", "precision@10", "map@r", "map@10", "ndcg@10"]
    rows = [row for row, *_ in TABLE_3]
    scores = metrics.ranking_metrics(rows, 4, names)
    for i, (_, *printed) in enumerate(TABLE_3):
        for name, text in zip(names, printed):
            decimals = len(text.split(".")[1]) if "." in text else 0
            assert f"{scores[name][i].item():.{decimals}f}" == text, (i, name)


# --- nDCG@k against scikit-learn ---------------------------------------------------------------
# sklearn's ideal DCG ranks *all* relevances of a row, so the comparison hands it whole rankings
# (every searched item, not just the top k): its ideal DCG@k then holds min(k, R) relevant items, R
# being the row's total, which is the paper's definition and ours. Handing it only the retrieved top
# k would make its ideal count only the retrieved positives (Table 3's first row would score 100).


def test_ndcg_rows_equal_sklearn():
    rng = np.random.default_rng(0)
    relevance = rng.random((60, 25)) < rng.random((60, 1)) * 0.5
    relevance[:, 0] |= ~relevance.any(1)  # R >= 1
    scores = np.tile(np.arange(25, 0, -1, dtype=float), (60, 1))  # strictly decreasing: keep order
    for k in (1, 2, 5, 10, 25):
        ours = metrics.ranking_metrics(relevance, relevance.sum(1), [f"ndcg@{k}"])[f"ndcg@{k}"]
        theirs = [100 * ndcg_score(relevance[i : i + 1], scores[i : i + 1], k=k) for i in range(60)]
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("ks", [(1, 2, 4, 8), (10, 100)])
def test_evaluate_ndcg_equals_sklearn(ks):
    x, labels = clustered(300, 16, 40, 0.9, seed=1, num_singletons=5)
    xn = torch.nn.functional.normalize(x, dim=1).numpy()
    sims = xn @ xn.T
    others = ~np.eye(len(x), dtype=bool)
    y_score = sims[others].reshape(len(x), -1)
    y_true = (labels.numpy()[:, None] == labels.numpy()[None, :])[others].reshape(len(x), -1)
    keep = y_true.any(1)
    ours = metrics.evaluate(x, labels, ks=(1,), ndcg_ks=ks)
    for k in ks:
        assert ours[f"ndcg@{k}"] == pytest.approx(
            100 * ndcg_score(y_true[keep], y_score[keep], k=k), abs=1e-9, rel=0
        )


# --- MAP@R, R-precision, Precision@1 against pytorch-metric-learning ---------------------------

PML_NAMES = {"map@r": "mean_average_precision_at_r", "precision@r": "r_precision",
             "precision@1": "precision_at_1"}


def pml_accuracy(*args, **kwargs):
    calculator = AccuracyCalculator(
        include=tuple(PML_NAMES.values()), exclude=(), k="max_bin_count",
        device=torch.device("cpu"), knn_func=CustomKNN(CosineSimilarity()),
    )
    result = calculator.get_accuracy(*args, **kwargs)
    return {ours: 100 * result[theirs] for ours, theirs in PML_NAMES.items()}


@pytest.mark.parametrize("seed, noise", [(2, 1.0), (3, 1.6)])
def test_map_at_r_r_precision_p_at_1_equal_pml(seed, noise):
    # float32, pml's own precision; classes of 1 to ~25, with lone queries for pml to drop too
    x, labels = clustered(400, 32, 30, noise, seed, num_singletons=7, dtype=torch.float32)
    ours = metrics.evaluate(x, labels, ks=(1,), ndcg_ks=())
    assert_close(ours, pml_accuracy(x, labels))
    assert ours["num_queries_without_positive"] == 7


def test_reference_set_equals_pml():
    x, labels = clustered(500, 32, 25, 0.8, seed=4, dtype=torch.float32)
    queries, query_labels = x[:150], labels[:150].clone()
    query_labels[:3] = 99  # not in the reference set: no positive
    ours = metrics.evaluate(
        queries, query_labels, ks=(1,), ndcg_ks=(),
        reference_embeddings=x[150:], reference_labels=labels[150:],
    )
    assert_close(ours, pml_accuracy(queries, query_labels, x[150:], labels[150:], False))
    assert ours["num_queries_without_positive"] == 3 and ours["num_queries"] == 147


def test_mixed_precision_queries_and_reference():
    x, labels = clustered(200, 16, 20, 0.8, seed=16)
    ref = dict(reference_embeddings=x[80:], reference_labels=labels[80:])
    exact = metrics.evaluate(x[:80], labels[:80], **ref)
    assert metrics.evaluate(x[:80].float(), labels[:80], **ref) == exact  # computed in float64
    ref["reference_embeddings"] = ref["reference_embeddings"].bfloat16()
    assert_close(metrics.evaluate(x[:80].half(), labels[:80], **ref), exact, tol=1.0)


# --- everything against a brute-force ranking ---------------------------------------------------


def test_every_metric_equals_brute_force():
    x, labels = clustered(250, 8, 20, 0.8, seed=5, num_singletons=4)
    relevance, num_relevant = brute_force_rankings(x, labels)
    ours = metrics.retrieval_metrics(x, labels, ALL)
    assert_close(ours, brute_force_means(relevance, num_relevant, ALL))
    assert ours["num_queries"] == 246 and ours["num_queries_without_positive"] == 4


def test_recall_at_k_equals_brute_force():
    x, labels = clustered(300, 12, 50, 1.0, seed=6)
    relevance, num_relevant = brute_force_rankings(x, labels)
    keep = num_relevant > 0
    for k in (1, 2, 4, 8, 16):
        expected = 100 * relevance[keep, :k].any(1).mean()
        assert metrics.recall_at_k(x, labels, k) == pytest.approx(expected, abs=1e-9, rel=0)


def test_single_metric_functions_agree_with_evaluate():
    x, labels = clustered(200, 8, 15, 1.0, seed=7)
    full = metrics.evaluate(x, labels, ks=(1, 4), ndcg_ks=(4,))
    assert metrics.recall_at_k(x, labels, 4) == full["recall@4"]
    assert metrics.ndcg_at_k(x, labels, 4) == full["ndcg@4"]
    assert metrics.map_at_r(x, labels) == full["map@r"]
    assert metrics.r_precision(x, labels) == full["precision@r"]
    assert metrics.precision_at_1(x, labels) == full["precision@1"] == full["recall@1"]


def test_k_beyond_the_searched_set_reads_missing_positions_as_not_relevant():
    x, labels = clustered(6, 4, 2, 1.0, seed=8)
    relevance, num_relevant = brute_force_rankings(x, labels)  # 5 positions per query
    ours = metrics.evaluate(x, labels, ks=(1, 8), ndcg_ks=(8,))
    padded = np.pad(relevance, ((0, 0), (0, 3)))
    assert_close(ours, brute_force_means(padded, num_relevant, ["recall@8", "ndcg@8"]))
    assert ours["recall@8"] == 100.0


# --- blocking, ties, huge classes, lone queries ------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 64, 10_000])
def test_chunked_equals_unchunked(chunk_size):
    x, labels = clustered(150, 8, 12, 1.0, seed=9, num_singletons=3, dtype=torch.float32)
    whole = metrics.retrieval_metrics(x, labels, ALL)
    assert metrics.retrieval_metrics(x, labels, ALL, chunk_size=chunk_size) == whole
    ref = dict(reference_embeddings=x[50:], reference_labels=labels[50:])
    whole = metrics.retrieval_metrics(x[:50], labels[:50], ALL, **ref)
    chunked = metrics.retrieval_metrics(x[:50], labels[:50], ALL, chunk_size=chunk_size, **ref)
    assert chunked == whole


def test_ties_rank_lowest_index_first():
    # rows 1 and 2 are the same point: query 0 finds row 1 (a negative) first
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [-1.0, 0.3]])
    labels = torch.tensor([0, 1, 0, 1])
    assert metrics.ranking_metrics([[0, 1]], 1, ["recall@1"])["recall@1"].item() == 0.0
    result = metrics.evaluate(x[:1], labels[:1], ks=(1, 2), ndcg_ks=(),
                              reference_embeddings=x[1:], reference_labels=labels[1:])
    assert result["recall@1"] == 0.0 and result["recall@2"] == 100.0


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_many_exact_ties_equal_stable_brute_force(chunk_size):
    # 60 copies of 5 distinct points: nearly every similarity is tied, inside and across the top-k
    g = torch.Generator().manual_seed(10)
    points = torch.randn(5, 6, generator=g, dtype=torch.float64)
    x = points[torch.randint(0, 5, (60,), generator=g)]
    labels = torch.randint(0, 4, (60,), generator=g)
    relevance, num_relevant = brute_force_rankings(x, labels)
    ours = metrics.retrieval_metrics(x, labels, ALL, chunk_size=chunk_size)
    assert_close(ours, brute_force_means(relevance, num_relevant, ALL))


def test_one_huge_class_keeps_blocks_bounded(monkeypatch):
    # R = 599 for the big class forces a search 599 deep; blocks must shrink, not memory grow
    labels = torch.cat([torch.zeros(600, dtype=torch.long), torch.arange(1, 81).repeat(5)])
    x, _ = clustered(1000, 8, 1, 1.0, seed=11)
    x = x + torch.nn.functional.one_hot(labels % 8, 8).double()
    budget = 2**20
    monkeypatch.setattr(metrics, "_BLOCK_BYTES", budget)
    shapes = []
    top_indices = metrics._top_indices

    def recording(sims, depth, group):
        shapes.append((sims.shape, depth))
        return top_indices(sims, depth, group)

    monkeypatch.setattr(metrics, "_top_indices", recording)
    ours = metrics.retrieval_metrics(x, labels, ALL)
    relevance, num_relevant = brute_force_rankings(x, labels)
    assert_close(ours, brute_force_means(relevance, num_relevant, ALL))
    assert {depth for _, depth in shapes} == {599}
    for (rows, searched), depth in shapes:
        block_bytes = rows * (searched * 8 + (depth + 1) * 16 + depth * metrics._BYTES_PER_RANK)
        assert block_bytes <= budget
    assert len(shapes) > 1


def test_queries_without_positive_are_excluded_and_counted():
    x, labels = clustered(120, 8, 10, 1.0, seed=12, num_singletons=9)
    ours = metrics.evaluate(x, labels)
    assert ours["num_queries"] == 111 and ours["num_queries_without_positive"] == 9
    relevance, num_relevant = brute_force_rankings(x, labels)
    names = ["recall@1", "recall@8", "ndcg@4", "map@r"]
    assert_close(ours, brute_force_means(relevance, num_relevant, names))


# --- NMI ---------------------------------------------------------------------------------------


def test_nmi_separated_clusters_and_determinism():
    x, labels = clustered(90, 8, 3, 0.01, seed=13)
    assert metrics.nmi(x, labels) == pytest.approx(100.0)
    x, labels = clustered(200, 8, 10, 1.5, seed=14)
    value = metrics.nmi(x, labels)
    assert 0.0 < value < 100.0 and metrics.nmi(x, labels) == value
    assert metrics.evaluate(x, labels, include_nmi=True)["nmi"] == value


# --- CUDA --------------------------------------------------------------------------------------


@requires_cuda
def test_cuda_equals_cpu():
    x, labels = clustered(2000, 64, 300, 0.8, seed=15, num_singletons=5, dtype=torch.float32)
    cpu = metrics.evaluate(x, labels)
    assert_close(metrics.evaluate(x.cuda(), labels.cuda()), cpu)
    assert_close(metrics.evaluate(x, labels, device="cuda", chunk_size=333), cpu)


# --- bad input ---------------------------------------------------------------------------------

X = torch.randn(6, 4)
Y = torch.tensor([0, 0, 1, 1, 2, 2])
ev, rm, rank = metrics.evaluate, metrics.retrieval_metrics, metrics.ranking_metrics
ROW2 = X.index_fill(0, torch.tensor([2]), float("nan")), X.index_fill(0, torch.tensor([2]), 0.0)
BAD_INPUTS = [  # (what, call, error, message)
    ("embeddings not a tensor", lambda: ev(X.numpy(), Y), TypeError,
     "embeddings must be a torch.Tensor"),
    ("labels not a tensor", lambda: ev(X, Y.tolist()), TypeError, "labels must be a torch.Tensor"),
    ("embeddings rank 1", lambda: ev(X[0], Y), ValueError, r"embeddings must have shape \(N, d\)"),
    ("labels rank 2", lambda: ev(X, Y[:, None]), ValueError, r"labels must have shape \(N,\)"),
    ("integer embeddings", lambda: ev(X.long(), Y), TypeError, "floating-point"),
    ("float labels", lambda: ev(X, Y.float()), TypeError, "labels must be an integer tensor"),
    ("bool labels", lambda: ev(X, Y > 0), TypeError, "labels must be an integer tensor"),
    ("empty", lambda: ev(X[:0], Y[:0]), ValueError, "empty"),
    ("embedding size 0", lambda: ev(X[:, :0], Y), ValueError, "size 0"),
    ("N mismatch", lambda: ev(X, Y[:5]), ValueError, "6 rows but labels has 5"),
    ("NaN", lambda: ev(ROW2[0], Y), ValueError, "NaN or infinite"),
    ("inf", lambda: ev(X / 0, Y), ValueError, "NaN or infinite"),
    ("zero row", lambda: ev(ROW2[1], Y), ValueError, "^embeddings has a row of zeros"),
    ("zero reference row", lambda: ev(X, Y, reference_embeddings=ROW2[1], reference_labels=Y),
     ValueError, "reference_embeddings has a row of zeros"),
    ("no positive anywhere", lambda: ev(X, torch.arange(6)), ValueError,
     "no query has a relevant item"),
    ("reference without labels", lambda: ev(X, Y, reference_embeddings=X), ValueError, "together"),
    ("reference size", lambda: ev(X, Y, reference_embeddings=X[:, :3], reference_labels=Y),
     ValueError, "reference_embeddings have size 3"),
    ("reference N mismatch", lambda: ev(X, Y, reference_embeddings=X, reference_labels=Y[:4]),
     ValueError, "reference_embeddings has 6 rows but reference_labels has 4"),
    ("reference float labels",
     lambda: ev(X, Y, reference_embeddings=X, reference_labels=Y.double()), TypeError,
     "reference_labels must be an integer"),
    ("k = 0 in ks", lambda: ev(X, Y, ks=(1, 0)), ValueError, "each of ks must be at least 1"),
    ("float k in ndcg_ks", lambda: ev(X, Y, ndcg_ks=(2.5,)), TypeError,
     "each of ndcg_ks must be an int"),
    ("ks a string", lambda: ev(X, Y, ks="1"), TypeError, "ks must be an int or a sequence"),
    ("recall k = 0", lambda: metrics.recall_at_k(X, Y, 0), ValueError, "k must be at least 1"),
    ("ndcg k bool", lambda: metrics.ndcg_at_k(X, Y, True), TypeError, "k must be an int"),
    ("chunk_size 0", lambda: ev(X, Y, chunk_size=0), ValueError, "chunk_size must be at least 1"),
    ("chunk_size float", lambda: ev(X, Y, chunk_size=2.0), TypeError, "chunk_size must be an int"),
    ("include_nmi not bool", lambda: ev(X, Y, include_nmi="yes"), TypeError,
     "include_nmi must be a bool"),
    ("unknown option", lambda: metrics.map_at_r(X, Y, chunk=3), TypeError, "chunk"),
    ("unknown metric", lambda: rm(X, Y, ["mrr@1"]), ValueError, "unknown metric 'mrr@1'"),
    ("metric depth 0", lambda: rm(X, Y, ["recall@0"]), ValueError, "unknown metric 'recall@0'"),
    ("metric without depth", lambda: rm(X, Y, ["recall"]), ValueError, "unknown metric 'recall'"),
    ("metrics a string", lambda: rm(X, Y, "recall@1"), TypeError, "sequence of metric names"),
    ("metrics empty", lambda: rm(X, Y, []), ValueError, "metrics is empty"),
    ("metric not a string", lambda: rm(X, Y, [1]), TypeError, "metric names must be strings"),
    ("nmi seed negative", lambda: metrics.nmi(X, Y, seed=-1), ValueError,
     "seed must be at least 0"),
    ("nmi NaN", lambda: metrics.nmi(ROW2[0], Y), ValueError, "NaN or infinite"),
    ("relevance rank 1", lambda: rank([1, 0], 1, ["recall@1"]), ValueError,
     r"relevance must have shape \(Q, W\)"),
    ("relevance empty", lambda: rank(torch.zeros(0, 3), 1, ["recall@1"]), ValueError,
     "relevance is empty"),
    ("relevance not binary", lambda: rank([[1, 2]], 2, ["recall@1"]), ValueError, "binary"),
    ("relevance NaN", lambda: rank([[1.0, float("nan")]], 2, ["recall@1"]), ValueError, "binary"),
    ("num_relevant 0", lambda: rank([[0, 0]], 0, ["recall@1"]), ValueError, "at least 1"),
    ("num_relevant float", lambda: rank([[1, 0]], 1.0, ["recall@1"]), TypeError,
     "num_relevant must hold integers"),
    ("num_relevant shape", lambda: rank([[1, 0]], [1, 1], ["recall@1"]), ValueError,
     r"shape \(1,\)"),
    ("more hits than R", lambda: rank([[1, 1, 0]], 1, ["recall@1"]), ValueError,
     "more relevant items than"),
    ("rows too short for k", lambda: rank([[1, 0]], 1, ["ndcg@3"]), ValueError,
     "hold 2 positions but the metrics read 3"),
    ("rows too short for R", lambda: rank([[1, 0, 1]], 4, ["map@r"]), ValueError,
     "hold 3 positions but the metrics read 4"),
]


@pytest.mark.parametrize("call, error, match", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
