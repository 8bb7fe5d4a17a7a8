"""The input projection's oneDNN route (a 1x1 channels-last convolution) computes the matmul's product."""

from __future__ import annotations

import pytest
import torch

from pararnn_torch import ParaLSTM, projection
from pararnn_torch.projection import (
    MIN_ONEDNN_ROWS,
    onednn_backward_products,
    onednn_product,
    project_rows,
    uses_onednn,
)


def test_onednn_product_and_its_gradients_equal_the_matmul():
    torch.manual_seed(0)
    rows = torch.randn(300, 48, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(48, 96, dtype=torch.float32, requires_grad=True)
    grad = torch.randn(300, 96)
    out = onednn_product(rows, weight)
    assert out.shape == (300, 96) and out.is_contiguous()
    d_rows, d_weight = torch.autograd.grad(out, (rows, weight), grad)
    ref = rows @ weight
    ref_rows, ref_weight = torch.autograd.grad(ref, (rows, weight), grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_rows, ref_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_weight, ref_weight, rtol=1e-5, atol=1e-4)
    # the backward products alone (as the bench's floor times them) are autograd's
    d_image, _ = onednn_backward_products(rows.detach(), weight.detach(), grad, [True, False])
    _, d_filters = onednn_backward_products(rows.detach(), weight.detach(), grad, [False, True])
    torch.testing.assert_close(d_image.permute(0, 2, 3, 1).reshape(300, 48), ref_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_filters.reshape(96, 48).t(), ref_weight, rtol=1e-5, atol=1e-4)


def test_route_needs_enough_float32_cpu_rows(monkeypatch):
    monkeypatch.setattr(projection, "onednn_available", lambda: True)
    x = torch.zeros(1, dtype=torch.float32)
    assert uses_onednn(MIN_ONEDNN_ROWS, x)
    assert not uses_onednn(MIN_ONEDNN_ROWS - 1, x)  # one token of decode keeps the plain matmul
    assert not uses_onednn(MIN_ONEDNN_ROWS, x.double())  # oneDNN convolutions are float32 here
    monkeypatch.setattr(projection, "onednn_available", lambda: False)
    assert not uses_onednn(MIN_ONEDNN_ROWS, x)


@pytest.mark.parametrize("route", [True, False])
def test_layer_is_the_same_by_either_route(monkeypatch, route):
    """A layer over 2 x 600 positions (above the threshold) by the oneDNN route equals the matmul route."""
    torch.manual_seed(0)
    layer = ParaLSTM(32, 32, mode="sequential")
    x = torch.randn(2, 600, 32, requires_grad=True)
    monkeypatch.setattr(projection, "onednn_available", lambda: route)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), (x, layer.weight))
    monkeypatch.setattr(projection, "onednn_available", lambda: False)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, layer.weight))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_project_rows_keeps_leading_dimensions(monkeypatch):
    monkeypatch.setattr(projection, "onednn_available", lambda: True)
    x = torch.randn(3, 400, 16)
    weight = torch.randn(16, 8)
    torch.testing.assert_close(project_rows(x, weight), x @ weight, rtol=1e-5, atol=1e-5)
