"""KD baselines against direct formulas; RKD against an explicit-loop numpy implementation; the builder."""

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.losses.ekd import EKDLoss
from pipeline.losses.feature import CosineLoss, FeatureL2Loss
from pipeline.losses.registry import build_kd_loss
from pipeline.losses.rkd import RKDLoss


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1.0, 0.5 * d ** 2, d - 0.5)


def _rkd_loops(s, t, w_d=25.0, w_a=50.0):
    """Park et al.'s RKD written with explicit loops over pairs and triplets (float64)."""
    n = len(s)

    def distances(x):
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = np.sqrt(np.sum((x[i] - x[j]) ** 2))
        return d / (d.sum() / (n * (n - 1)))

    def angles(x):
        a = np.zeros((n, n, n))
        for v in range(n):  # vertex
            for i in range(n):
                for k in range(n):
                    if i != v and k != v:
                        e1, e2 = x[i] - x[v], x[k] - x[v]
                        a[v, i, k] = e1 @ e2 / (np.linalg.norm(e1) * np.linalg.norm(e2))
        return a

    return (w_d * _smooth_l1(distances(s), distances(t)).mean()
            + w_a * _smooth_l1(angles(s), angles(t)).mean())


def _data(seed, n=6, dim=4, scale=1.0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, dim)) * scale
    return s, s + 0.5 * rng.normal(size=(n, dim)), np.arange(n) % 3


def test_feature_losses_match_direct_formulas():
    s, t, y = _data(0, scale=3.0)
    l2 = FeatureL2Loss()(torch.tensor(s), torch.tensor(t), torch.tensor(y)).item()
    cos = CosineLoss()(torch.tensor(s), torch.tensor(t), torch.tensor(y)).item()
    expected_l2 = np.mean([np.sum((_unit(s)[i] - _unit(t)[i]) ** 2) for i in range(len(s))])
    expected_cos = np.mean([1 - s[i] @ t[i] / (np.linalg.norm(s[i]) * np.linalg.norm(t[i])) for i in range(len(s))])
    assert l2 == pytest.approx(expected_l2, rel=1e-12)
    assert cos == pytest.approx(expected_cos, rel=1e-12)
    assert l2 == pytest.approx(2 * cos, rel=1e-12)


@pytest.mark.parametrize("weights", [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
def test_rkd_matches_explicit_loops_in_value_and_gradient(weights):
    s, t, y = _data(1, scale=0.3)  # small scale: some differences fall in smooth-L1's quadratic zone
    loss_fn = RKDLoss(*weights)
    st = torch.tensor(s, requires_grad=True)
    value = loss_fn(st, torch.tensor(t), torch.tensor(y))
    value.backward()
    assert value.item() == pytest.approx(_rkd_loops(s, t, *weights), rel=1e-10)
    h = 1e-6
    fd = np.zeros_like(s)
    for idx in np.ndindex(*s.shape):
        up, down = s.copy(), s.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (_rkd_loops(up, t, *weights) - _rkd_loops(down, t, *weights)) / (2 * h)
    np.testing.assert_allclose(st.grad.numpy(), fd, rtol=1e-5, atol=1e-8)


def test_losses_ignore_autocast_and_low_precision_inputs():
    s, t, y = (torch.tensor(a, dtype=torch.float32) for a in _data(2, n=10, dim=8))
    thresholds = [0.1, 0.3, 0.5, 0.6, 0.7, 0.8]
    for make in (lambda: EKDLoss(teacher_thresholds=thresholds, topk=8, temperature=0.05), RKDLoss, CosineLoss):
        plain = make()(s, t, y).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = make()(s, t, y).item()
        assert autocast == plain


def test_build_kd_loss_names_weights_and_errors():
    assert build_kd_loss("none") is None
    assert isinstance(build_kd_loss("l2"), FeatureL2Loss)
    assert isinstance(build_kd_loss("cosine"), CosineLoss)
    ekd = build_kd_loss("ekd", mode="reference", topk=10)
    assert isinstance(ekd, EKDLoss) and ekd.mode == "reference" and ekd.topk == 10
    s, t, y = (torch.tensor(a) for a in _data(3))
    for name, kw in [("l2", {}), ("cosine", {}), ("rkd", {"angle_weight": 3.0}), ("ekd", {"mode": "reference"})]:
        one = build_kd_loss(name, **kw)(s, t, y).item()
        assert build_kd_loss(name, weight=2.5, **kw)(s, t, y).item() == pytest.approx(2.5 * one, rel=1e-12)
    with pytest.raises(PipelineError, match="unknown KD loss"):
        build_kd_loss("fitnet")
    with pytest.raises(PipelineError, match="bad option"):
        build_kd_loss("rkd", temperature=2.0)
    with pytest.raises(PipelineError, match="equal embedding sizes"):
        build_kd_loss("l2")(torch.zeros(3, 4), torch.ones(3, 5), torch.zeros(3, dtype=torch.int64))
