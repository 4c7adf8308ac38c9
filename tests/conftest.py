"""Devices and implementations every test runs over: the fast pure-PyTorch path ("aten") and the
readable reference always, the compiled kernel when built, CUDA when a GPU is present (CUDA cases are
skipped, never failed, without one)."""

import pytest
import torch

import torch_xent

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def impls_for(device):
    return ["aten", "reference"] + (["native"] if torch_xent.native_available(device) else [])


DEVICE_IMPLS = [(d, i) for d in DEVICES for i in impls_for(d)]
DEVICE_IMPL_IDS = [f"{d}-{i}" for d, i in DEVICE_IMPLS]


@pytest.fixture(params=DEVICE_IMPLS, ids=DEVICE_IMPL_IDS)
def device_impl(request):
    return request.param


def pytest_report_header(config):
    return "torch_xent implementations under test: " + ", ".join(DEVICE_IMPL_IDS)


@pytest.fixture(autouse=True)
def _aten_runs_its_own_code(monkeypatch):
    """Small CPU problems of impl="aten" run PyTorch's own loss (torch_xent.aten.runs_torch_loss): in
    the tests the fused pure-PyTorch code runs at every size instead, so that it is what the oracle
    checks (tests/test_aten.py checks the hand-over to F.cross_entropy itself)."""
    monkeypatch.setattr(torch_xent.aten, "TORCH_LOSS_ELEMENTS", 0)
