"""pytorch-metric-learning compatibility: its constructor names, its forward signature, its
state_dicts, and its own trainer (``trainers.MetricLossOnly``) driving our modules in place of its
own, step for step with the same losses and the same proxies (fp64)."""

import copy
import warnings

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import trainers

import mpa_kernels

F64 = torch.float64
C, D = 5, 6

# (ours, theirs), built with the same (pytorch-metric-learning) argument names.
PAIRS = {
    "soft_triple": (
        lambda: mpa_kernels.SoftTripleLoss(C, D, centers_per_class=3, la=20, gamma=0.1,
                                           margin=0.01, tau=0.0, dtype=F64),
        lambda: pml_losses.SoftTripleLoss(C, D, centers_per_class=3, la=20, gamma=0.1,
                                          margin=0.01)),
    "proxy_anchor": (
        lambda: mpa_kernels.ProxyAnchorLoss(C, D, margin=0.1, alpha=32, dtype=F64),
        lambda: pml_losses.ProxyAnchorLoss(C, D, margin=0.1, alpha=32)),
    "proxy_nca": (
        lambda: mpa_kernels.ProxyNCALoss(C, D, softmax_scale=3.0, dtype=F64),
        lambda: pml_losses.ProxyNCALoss(C, D, softmax_scale=3.0)),
}


def _pair(name):
    make_ours, make_theirs = PAIRS[name]
    theirs = make_theirs().to(F64)
    ours = make_ours()
    ours.load_pml_state_dict(theirs.state_dict())  # the documented one-line import
    return ours, theirs


def _proxies_of(pml_loss):
    return pml_loss.fc.T if hasattr(pml_loss, "fc") else pml_loss.proxies


def _train(loss_fn, trunk, data, labels):
    """Three iterations of pytorch-metric-learning's own trainer; the loss of each."""
    seen = []
    models = {"trunk": trunk, "embedder": torch.nn.Identity()}
    optimizers = {"trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.1),
                  "metric_loss_optimizer": torch.optim.SGD(loss_fn.parameters(), lr=0.5)}
    trainer = trainers.MetricLossOnly(
        models, optimizers, batch_size=12, loss_funcs={"metric_loss": loss_fn},
        dataset=torch.utils.data.TensorDataset(data, labels), dtype=F64,
        dataloader_num_workers=0, iterations_per_epoch=3,
        end_of_iteration_hook=lambda t: seen.append(t.losses["metric_loss"].item()))
    torch.manual_seed(7)  # the same batches for both runs
    with warnings.catch_warnings():  # its progress bar formats the loss tensor
        warnings.simplefilter("ignore", UserWarning)
        trainer.train(num_epochs=1)
    return seen


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_pml_trainer_with_our_module_gives_pml_losses(name):
    ours, theirs = _pair(name)
    torch.testing.assert_close(ours.proxies.detach(), _proxies_of(theirs).detach(), rtol=0, atol=0)
    trunk = torch.nn.Linear(4, D).to(F64)
    data, labels = torch.randn(36, 4, dtype=F64), torch.arange(36) % C
    expected = _train(theirs, copy.deepcopy(trunk), data, labels)
    got = _train(ours, copy.deepcopy(trunk), data, labels)
    assert len(got) == 3
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # The proxies moved, identically: the gradients agree as well.
    assert not torch.equal(ours.proxies.detach(), _proxies_of(_pair(name)[1]).detach())
    torch.testing.assert_close(ours.proxies.detach(), _proxies_of(theirs).detach(),
                               rtol=1e-9, atol=1e-12)


def test_pml_forward_signature():
    ours, theirs = _pair("proxy_anchor")
    x, labels = torch.randn(8, D, dtype=F64), torch.arange(8) % C
    expected = theirs(x, labels, None, None, None)
    assert ours(x, labels, None, None, None).item() == pytest.approx(expected.item(), rel=1e-12)
    assert ours(x, labels, ref_emb=x, ref_labels=labels).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="indices_tuple .* not supported.*reduction='none'"):
        ours(x, labels, (torch.arange(2), torch.arange(2), torch.arange(2)))
    with pytest.raises(ValueError, match="ref_emb/ref_labels are not supported"):
        ours(x, labels, ref_emb=x.clone(), ref_labels=labels)


def test_pml_names_are_aliases_not_a_second_setting():
    st = mpa_kernels.SoftTripleLoss(C, D, centers_per_class=4, la=10.0, margin=0.05)
    assert (st.proxies_per_class, st.alpha, st.delta) == (4, 10.0, 0.05)
    assert mpa_kernels.ProxyNCALoss(C, D, softmax_scale=2.0).scale == 2.0
    with pytest.raises(TypeError, match="give delta or its pytorch-metric-learning name margin"):
        mpa_kernels.ProxyAnchorLoss(C, D, delta=0.2, margin=0.3)
    with pytest.raises(TypeError):  # PML's 4th positional (la) would be our alpha: keyword-only
        mpa_kernels.SoftTripleLoss(C, D, 10, 20)


def test_pml_state_dict_of_another_shape_is_refused():
    _, theirs = _pair("soft_triple")
    with pytest.raises(ValueError, match=r"\(6, 15\).*needs \(10, 6\)"):
        mpa_kernels.SoftTripleLoss(C, D, centers_per_class=2).load_pml_state_dict(
            theirs.state_dict())
    with pytest.raises(ValueError, match="no 'proxies'"):
        mpa_kernels.ProxyAnchorLoss(C, D).load_pml_state_dict(theirs.state_dict())
