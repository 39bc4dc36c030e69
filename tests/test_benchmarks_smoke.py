"""The benchmark harness end to end on the tiniest shape: every provider that runs on this machine
(except torch.compile, whose compile alone takes most of a minute on a CPU) writes a results file
with the documented fields and sane figures, and the charts render; the roofline predictions
alone (``--predict``) are written as markdown and JSON."""

import csv
import json
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import DEFAULT_OUT, _loss_parser, main
from benchmarks import roofline
from benchmarks.providers import Case
from benchmarks.runner import CSV_FIELDS
from benchmarks.shapes import SHAPES
from benchmarks.summary import markdown


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    # --roofline on a CPU: the H100's predictions beside CPU times, only to exercise the fields.
    try:
        result = main(["--device", "cpu", "--shapes", "tiny", "--losses", "mpa,proxy_anchor",
                       "--providers", "reference,pml,torch,floor", "--repeats", "1",
                       "--roofline", "h100", "--out", str(out), "--tag", "smoke"])
    finally:
        torch.set_num_threads(threads)
    return result, out


def test_results_file_schema(doc):
    result, out = doc
    (json_path,) = out.glob("*-smoke.json")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(result))
    env = result["environment"]
    for key in ("device_name", "cpu_model", "torch", "triton", "git_commit", "torch_threads"):
        assert key in env
    assert env["torch_threads"] == 1
    rows = result["results"]
    providers = {(r["loss"], r["provider"]) for r in rows}
    assert ("mpa", "reference") in providers and ("mpa", "floor") in providers
    assert ("proxy_anchor", "pml") in providers and ("mpa", "pml") not in providers
    for r in rows:
        assert r["status"] == "ok", r
        for kind in ("forward", "forward_backward"):
            t = r[kind]
            assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"] and t["repeats"] == 1
        # Gradients of the embeddings and proxies are allocated inside forward+backward.
        s = SHAPES["tiny"] if r["loss"] == "mpa" else SHAPES["tiny"].with_k(1)
        assert r["peak_forward_backward_bytes"] >= 4 * (s.n + s.c * s.k) * s.d
        assert r["forward_backward_vs_floor"] > 0
        assert r["forward_vs_reference"] is not None
        if r["provider"] != "floor":
            assert r["loss_rel_diff_to_reference"] < 1e-4, r
        assert r["load_before"] >= 0 and r["load_after"] >= 0
        if r["provider"] == "pml":
            assert "predicted" not in r  # the model has no pml
        else:
            p = r["predicted"]
            assert 0 < p["forward_s"] < p["forward_backward_s"]
            assert r["forward_backward_vs_predicted"] == pytest.approx(
                t["median_s"] / p["forward_backward_s"])
    (csv_path,) = out.glob("*-smoke.csv")
    lines = [ln for ln in csv_path.read_text().splitlines() if not ln.startswith("#")]
    table = list(csv.DictReader(lines))
    assert list(table[0]) == CSV_FIELDS and len(table) == len(rows)
    assert len(list(out.glob("*-smoke-*.png"))) == 2
    assert all(row["load_before"] != "" and row["predicted_forward_backward_s"] != ""
               for row in table if row["provider"] != "pml")
    md = markdown(result, losses=["mpa"])
    assert "| reference | " in md and "proxy_anchor" not in md
    assert "measured / predicted" in md and "Off their predicted bound" in md


def test_defaults_one_thread_and_an_ignored_folder():
    args = _loss_parser().parse_args([])
    assert args.threads == 1
    # Relative to where it runs, never the installed package's folder; .gitignore lists it.
    assert args.out == DEFAULT_OUT and not DEFAULT_OUT.is_absolute()


def test_predict_alone(tmp_path):
    doc = main(["--predict", "h200", "--shapes", "tiny", "--losses", "mpa_ap", "--dtypes", "bf16",
                "--out", str(tmp_path)])
    assert doc["gpu"]["name"] == "NVIDIA H200 SXM"
    rows = {r["provider"]: r["prediction"] for r in doc["predictions"]}
    assert set(rows) == set(roofline.PROVIDERS)
    assert all(p["forward_backward"]["time_s"] > 0 for p in rows.values())
    assert json.loads((tmp_path / "predicted-h200.json").read_text()) == json.loads(
        json.dumps(doc))
    assert "| triton-linear |" in (tmp_path / "predicted-h200.md").read_text()


def test_case_inputs_require_grad():
    case = Case.make("proxy_nca", SHAPES["tiny"], torch.float32, torch.device("cpu"))
    assert case.shape.k == 1 and case.proxies.shape == (SHAPES["tiny"].c, SHAPES["tiny"].d)
    assert case.embeddings.requires_grad and case.proxies.requires_grad


