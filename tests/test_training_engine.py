"""The train/eval loop: exact resume, DDP equivalence with gloo on CPU, and the embedded default."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import cli, config, distributed, engine
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
    for key, value in a["model"].items():
        other = b["model"][key]  # a tensor, or a loss's recorded hyper-parameters
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a["scheduler"] == b["scheduler"]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b["history"]]
    assert (tmp_path / "resumed" / "log.csv").read_text().count("\n") == 4
    # The RNG streams continued where the interrupted run left them, so they end equal too.
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert a["rng"][0]["python"] == b["rng"][0]["python"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One epoch of a tiny run: its directory holds last.pt, best.pt and result.json."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    _fit(tiny_synthetic(epochs=1), run_dir)
    torch.set_num_threads(before)
    return run_dir



def _resume(path: Path, run_dir: Path, loss: str = "mpa", **over) -> Run:
    (cfg,) = config.build(tiny_synthetic(resume=str(path), losses=[loss], **over))
    return Run(cfg, loss, cfg["seed"], run_dir, CPU)


@pytest.mark.parametrize("over,differ", [
    ({"lr": 2e-2}, ["lr 0.01 -> 0.02"]),
    ({"proxy_lr": 1e-3}, ["proxy_lr 0.01 -> 0.001"]),
    ({"lr_decay": 0.1, "lr_step": 3}, ["lr_step 1 -> 3", "lr_decay 0.5 -> 0.1"]),
    ({"weight_decay": 0.0}, ["weight_decay"]),
    ({"batch_size": 10}, ["batch_size 20 -> 10"]),
    ({"alpha": 16.0}, ["alpha of mpa 32.0 -> 16.0"]),
    ({"loss_args": {"mpa": {"gamma": 0.5}}}, ["gamma of mpa 0.1 -> 0.5"]),
    ({"recall_ks": [1, 4]}, ["recall_ks [1, 2] -> [1, 4]"]),
    ({"synthetic_spread": 0.5}, ["synthetic_spread"]),
])
def test_resume_refuses_changed_settings(trained, tmp_path, no_data, over, differ):
    """A resume with other training settings would keep the saved optimiser and schedule while
    last.pt recorded the new ones: it is refused, naming every key that differs."""
    with pytest.raises(engine.CheckpointError, match="was trained with other settings") as err:
        _resume(trained / "last.pt", tmp_path, epochs=2, **over)
    for text in differ:
        assert text in str(err.value)
    assert str(trained / "last.pt") in str(err.value)


def test_resume_accepts_keys_that_do_not_change_training(trained, tmp_path, capsys):
    """Length, place and speed may change (more epochs, another folder, batch size of the test
    pass, backend), and so may another loss's arguments; the change is said."""
    run = _resume(trained / "last.pt", tmp_path / "moved", epochs=2, eval_batch_size=7,
                  backend="torch", num_workers=0,
                  loss_args={"proxy_anchor": {"alpha": 8.0}})
    run.fit()
    assert run.epoch == 2 and len(run.history) == 2
    said = capsys.readouterr().out
    assert "MPA seed 0: resuming " in said and "after epoch 1 (" in said
    assert "epochs 1 -> 2" in said and "eval_batch_size 256 -> 7" in said
    assert engine.load_checkpoint(tmp_path / "moved" / "last.pt", "last")["config"][
        "eval_batch_size"] == 7


def test_resume_refuses_another_runs_checkpoint(trained, tmp_path, no_data):
    with pytest.raises(engine.CheckpointError, match="checkpoint of mpa seed 0, but this run is "
                       "mpa_ap seed 0"):
        _resume(trained / "last.pt", tmp_path, loss="mpa_ap")
    with pytest.raises(engine.CheckpointError, match="but this run is mpa seed 3"):
        _resume(trained / "last.pt", tmp_path, seed=3)


def _flip_proxies(path: Path, out: Path) -> None:
    """Every byte of the proxies' storage inverted: torch.load itself does not notice."""
    data = bytearray(path.read_bytes())
    proxies = torch.load(path, weights_only=True)["model"]["criterion.proxies"]
    start = data.find(proxies.numpy().tobytes())
    assert start > 0
    for i in range(start, start + proxies.numel() * proxies.element_size()):
        data[i] ^= 0xFF
    out.write_bytes(data)
    damaged = torch.load(out, weights_only=True)["model"]["criterion.proxies"]
    assert not torch.equal(damaged, proxies)


