"""Backbones: BN-Inception's shape and checkpoint layout, GeM, the embedding head, loss factory."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mpa_kernels
from training import backbones
from training.config import ConfigError, build
from training.engine import make_loss


def _cfg(**values) -> dict:
    (cfg,) = build(values)
    return cfg


def test_bn_inception_embeds_a_224_image_into_512_unit_vector():
    with pytest.warns(UserWarning, match="random initialisation"):
        net = backbones.build(_cfg(backbone="bn_inception")).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 512)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(1))


def test_bn_inception_checkpoint_layout_round_trips(tmp_path):
    """A checkpoint in the pretrainedmodels layout (with its 1000-way ``last_linear`` and without
    ``num_batches_tracked``, like bn_inception-52deb4733.pth) loads through the weight path."""
    src = backbones.BNInception()
    for m in src.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "conv1_7x7_s2.weight" in state and "inception_3a_1x1_bn.running_var" in state
    assert "inception_5b_pool_proj_bn.bias" in state and "inception_3c_1x1.weight" not in state
    state["last_linear.weight"] = torch.zeros(1000, 1024)
    state["last_linear.bias"] = torch.zeros(1000)
    path = tmp_path / "bn_inception.pth"
    torch.save(state, path)
    net = backbones.build(_cfg(backbone="bn_inception", pretrained=str(path)))
    for key, value in src.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(net.trunk.state_dict()[key], value), key

    del state["inception_4a_1x1.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \['inception_4a_1x1.weight'\], unexpected "
                                         r"\['extra.weight'\]"):
        backbones.build(_cfg(backbone="bn_inception", pretrained=str(path)))


def test_missing_weight_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        backbones.build(_cfg(backbone="bn_inception", pretrained=str(tmp_path / "nope.pth")))


def test_resnet50_needs_torchvision_or_timm():
    if importlib.util.find_spec("torchvision") or importlib.util.find_spec("timm"):
        with pytest.warns(UserWarning, match="random initialisation"):
            net = backbones.build(_cfg(backbone="resnet50", embedding_size=16)).eval()
        with torch.no_grad():
            assert net(torch.randn(1, 3, 64, 64)).shape == (1, 16)
    else:
        with pytest.raises(ImportError, match="torchvision or timm"):
            backbones.build(_cfg(backbone="resnet50"))


def test_gem_is_the_generalised_mean():
    x = torch.rand(2, 3, 4, 5) + 0.1
    torch.testing.assert_close(backbones.GeM(1.0)(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(backbones.GeM(3.0)(x), x.pow(3).mean(dim=(2, 3)).pow(1 / 3))
    assert torch.all(backbones.GeM(50.0)(x) <= x.amax(dim=(2, 3)) + 1e-6)


def test_small_backbones_embed_and_normalise():
    cnn = backbones.build(_cfg(backbone="small_cnn", hidden_size=16, embedding_size=8))
    assert cnn(torch.randn(4, 3, 16, 16)).shape == (4, 8)
    mlp = backbones.build(_cfg(backbone="mlp", dataset="synthetic", hidden_size=16,
                               embedding_size=8), input_dim=5)
    y = mlp(torch.randn(4, 5))
    torch.testing.assert_close(y.norm(dim=1), torch.ones(4))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in mlp.modules())


@pytest.mark.parametrize("name,cls", [("mpa", mpa_kernels.MPALoss),
                                      ("soft_triple", mpa_kernels.SoftTripleLoss),
                                      ("proxy_anchor", mpa_kernels.ProxyAnchorLoss),
                                      ("proxy_nca", mpa_kernels.ProxyNCALoss)])
def test_make_loss_passes_the_arguments_each_loss_takes(name, cls):
    cfg = _cfg(proxies_per_class=3, alpha=16.0, delta=0.2, tau=0.5, backend="reference",
               embedding_size=8, loss_args={"soft_triple": {"alpha": 20.0}})
    loss = make_loss(cfg, name, num_classes=5)
    assert isinstance(loss, cls) and loss.backend == "reference"
    k = 1 if name in ("proxy_anchor", "proxy_nca") else 3
    assert loss.proxies.shape == (5 * k, 8)
    if name == "mpa":
        assert (loss.alpha, loss.delta, loss.tau) == (16.0, 0.2, 0.5)
    if name == "soft_triple":
        assert loss.alpha == 20.0


def test_make_loss_rejects_unknown_loss_args():
    cfg = _cfg(loss_args={"proxy_anchor": {"gamma": 0.3}})
    with pytest.raises(ConfigError, match="not arguments of ProxyAnchorLoss"):
        make_loss(cfg, "proxy_anchor", num_classes=3)
