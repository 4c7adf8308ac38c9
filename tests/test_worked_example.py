"""The worked example the project started from (docs/gradient.md; its inputs and published figures ship in
torch_xent/data/worked_example.json): iris, x = petal length and width of a Setosa, W with rows for the
classes Setosa and non-Setosa, b = 0. The numbers are worked out by hand here, with Python floats only."""

import math

import pytest
import torch
import torch.nn.functional as F

import torch_xent
from conftest import DEVICE_IMPLS, DEVICE_IMPL_IDS
from helpers import worked_example

EXAMPLE = worked_example()
X, W, SETOSA = EXAMPLE["x"], EXAMPLE["W"], EXAMPLE["target"]
PUBLISHED_Z, PUBLISHED_A = EXAMPLE["published"]["z"], EXAMPLE["published"]["softmax"]


def by_hand():
    """z, softmax and dL/dW = (p - onehot) x^T, with Python floats only (independent of torch)."""
    z = [sum(w_i * x_i for w_i, x_i in zip(row, X)) for row in W]
    e = [math.exp(v) for v in z]
    p = [v / sum(e) for v in e]
    y = [1.0 if j == SETOSA else 0.0 for j in range(2)]
    grad_w = [[(p[j] - y[j]) * x_i for x_i in X] for j in range(2)]
    return z, p, grad_w


def test_hand_computation_reproduces_the_published_figures():
    z, p, _ = by_hand()
    assert z == pytest.approx(PUBLISHED_Z, abs=1e-12)
    assert p == pytest.approx(PUBLISHED_A, abs=5e-7)


@pytest.mark.parametrize("device,impl", DEVICE_IMPLS, ids=DEVICE_IMPL_IDS)
def test_torch_xent_gives_the_worked_example_gradient(device, impl):
    z_ref, p_ref, grad_ref = by_hand()
    w = torch.tensor(W, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.tensor(X, dtype=torch.float64, device=device)
    z = w @ x  # an unbatched (C,) input with a 0-d target
    loss = torch_xent.cross_entropy(z, torch.tensor(SETOSA, device=device), impl=impl)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(p_ref[SETOSA]), abs=1e-12)
    assert loss.item() == pytest.approx(-math.log(PUBLISHED_A[0]), abs=1e-6)
    assert w.grad.cpu().tolist() == [pytest.approx(row, abs=1e-12) for row in grad_ref]
    # The same through PyTorch's autograd of F.cross_entropy.
    w2 = w.detach().clone().requires_grad_(True)
    F.cross_entropy(w2 @ x, torch.tensor(SETOSA, device=device)).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=1e-12)


def test_accepted_answer_is_wrong_for_the_other_class():
    """The example's accepted answer dH/dW_ij = -P_j (1 - a_j) x_i drops the cross terms of the softmax Jacobian."""
    _, p, grad = by_hand()
    y = [1.0, 0.0]
    accepted = [[-y[j] * (1 - p[j]) * x_i for x_i in X] for j in range(2)]
    # Right for the true class ...
    assert accepted[SETOSA] == pytest.approx(grad[SETOSA], abs=1e-12)
    # ... but it says 0 for the other class, where the truth is a_2 x = [1.358580, 0.286017].
    assert accepted[1] == [0.0, 0.0] or accepted[1] == [-0.0, -0.0]
    assert grad[1] == pytest.approx([PUBLISHED_A[1] * 1.9, PUBLISHED_A[1] * 0.4], abs=1e-6)
    assert grad[1][0] == pytest.approx(1.358580, abs=1e-6)