def _bad_file(kind: str, trained: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = (trained / "last.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flipped":
        _flip_proxies(trained / "last.pt", path)
    elif kind == "edited":  # a value changed and the file saved again without a new checksum
        ckpt = torch.load(trained / "last.pt", weights_only=True)
        ckpt["epoch"] = 5
        torch.save(ckpt, path)
    elif kind == "foreign":  # a state_dict, as other programs save one
        torch.save(torch.load(trained / "last.pt", weights_only=True)["model"], path)
    elif kind == "pickle":
        path.write_bytes(__import__("pickle").dumps({"epoch": 1}))
    elif kind == "json":
        return trained / "result.json"
    elif kind == "best":
        return trained / "best.pt"
    return path


@pytest.mark.parametrize("kind,message", [
    ("missing", "not found"),
    ("empty", "is empty"),
    ("truncated", r"cannot be read \(truncated or damaged\)"),
    ("flipped", "is corrupted: its contents do not match the SHA-256"),
    ("edited", "is corrupted"),
    ("foreign", "was not written by python -m training"),
    ("pickle", "is not a checkpoint: a torch.save file is a zip archive"),
    ("json", "it looks like JSON"),
    ("best", r"is a best.pt checkpoint \(the weights of a run's best epoch only\), not a last.pt"),
])
def test_bad_checkpoint_is_one_clear_error(trained, tmp_path, no_data, kind, message):
    path = _bad_file(kind, trained, tmp_path)
    with pytest.raises(engine.CheckpointError, match=message) as err:
        _resume(path, tmp_path / "run")
    assert str(path) in str(err.value)


def test_random_byte_flips_never_load_other_contents(trained, tmp_path):
    """1, 10 or 2,000 bytes flipped anywhere: refused, or (a flip in bytes the archive does not
    read) loaded with exactly the saved contents."""
    rng = random.Random(0)
    original = (trained / "last.pt").read_bytes()
    saved = engine._sha256(engine.load_checkpoint(trained / "last.pt", "last"))
    path, refused = tmp_path / "flipped.pt", 0
    for trial in range(30):
        data = bytearray(original)
        for i in rng.sample(range(len(data)), (1, 10, 2000)[trial % 3]):
            data[i] ^= rng.randrange(1, 256)
        path.write_bytes(data)
        try:
            assert engine._sha256(engine.load_checkpoint(path, "last")) == saved
        except engine.CheckpointError:
            refused += 1
    assert refused >= 25


def test_corrupted_checkpoint_on_the_command_line(trained, tmp_path, capsys, no_data):
    path = _bad_file("flipped", trained, tmp_path)
    values = tiny_synthetic(name="tiny", out_dir=str(tmp_path))
    (tmp_path / "tiny.json").write_text(json.dumps(values))
    code = cli.main(["--config", str(tmp_path / "tiny.json"), "--resume", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"checkpoint {path} is corrupted" in err


def test_checkpoints_load_back_and_saving_is_atomic(trained, tmp_path, monkeypatch):
    best = engine.load_checkpoint(trained / "best.pt", "best")
    assert best["epoch"] == 1 and "criterion.proxies" in best["model"]
    path = tmp_path / "last.pt"
    path.write_bytes((trained / "last.pt").read_bytes())
    before = path.read_bytes()

    def interrupted(obj, fh):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(engine.torch, "save", interrupted)
    with pytest.raises(OSError, match="disk full"):
        engine.save_checkpoint({"epoch": 2}, path, "last")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    engine.load_checkpoint(path, "last")


def test_progress_is_plain_lines_when_output_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    """Redirected output gets a line per interval and per epoch, not a bar's carriage returns."""
    monkeypatch.setattr(engine, "PROGRESS_SECONDS", 0.0)
    _fit(tiny_synthetic(epochs=1, progress=True), tmp_path)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "MPA seed 0 epoch 1: batch 1/3," in err
    assert "MPA seed 0 epoch 1/1: train loss " in err


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
# Leave without Python's finalisation: gloo's threads may still be alive then, and a C++ thread
# destroyed while joinable aborts the process (SIGABRT) after a run that passed.
import os
sys.stdout.flush()
os._exit(0)
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
            if not torch.is_tensor(value):  # the loss's recorded hyper-parameters
                assert r0["model"][key] == r1["model"][key] == value, (loss, key)
                continue
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
