"""The harness refuses settings that cannot be right, before it reads any data, with one line that
names the key; a user's error never arrives as a traceback."""

from __future__ import annotations

import re

import pytest
import torch

from training import cli, config
from training.config import ConfigError


@pytest.mark.parametrize("argv,message", [
    # numbers outside their range, NaN and infinity
    (["--lr", "-1"], "'lr' must be > 0, got -1.0"),
    (["--lr", "0"], "'lr' must be > 0"),
    (["--lr", "NaN"], "'lr' must be finite"),
    (["--proxy-lr", "Infinity"], "'proxy_lr' must be finite"),
    (["--lr", "1e400"], "'lr' must be finite, got inf"),
    (["--seeds", "true"], "'seeds' must be int, got True"),
    (["--proxy-lr", "-0.01"], "'proxy_lr' must be >= 0"),
    (["--lr-decay", "-1"], r"'lr_decay' must be in \(0, 1\]"),
    (["--lr-decay", "0"], r"'lr_decay' must be in \(0, 1\]"),
    (["--lr-decay", "1.5"], r"'lr_decay' must be in \(0, 1\]"),
    (["--lr-step", "0"], "'lr_step' must be >= 1"),
    (["--weight-decay=-1e-4"], "'weight_decay' must be >= 0"),
    (["--gem-p", "-3"], "'gem_p' must be >= 1"),
    (["--gem-p", "0"], "'gem_p' must be >= 1"),
    (["--hidden-size", "0"], "'hidden_size' must be >= 1"),
    (["--hidden-size", "2"], "'hidden_size' must be >= 4 for the small_cnn"),
    (["--embedding-size", "0"], "'embedding_size' must be >= 1"),
    (["--crop-scale-min", "2"], r"'crop_scale_min' must be in \(0, 1\]"),
    (["--crop-scale-min", "0"], r"'crop_scale_min' must be in \(0, 1\]"),
    (["--alpha", "0"], "'alpha' must be > 0"),
    (["--gamma", "-0.1"], "'gamma' must be > 0"),
    (["--tau", "-1"], "'tau' must be >= 0"),
    (["--delta", "NaN"], "'delta' must be finite"),
    (["--delta", "-0.1"], "'delta' must be >= 0"),
    (["--proxies-per-class", "0"], "'proxies_per_class' must be >= 1"),
    (["--epochs", "0"], "'epochs' must be >= 1"),
    (["--eval-batch-size", "0"], "'eval_batch_size' must be >= 1"),
    (["--num-workers", "-1"], "'num_workers' must be >= 0"),
    (["--threads", "-2"], "'threads' must be >= 0"),
    (["--seed", "-1"], r"'seed' must be in \[0, 4294967295\]"),
    (["--seeds", "0"], "'seeds' must be >= 1"),
    (["--resize-size", "0"], "'resize_size' must be >= 1"),
    (["--synthetic-dim", "1"], "'synthetic_dim' must be >= 2"),
    (["--synthetic-train-classes", "1"], "'synthetic_train_classes' must be >= 2"),
    (["--synthetic-spread", "-1"], "'synthetic_spread' must be >= 0"),
    (["--experiments", "synthetic", "--synthetic-centres", "1", "--synthetic-samples", "1"],
     "synthetic_centres \\* synthetic_samples must be >= 2"),
    # lists: empty, items of the wrong type or range, repeated
    (["--recall-ks", "[]"], "'recall_ks' must not be empty"),
    (["--recall-ks", "0"], "each item of config key 'recall_ks' must be >= 1, got 0"),
    (["--ndcg-ks", "-2"], "each item of config key 'ndcg_ks' must be >= 1, got -2"),
    (["--recall-ks", "a,b"], "each item of config key 'recall_ks' must be int, got 'a'"),
    (["--recall-ks", "1.5"], "each item of config key 'recall_ks' must be int"),
    (["--recall-ks", "true"], "each item of config key 'recall_ks' must be int"),
    (["--recall-ks", "1,4,1"], r"'recall_ks' lists \[1\] more than once"),
    (["--losses", "mpa,mpa"], r"'losses' lists \['mpa'\] more than once"),
    (["--losses", "[]"], "'losses' must not be empty"),
    (["--experiments", "digits,digits"], r"'experiments' lists \['digits'\] more than once"),
    (["--losses", "mpa,triplet"], "each item of config key 'losses' must be one of"),
    # where the runs go, and which run a checkpoint continues
    (["--name", "../../x"], "'name' must be a plain folder name"),
    (["--name", "a/b"], "'name' must be a plain folder name"),
    (["--name", ".."], "'name' must be a plain folder name"),
    (["--name", ""], "'name' must be a plain folder name"),
    (["--resume", "last.pt", "--experiments", "digits", "--seeds", "2", "--losses", "mpa"],
     r"continues one run, but this config has 1 loss\(es\) x 2 seed\(s\) = 2 runs"),
    (["--resume", "last.pt", "--experiments", "digits", "--seeds", "1", "--losses", "mpa,mpa_ap"],
     "= 2 runs"),
    (["--resume", "last.pt", "--seeds", "1", "--losses", "mpa"],
     r"runs the experiments \['digits', 'synthetic'\]; pick one"),
    # relations and shapes
    (["--device", "gpu"], "'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["--device", "cuda:x"], "'device' must be"),
    (["--backbone", "mlp", "--experiments", "digits"], "backbone 'mlp' does not fit dataset"),
    (["--pretrained", "w.pth", "--experiments", "digits"], "has no pretrained weights"),
    (["--set", "loss_args.mpa=3"], "loss_args.mpa must be a dict"),
    (["--set", "loss_args=5"], "'loss_args' must be dict, got 5"),
    (["--set", "loss_args.soft_triple.alpha.x=1"], "loss_args.soft_triple.alpha holds 20.0"),
])
def test_bad_setting_is_refused_naming_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        config.from_argv(argv)



def _refusal(argv, capsys) -> str:
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("python -m training: error: ") and "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["--lr-decay", "0"], "'lr_decay' must be in"),
    (["--set", "loss_args.mpa.alpha=-1"], "loss 'mpa': alpha must be > 0"),
    (["--set", "loss_args.proxy_nca.scale=0"], "loss 'proxy_nca': scale must be > 0"),
    (["--set", "loss_args.mpa.alpha=abc"], "loss 'mpa': alpha must be a real number"),
    (["--set", "loss_args.mpa.margin=0.1"], r"loss_args.mpa: \['margin'\] are not arguments"),
    (["--experiments", "digits", "--backbone", "resnet50", "--pretrained", "no/such.pth"],
     "'pretrained': no file no/such.pth"),
    (["--experiments", "digits", "--losses", "mpa", "--seeds", "1", "--resume", "no/such.pt"],
     "checkpoint no/such.pt not found"),
    (["--config", "cub", "--image-size", "40", "--resize-size", "48", "--losses", "mpa"],
     "backbone 'bn_inception' cannot take a 40x40 image"),
])
def test_refused_before_any_data_is_read(argv, message, capsys, no_data, tmp_path):
    line = _refusal(argv + ["--out-dir", str(tmp_path)], capsys)
    assert re.search(message, line), line


def test_cuda_device_without_cuda_is_refused(capsys, no_data, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _refusal(["--device", "cuda", "--out-dir", str(tmp_path)], capsys)
    assert "config key 'device' is 'cuda'" in line and "--device cpu" in line


def test_missing_dataset_is_one_line(capsys, tmp_path):
    line = _refusal(["--config", "cub", "--data-root", str(tmp_path), "--losses", "mpa",
                     "--out-dir", str(tmp_path / "runs")], capsys)
    assert "CUB-200-2011 not found under --data-root" in line
    assert "CUB_200_2011/images.txt" in line
