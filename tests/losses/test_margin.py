"""MarginHead against direct formula computations, finite differences and full-FC restrictions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from pipeline.errors import PipelineError
from pipeline.losses.margin import MarginHead


def _direct_logits(emb, weight, labels, kind, s, m):
    """Margin logits from the published formulas, in numpy float64 via angles."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = np.clip(e @ w.T, -1, 1)
    logits = cos.copy()
    rows = np.arange(len(labels))
    if kind == "arcface":
        logits[rows, labels] = np.cos(np.arccos(cos[rows, labels]) + m)
    else:
        logits[rows, labels] = cos[rows, labels] - m
    return s * logits


def _direct_ce(logits, labels):
    rows = np.arange(len(labels))
    top = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_z - logits[rows, labels]))


def _case(seed=0, batch=6, classes=7, dim=5):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=g)
    return emb, labels


@pytest.mark.parametrize("kind, m", [("arcface", 0.5), ("cosface", 0.4), ("arcface", 0.3)])
def test_logits_and_loss_match_formula(kind, m):
    emb, labels = _case()
    head = MarginHead(7, 5, kind=kind, s=64.0, m=m if m not in (0.5, 0.4) else None).double()
    assert head.m == m
    logits, same_labels = head.logits(emb, labels)
    expected = _direct_logits(emb.numpy(), head.weight.detach().numpy(), labels.numpy(), kind, 64.0, m)
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-10, atol=1e-9)
    assert torch.equal(same_labels, labels)
    assert head(emb, labels).item() == pytest.approx(_direct_ce(expected, labels.numpy()), rel=1e-10)


def test_arcface_past_pi_uses_the_linear_continuation():
    head = MarginHead(2, 3, kind="arcface", s=1.0).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64))
    emb = torch.tensor([[-1.0, 0.05, 0.0]], dtype=torch.float64)  # theta close to pi for class 0
    cos = float(F.normalize(emb)[0, 0])
    assert cos < math.cos(math.pi - 0.5)
    logits, _ = head.logits(emb, torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(cos - 0.5 * math.sin(0.5), rel=1e-12)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_gradients_match_finite_differences(kind):
    emb, labels = _case(seed=1, batch=4, classes=5, dim=3)
    head = MarginHead(5, 3, kind=kind, s=8.0).double()
    weight = head.weight.detach().clone().requires_grad_(True)
    emb.requires_grad_(True)

    def loss(e, w):
        return functional_call(head, {"weight": w}, (e, labels))

    assert torch.autograd.gradcheck(loss, (emb, weight), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_gradient_is_finite_at_cos_plus_minus_one(kind):
    head = MarginHead(3, 4, kind=kind)
    emb = torch.stack([head.weight[0].detach(), -head.weight[1].detach(), head.weight[2].detach()]).clone()
    emb.requires_grad_(True)
    loss = head(emb, torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_partial_fc_samples_positives_and_equals_restricted_full_fc():
    torch.manual_seed(0)
    classes, dim = 50, 8
    head = MarginHead(classes, dim, kind="arcface", sample_rate=0.2)
    full = MarginHead(classes, dim, kind="arcface")
    full.load_state_dict(head.state_dict())
    emb = torch.randn(12, dim)
    labels = torch.tensor([3, 3, 17, 42, 17, 8, 8, 3, 42, 42, 17, 8])
    loss = head(emb, labels)
    index = head.last_sampled_classes
    assert index.numel() == math.ceil(0.2 * classes)
    assert torch.equal(index, torch.unique(index))  # sorted, distinct
    assert set(labels.tolist()) <= set(index.tolist())
    # full-FC logits restricted to the sampled columns, labels renumbered among them
    full_logits, _ = full.logits(emb, labels)
    remapped = torch.tensor([index.tolist().index(c) for c in labels.tolist()])
    expected = F.cross_entropy(full_logits[:, index], remapped)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    rows_with_grad = torch.nonzero(head.weight.grad.abs().sum(1)).reshape(-1)
    assert torch.equal(rows_with_grad, index)


def test_partial_fc_draws_change_and_fall_back_to_positives():
    torch.manual_seed(1)
    head = MarginHead(40, 4, sample_rate=0.1)  # 4 classes per step
    labels = torch.tensor([0, 1])
    draws = {tuple(head.sample_classes(labels)[0].tolist()) for _ in range(20)}
    assert len(draws) > 1 and all({0, 1} <= set(d) and len(d) == 4 for d in draws)
    many = torch.tensor([5, 9, 11, 20, 33, 39])  # more positives than the sample size: exactly them
    index, remapped = head.sample_classes(many)
    assert index.tolist() == [5, 9, 11, 20, 33, 39] and remapped.tolist() == list(range(6))
    assert MarginHead(10, 4, sample_rate=0.15).num_sample == 2  # ceil(1.5)


def test_bad_arguments_raise():
    with pytest.raises(PipelineError, match="labels must lie"):
        MarginHead(4, 3)(torch.randn(2, 3), torch.tensor([0, 4]))
    with pytest.raises(PipelineError, match="kind"):
        MarginHead(4, 3, kind="sphereface")
    with pytest.raises(PipelineError, match="sample_rate"):
        MarginHead(4, 3, sample_rate=0.0)
