"""Configs: the shipped protocol values, command-line overrides, and clear errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training import config
from training.config import ConfigError


def _shipped(name: str) -> dict:
    (cfg,) = config.build(config.load_file(name)[1])
    return cfg


@pytest.mark.parametrize("name,batch,k,epochs,recall,ndcg", [
    ("cub", 180, 10, 60, [1, 2, 4, 8], [2, 4, 8]),
    ("cars", 64, 10, 60, [1, 2, 4, 8], [2, 4, 8]),
    ("sop", 32, 2, 100, [1, 10, 100], [10, 100]),
])
def test_dataset_configs_are_the_papers_protocol(name, batch, k, epochs, recall, ndcg):
    cfg = _shipped(name)
    assert (cfg["dataset"], cfg["backbone"], cfg["embedding_size"], cfg["gem_p"]) == (
        name, "bn_inception", 512, 3.0)
    assert (cfg["batch_size"], cfg["proxies_per_class"], cfg["epochs"]) == (batch, k, epochs)
    assert (cfg["lr"], cfg["proxy_lr"], cfg["lr_step"], cfg["lr_decay"]) == (1e-4, 1e-2, 20, 0.5)
    assert (cfg["tau"], cfg["gamma"], cfg["delta"]) == (0.2, 0.1, 0.1)
    assert (cfg["image_size"], cfg["resize_size"], cfg["hflip"]) == (224, 256, True)
    assert (cfg["recall_ks"], cfg["ndcg_ks"]) == (recall, ndcg)
    assert {"mpa", "mpa_dw", "mpa_ap", "proxy_anchor", "soft_triple"} <= set(cfg["losses"])


def test_default_config_is_two_experiments():
    name, configs, _ = config.from_argv([])
    assert name == "default"
    assert [(c["name"], c["dataset"]) for c in configs] == [("digits", "digits"),
                                                           ("synthetic", "synthetic")]
    assert all(c["device"] == "auto" and c["pretrained"] == "" for c in configs)


def test_command_line_overrides_every_experiment():
    _, configs, _ = config.from_argv([
        "--lr", "3e-4", "--losses", "mpa,proxy_anchor", "--hflip", "false", "--compile",
        "--set", "recall_ks=[1,10]", "--set", "loss_args.mpa.alpha=16", "--set", "epochs=2"])
    for cfg in configs:
        assert cfg["lr"] == 3e-4 and cfg["losses"] == ["mpa", "proxy_anchor"]
        assert cfg["hflip"] is False and cfg["compile"] is True and cfg["epochs"] == 2
        assert cfg["recall_ks"] == [1, 10]
        assert cfg["loss_args"]["mpa"] == {"alpha": 16}
        assert cfg["loss_args"]["soft_triple"] == {"alpha": 20.0, "delta": 0.01}
    assert config.SCHEMA["loss_args"].default == {}  # overrides never leak into the defaults


def test_experiments_selects_suite_entries():
    _, configs, _ = config.from_argv(["--experiments", "synthetic"])
    assert [c["name"] for c in configs] == ["synthetic"]
    with pytest.raises(ConfigError, match="no experiment named"):
        config.from_argv(["--experiments", "mnist"])


@pytest.mark.parametrize("argv,message", [
    (["--set", "nope=1"], "unknown config key 'nope'"),
    (["--epochs", "ten"], "'epochs'"),
    (["--epochs", "1.5"], "must be int"),
    (["--losses", "mpa,triplet"], "'losses' must be one of"),
    (["--dataset", "mnist"], "must be one of"),
    (["--hflip", "maybe"], "must be a boolean"),
    (["--set", "lr"], "expects key=value"),
    (["--set", "suite=[]"], "only be set in a config file"),
    (["--image-size", "300"], "resize_size must be >= image_size"),
    (["--batch-size", "0"], "'batch_size' must be >= 1"),
    (["--set", "loss_args.triplet.margin=1"], "loss_args keys must be loss names"),
    (["--config", "no/such.json"], "neither a shipped config"),
])
def test_bad_config_is_a_clear_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        config.from_argv(argv)


def test_config_file_by_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"dataset": "synthetic", "backbone": "mlp", "epochs": 3}))
    name, (cfg,), _ = config.from_argv(["--config", str(path), "--epochs", "4"])
    assert name == "mine" and cfg["epochs"] == 4 and cfg["backbone"] == "mlp"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        config.from_argv(["--config", str(path)])


_WITHOUT_TRAIN_EXTRA = """
import sys
from pathlib import Path
for module in ("PIL", "scipy", "sklearn", "tqdm", "matplotlib"):
    sys.modules[module] = None  # import fails as if not installed
from training.cli import main
code = main(sys.argv[1:])
print("exit", code)
"""


def test_help_lists_every_key_without_the_train_extra():
    """--help needs no optional package; a run without the [train] extra names the extra."""
    def run(*argv):
        return subprocess.run([sys.executable, "-c", _WITHOUT_TRAIN_EXTRA, *argv],
                              capture_output=True, text=True)

    shown = run("--help")
    assert shown.returncode == 0, shown.stderr
    for opt in config.OPTIONS:
        if opt.name != "suite":
            assert "--" + opt.name.replace("_", "-") in shown.stdout, opt.name
    assert "--set KEY=VALUE" in shown.stdout
    refused = run("--epochs", "1")
    assert "exit 2" in refused.stdout and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "python -m training: error: training needs the [train] extra, which is not installed "
        "(no module PIL, scipy, sklearn, tqdm, matplotlib): pip install \"mpa-kernels[train]\""]


def test_readme_lists_the_keys_a_resume_may_change():
    """The README's resume paragraph names exactly the schema's resumable keys."""
    text = (Path(config.__file__).parent / "README.md").read_text()
    paragraph = text[text.index("A resume continues the saved run exactly"):].split("\n\n")[0]
    named = set(re.findall(r"`(\w+)`", paragraph)) & set(config.SCHEMA)
    assert named == {o.name for o in config.OPTIONS if o.resumable}