def test_torch_backend_against_a_revision(tmp_path):
    """The before/after tool loads the backend of a git revision beside this checkout's and writes
    one row per loss and shape; against HEAD (this commit's file) it times the same code twice."""
    from benchmarks import torch_backend_revisions

    assert torch_backend_revisions.main(["--against", "HEAD", "--shapes", "tiny", "--losses",
                                         "mpa,mpa_dw", "--repeats", "1", "--out",
                                         str(tmp_path)]) == 0
    (path,) = tmp_path.glob("torch-backend-*-vs-HEAD.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["loss"], r["shape"]) for r in rows] == [("mpa", "tiny"), ("mpa_dw", "tiny")]
    assert all(r["before_s"] > 0 and r["after_s"] > 0 for r in rows)


def test_a_revision_runs_its_own_native_loops(monkeypatch):
    """Another revision's backend is bound to that revision's torch_native.cpp, built under a name
    of its own (not this checkout's loops, which would compare the same code twice or take
    another revision's arguments); where the file is this checkout's, nothing is built."""
    from benchmarks import torch_backend_revisions as revisions
    from mpa_kernels.backends import _native

    ours = _native._SOURCE.read_text()
    changed = ours + "\n// another revision\n"
    files = {"mpa_kernels/backends/torch_chunked.py":
             (Path(_native.__file__).parent / "torch_chunked.py").read_text()}
    monkeypatch.setattr(revisions, "_show", lambda rev, path: files.get(path))
    built = []

    def build(source, tag):
        built.append((source.read_text(), tag))
        return "the revision's extension"

    monkeypatch.setattr(_native, "build", build)
    files["mpa_kernels/backends/torch_native.cpp"] = changed
    module = revisions._module_at("some-revision")
    assert module._native.module() == "the revision's extension"
    assert built[0][0] == changed and built[0][1]  # a tag of its own
    files["mpa_kernels/backends/torch_native.cpp"] = ours
    assert revisions._module_at("HEAD")._native is _native
    assert len(built) == 1


def test_torch_backend_against_its_eager_ops(tmp_path):
    """--against eager times this checkout's native loops against its own eager ops, and restores
    the switch afterwards."""
    from benchmarks import torch_backend_revisions
    from mpa_kernels.backends import torch_chunked

    assert torch_backend_revisions.main(["--against", "eager", "--shapes", "tiny", "--losses",
                                         "soft_triple", "--repeats", "1", "--out",
                                         str(tmp_path)]) == 0
    (path,) = tmp_path.glob("torch-backend-*-vs-eager.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["before_s"] > 0 and row["after_s"] > 0
    assert torch_chunked.NATIVE is True


def test_floor_ratio_alternates_and_writes_its_file(tmp_path):
    from benchmarks import floor_ratio

    assert floor_ratio.main(["--shapes", "tiny", "--losses", "mpa,proxy_nca", "--threads", "1",
                             "--repeats", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-floor-ratio.json")
    doc = json.loads(path.read_text())
    assert doc["environment"]["torch_backend_loops"] is not None
    rows = doc["rows"]
    assert [(r["loss"], r["threads"]) for r in rows] == [("mpa", 1), ("proxy_nca", 1)]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["backend_median_s"] / r["floor_median_s"])
        assert r["backend_min_s"] <= r["backend_median_s"] and r["floor_min_s"] > 0


def test_floor_ratio_compares_chunk_budgets_and_restores_the_default(tmp_path, monkeypatch):
    from benchmarks import floor_ratio
    from mpa_kernels.backends import torch_chunked

    default = torch_chunked.DEFAULT_CHUNK_ELEMENTS
    seen, per_chunk = [], torch_chunked._classes_per_chunk
    monkeypatch.setattr(torch_chunked, "_classes_per_chunk",
                        lambda budget, *rest: seen.append(budget) or per_chunk(budget, *rest))
    assert floor_ratio.main(["--shapes", "tiny", "--losses", "mpa_dw", "--threads", "1",
                             "--repeats", "2", "--chunk-budgets", "4,6",
                             "--out", str(tmp_path)]) == 0
    assert torch_chunked.DEFAULT_CHUNK_ELEMENTS == default
    (path,) = tmp_path.glob("*-chunk-budgets.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["chunk_elements"] for r in rows] == [16, 64]
    assert set(seen) == {16, 64}  # the sweeps ran at those budgets
    assert rows[0]["floor_median_s"] == rows[1]["floor_median_s"]  # one floor per round
    with pytest.raises(SystemExit):
        floor_ratio.main(["--backend", "reference", "--chunk-budgets", "4"])
