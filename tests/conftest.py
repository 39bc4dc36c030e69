"""Shared test set-up.

On a machine without CUDA, Triton kernels run through the interpreter: ``TRITON_INTERPRET`` must be
set before any module that defines a kernel is imported, and conftest.py is imported first.
Compile-only checks (sm_80 / sm_90 without a GPU) run in a subprocess without it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_data(monkeypatch):
    """Reading a dataset fails the test: what the harness checks up front (settings, checkpoints,
    refusals) must come before it."""
    from training import datasets

    def load(cfg):
        raise AssertionError("a dataset was read before the up-front checks finished")

    monkeypatch.setattr(datasets, "load", load)
