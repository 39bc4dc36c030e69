"""``--sweep``: a grid over one config key, its table and plot, resume after a kill, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from training import cli, config, sweep
from training.engine import Run


def tiny_config(tmp_path: Path, **over) -> str:
    # threads=1: the harness's own setting for tiny models (no OpenMP oversubscription).
    values = {"name": "tiny", "threads": 1, "dataset": "synthetic", "backbone": "mlp",
              "hidden_size": 16, "embedding_size": 8, "synthetic_train_classes": 4,
              "synthetic_test_classes": 3, "synthetic_centres": 3, "synthetic_samples": 5,
              "synthetic_dim": 8, "batch_size": 20, "epochs": 2, "lr_step": 1, "lr": 1e-2,
              "num_workers": 0, "progress": True, "proxies_per_class": 2, "recall_ks": [1, 2],
              "ndcg_ks": [2], "losses": ["mpa", "mpa_ap"], "out_dir": str(tmp_path)}
    values.update(over)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(values))
    return str(path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_two_point_sweep_writes_table_plot_and_progress_lines(tmp_path, capsys):
    assert cli.main(["--config", tiny_config(tmp_path), "--seeds", "2",
                     "--sweep", "proxies_per_class=1,3"]) == 0
    out = capsys.readouterr().out
    base = tmp_path / "tiny"
    for suffix in (".md", ".csv", ".json", ".png"):
        assert (base / f"sweep-proxies_per_class{suffix}").stat().st_size > 0, suffix
    table = (base / "sweep-proxies_per_class.md").read_text()
    assert "| Methods | proxies_per_class | R@1 | R@2 | nDCG@2 | MAP@R |" in table
    rows = [line for line in table.splitlines() if line.startswith("| MPA")]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| MPA", "1"], ["| MPA", "3"], ["| MPA-AP", "1"], ["| MPA-AP", "3"]]
    assert all(" (" in r for r in rows), "mean (std) over the two seeds"
    assert table in out
    csv_rows = read_csv(base / "sweep-proxies_per_class.csv")
    assert [(r["method"], r["proxies_per_class"], r["seeds"]) for r in csv_rows] == [
        ("MPA", "1", "2"), ("MPA", "3", "2"), ("MPA-AP", "1", "2"), ("MPA-AP", "3", "2")]
    # The table is the per-point runs' best epochs, not a recomputation that could drift.
    summary = json.loads((base / "sweep-proxies_per_class.json").read_text())
    mpa_k3 = [r["best"]["R@1"] for r in summary["runs"] if r["value"] == 3 and r["loss"] == "mpa"]
    assert len(mpa_k3) == 2 and float(csv_rows[1]["R@1"]) == pytest.approx(sum(mpa_k3) / 2)
    for k in (1, 3):
        ckpt = torch.load(base / "sweep-proxies_per_class" / f"proxies_per_class={k}" / "mpa" /
                          "seed1" / "last.pt", weights_only=False)
        assert ckpt["config"]["proxies_per_class"] == k
        assert ckpt["model"]["criterion.proxies"].shape[0] == 4 * k  # 4 classes x K proxies
    # stdout is not a terminal here: one plain line per point, no tqdm carriage returns.
    assert "[sweep proxies_per_class] 1/2 proxies_per_class=1: done in" in out
    assert "[sweep proxies_per_class] 2/2 proxies_per_class=3: done in" in out
    assert "\r" not in out + capsys.readouterr().err


class Killed(Exception):
    pass


def test_killed_sweep_resumes_without_redoing_finished_points(tmp_path, monkeypatch, capsys):
    """A categorical key (so the plot's categorical axis runs too); the kill comes after the first
    run of the second point. Resuming skips the first point, reloads the finished run of the
    second without training it, trains the rest, and gives the uninterrupted sweep's table."""
    argv = ["--sweep", "similarity=max,mean"]
    cli.main(["--config", tiny_config(tmp_path / "straight"), *argv])

    fit, calls = Run.fit, []

    def fit_then_kill(self):
        if len(calls) == 3:
            raise Killed
        calls.append(self.dir)
        return fit(self)

    monkeypatch.setattr(Run, "fit", fit_then_kill)
    cfg = tiny_config(tmp_path / "killed")
    with pytest.raises(Killed):
        cli.main(["--config", cfg, *argv])
    points = tmp_path / "killed" / "tiny" / "sweep-similarity"
    assert (points / "similarity=max" / "point.json").is_file()
    assert not (points / "similarity=mean" / "point.json").exists()

    trained, fitted = [], []
    train_epoch = Run.train_epoch
    monkeypatch.setattr(Run, "fit", lambda self: fitted.append(self.dir) or fit(self))
    monkeypatch.setattr(Run, "train_epoch",
                        lambda self: trained.append(self.dir) or train_epoch(self))
    capsys.readouterr()
    cli.main(["--config", cfg, *argv, "--resume", "auto"])
    out = capsys.readouterr().out
    assert "1/2 similarity=max: already done, skipped" in out
    assert fitted == [points / "similarity=mean" / "mpa" / "seed0",
                      points / "similarity=mean" / "mpa_ap" / "seed0"]
    assert set(trained) == {points / "similarity=mean" / "mpa_ap" / "seed0"}
    straight = tmp_path / "straight" / "tiny" / "sweep-similarity.csv"
    assert read_csv(points.parent / "sweep-similarity.csv") == read_csv(straight)

    # A finished point whose config changed (more epochs) is not skipped: its runs extend.
    trained.clear()
    cli.main(["--config", cfg, *argv, "--resume", "auto", "--epochs", "3"])
    assert len(trained) == 4 and len(set(trained)) == 4


@pytest.mark.parametrize("argv,message", [
    (["--sweep", "nope=1,2"], "unknown config key 'nope'"),
    (["--sweep", "proxies_per_class"], "expects KEY=V1,V2,..."),
    (["--sweep", "proxies_per_class=1,two"], "--sweep proxies_per_class=two: config key "
     "'proxies_per_class': cannot parse"),
    (["--sweep", "proxies_per_class=1,0"], "'proxies_per_class' must be >= 1"),
    (["--sweep", "proxies_per_class=1.5"], "'proxies_per_class' must be int"),
    (["--sweep", "proxies_per_class=1,,2"], "--sweep proxies_per_class: expected comma-separated"),
    (["--sweep", "proxies_per_class=[1,2"], "--sweep proxies_per_class: cannot parse"),
    (["--sweep", "proxies_per_class=2,2"], "--sweep proxies_per_class: the value '2' repeats"),
    (["--sweep", "similarity=max,median"], "'similarity' must be one of"),
    (["--sweep", "seeds=1,2"], "'seeds' cannot be swept"),
    (["--sweep", "loss_args.mpa.alphaa=1,2"], "loss_args.mpa: ['alphaa'] are not arguments"),
    (["--sweep", "gamma=0.1", "--sweep", "tau=0.2"], "--sweep takes one KEY"),
    (["--sweep", "gamma=0.1", "--losses", "mpa", "--resume", "some/last.pt"], "--sweep resumes with --resume auto"),
])
def test_bad_sweep_is_a_one_line_error_naming_the_key(tmp_path, capsys, argv, message):
    assert cli.main(["--config", tiny_config(tmp_path), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "tiny").exists()  # nothing ran
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m training: error: --sweep")
    assert message in lines[0]


def test_dotted_keys_and_json_lists_are_sweepable(tmp_path):
    _, (cfg,), args = config.from_argv(["--config", tiny_config(tmp_path),
                                        "--sweep", "loss_args.mpa.alpha=[16, 32.5]"])
    key, (grid,) = sweep.parse(args.sweep, [cfg])
    assert key == "loss_args.mpa.alpha" and [p.label for p in grid] == ["16", "32.5"]
    assert [p.cfg["loss_args"]["mpa"]["alpha"] for p in grid] == [16, 32.5]
    assert grid[1].cfg["out_dir"] == str(tmp_path / "tiny" / "sweep-loss_args.mpa.alpha")
    assert grid[1].cfg["name"] == "loss_args.mpa.alpha=32.5"
    assert cfg["loss_args"] == {}, "the base config is left alone"
    # Values holding commas (dicts) go as a JSON list.
    spec = ['loss_args=[{"mpa": {"alpha": 16}}, {"mpa": {"alpha": 64}}]']
    _, (grid,) = sweep.parse(spec, [cfg])
    assert [p.value for p in grid] == [{"mpa": {"alpha": 16}}, {"mpa": {"alpha": 64}}]
