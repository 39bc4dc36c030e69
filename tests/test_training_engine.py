"""The train/eval loop: exact resume, DDP equivalence with gloo on CPU, and the embedded default."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import cli, config, distributed
from training.engine import Run

CPU = distributed.Context(0, 1, torch.device("cpu"))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread avoids OpenMP oversubscription on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_synthetic(**over) -> dict:
    values = {"dataset": "synthetic", "backbone": "mlp", "hidden_size": 16, "embedding_size": 8,
              "synthetic_train_classes": 4, "synthetic_test_classes": 3, "synthetic_centres": 3,
              "synthetic_samples": 5, "synthetic_dim": 8, "batch_size": 20, "epochs": 2,
              "lr_step": 1, "lr": 1e-2, "num_workers": 0, "progress": False,
              "proxies_per_class": 2, "recall_ks": [1, 2], "ndcg_ks": [2], "losses": ["mpa"]}
    values.update(over)
    return values


def _fit(values: dict, run_dir: Path) -> Run:
    (cfg,) = config.build(values)
    run = Run(cfg, cfg["losses"][0], cfg["seed"], run_dir, CPU)
    run.fit()
    return run


def test_resume_equals_uninterrupted_run(tmp_path):
    """Digits with random crops (so the RNG state matters), three epochs with the learning rate
    decayed every epoch: stopping after epoch 1 and resuming gives the same weights, proxies,
    optimiser state and history as running straight through."""
    values = {"dataset": "digits", "backbone": "small_cnn", "hidden_size": 8, "embedding_size": 8,
              "image_size": 12, "resize_size": 12, "crop_scale_min": 0.5, "hflip": True,
              "batch_size": 128, "lr_step": 1, "lr": 1e-3, "num_workers": 0, "progress": False,
              "proxies_per_class": 3, "losses": ["mpa_ap"], "recall_ks": [1], "ndcg_ks": [2]}
    straight = _fit(dict(values, epochs=3), tmp_path / "straight")
    _fit(dict(values, epochs=1), tmp_path / "resumed")
    resumed = _fit(dict(values, epochs=3, resume="auto"), tmp_path / "resumed")
    assert resumed.epoch == straight.epoch == 3
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys() and "criterion.proxies" in a["model"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a["scheduler"] == b["scheduler"]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b["history"]]
    assert (tmp_path / "resumed" / "log.csv").read_text().count("\n") == 4
    # The RNG streams continued where the interrupted run left them, so they end equal too.
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert a["rng"][0]["python"] == b["rng"][0]["python"]


def test_resume_path_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume checkpoint"):
        _fit(tiny_synthetic(resume=str(tmp_path / "nope.pt")), tmp_path / "run")


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
    # The gradients of the first step, after DDP's averaging: Adam is blind to a wrong overall
    # gradient scale, these are not.
    x, y = default_collate([run.splits.train[i] for i in next(iter(run.sampler))])
    run.train_model(x, y).backward()
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    if cfg["class_parallel"]:  # every proxy row's gradient, gathered from the shards
        grads["criterion.proxies"] = distributed.gather(grads["criterion.proxies"], ctx)
    run.fit()
    torch.save({"model": run.model_state(), "history": run.history, "grads": grads},
               out / f"{loss}_{name}.pt")
distributed.shutdown(ctx)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks_and_one(worker: str, values: dict, out: Path) -> None:
    """``python -c worker CONFIG OUT`` as two gloo ranks and, alongside, as a single process."""
    port = _free_port()
    envs = [dict(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo") for r in range(2)]
    procs = []
    for extra in envs + [{}]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", worker, json.dumps(values), str(out)],
            env=dict(env, OMP_NUM_THREADS="1", **extra), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    for p in procs:
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, output


def test_ddp_two_gloo_ranks_match_one_process_on_the_global_batch(tmp_path):
    """Two CPU ranks with half the global batch each: identical gradients, weights and proxies on
    both ranks, equal to one process on the whole batch (the loss sees the gathered batch; DDP
    averages). MPA is class-wise (not a mean over samples), MPA-DW data-wise: both must match."""
    values = tiny_synthetic(losses=["mpa", "mpa_dw"])
    run_two_ranks_and_one(_WORKER, values, tmp_path)
    for loss in values["losses"]:
        r0, r1, single = (torch.load(tmp_path / f"{loss}_{name}.pt", weights_only=False)
                          for name in ("rank0", "rank1", "single"))
        assert "criterion.proxies" in single["model"]
        for key, grad in single["grads"].items():
            assert torch.equal(r0["grads"][key], r1["grads"][key]), (loss, key)
            torch.testing.assert_close(r0["grads"][key], grad, rtol=1e-4, atol=1e-6)
        for key, value in single["model"].items():
            assert torch.equal(r0["model"][key], r1["model"][key]), (loss, key)
            torch.testing.assert_close(r0["model"][key], value, rtol=1e-4, atol=1e-5)
        # Evaluation gathered the 45 test embeddings (an odd number) from both ranks.
        assert len(r0["history"]) == len(single["history"]) == 2
        for ddp_row, row in zip(r0["history"], single["history"]):
            for col in ("train_loss", "R@1", "R@2", "nDCG@2", "MAP@R"):
                assert ddp_row[col] == pytest.approx(row[col], rel=1e-4, abs=1e-3), (loss, col)


def test_global_batch_must_split_over_ranks(tmp_path):
    (cfg,) = config.build(tiny_synthetic(batch_size=21))
    ctx = distributed.Context(0, 2, torch.device("cpu"))
    with pytest.raises(config.ConfigError, match="not divisible by the 2 ranks"):
        Run(cfg, "mpa", 0, tmp_path, ctx)


def test_embedded_default_smoke_and_report(tmp_path, capsys):
    """The embedded default end to end on a tiny budget: both experiments, a table per experiment,
    report files and plots."""
    cli.main(["--out-dir", str(tmp_path), "--epochs", "1", "--losses", "mpa,proxy_anchor",
              "--synthetic-samples", "6", "--progress", "false"])
    printed = capsys.readouterr().out
    for name in ("digits", "synthetic"):
        out = tmp_path / name
        for f in ("report.md", "report.csv", "curves.png", "recall_at_k.png"):
            assert (out / f).stat().st_size > 0, f
        table = (out / "report.md").read_text()
        assert "| Methods | R@1 | R@2 | R@4 | R@8 | nDCG@2 | nDCG@4 | nDCG@8 | MAP@R |" in table
        assert "| ProxyAnchor |" in table and "| MPA |" in table
        assert table in printed
        log = (out / "mpa" / "seed0" / "log.csv").read_text().splitlines()
        assert log[0].startswith("epoch,train_loss,lr,proxy_lr,R@1") and len(log) == 2
    assert "total wall time" in printed


def test_seeds_give_mean_and_std(tmp_path, capsys):
    values = tiny_synthetic(epochs=1, losses=["mpa_ap", "proxy_anchor"], name="tiny",
                            out_dir=str(tmp_path))
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(values))
    cli.main(["--config", str(path), "--seeds", "2"])
    rows = (tmp_path / "tiny" / "report.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["method", "seeds", "R@1", "R@1 std"]
    assert [r.split(",")[0] for r in rows[1:]] == ["ProxyAnchor", "MPA-AP"]
    assert all(r.split(",")[1] == "2" for r in rows[1:])
    table = (tmp_path / "tiny" / "report.md").read_text()
    assert "2 seed(s)" in table and " (" in table.splitlines()[4]
    assert sorted(p.name for p in (tmp_path / "tiny" / "mpa_ap").iterdir()) == ["seed0", "seed1"]
