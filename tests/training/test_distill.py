"""KD terms of a training step against direct computations: fixed weights, the gradient-ratio scale (running
gradient norms at the embeddings), the warm-up ramp, the one-sided rank loss, and KDConfig's terms."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.losses.config import KDConfig
from pipeline.losses.ekd import EKDLoss
from pipeline.losses.feature import FeatureL2Loss
from pipeline.losses.rank import rank_mse
from pipeline.training.distill import Distillation, KDTerm


class Quadratic(torch.nn.Module):
    """loss = scale * sum((student - teacher)^2): its embedding gradient is 2 * scale * (student - teacher)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, student, teacher, labels):
        return self.scale * (student - teacher).pow(2).sum()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(6, 4, generator=g, requires_grad=True)
    teacher = torch.randn(6, 4, generator=g)
    direction = torch.randn(6, 4, generator=g)
    margin = (embeddings * direction).sum()  # its embedding gradient is `direction`
    return embeddings, teacher, torch.arange(6) % 3, margin, direction


def test_fixed_weights_sum_the_weighted_terms():
    emb, teacher, labels, margin, _ = batch()
    distill = Distillation(targets=torch.zeros(6, 2, 4), terms=[KDTerm("a", Quadratic(1.0), 3.0),
                                                                KDTerm("b", Quadratic(0.5), 0.25)])
    losses = distill.term_losses(emb, teacher, labels)
    total = distill.combine(losses, emb, margin, step=0, steps_per_epoch=10, measure=False)
    direct = (emb - teacher).pow(2).sum()
    torch.testing.assert_close(total, 3.0 * direct + 0.25 * 0.5 * direct)
    assert distill.diagnostics() == {}  # nothing measured


def test_measured_diagnostics_are_the_gradient_norms_at_the_embeddings():
    emb, teacher, labels, margin, direction = batch()
    distill = Distillation(targets=torch.zeros(6, 2, 4), terms=[KDTerm("a", Quadratic(1.0), 3.0)])
    distill.combine(distill.term_losses(emb, teacher, labels), emb, margin, 0, 10, measure=True)
    seen = distill.diagnostics()
    margin_norm = direction.norm().item()
    kd_norm = (2 * (emb - teacher)).norm().item()
    assert math.isclose(seen["grad_norm_margin"], margin_norm, rel_tol=1e-6)
    assert math.isclose(seen["grad_ratio_a"], 3.0 * kd_norm / margin_norm, rel_tol=1e-6)
    assert seen["kd_multiplier_a"] == 3.0 and seen["kd_ramp"] == 1.0


def test_gradient_ratio_scale_keeps_the_wanted_ratio_through_running_norms():
    distill = Distillation(targets=torch.zeros(6, 2, 4), terms=[KDTerm("a", Quadratic(1.0), 0.5)], scale="grad-ratio")
    emb, teacher, labels, margin, direction = batch(0)
    losses = distill.term_losses(emb, teacher, labels)
    total = distill.combine(losses, emb, margin, 0, 10, measure=False)  # grad-ratio always measures
    m1, k1 = direction.norm(), (2 * (emb - teacher)).norm()
    multiplier = 0.5 * m1 / k1  # first step: the running norms are this step's norms
    torch.testing.assert_close(total, multiplier.detach() * losses[0])
    assert math.isclose(distill.diagnostics()["grad_ratio_a"], 0.5, rel_tol=1e-5)
    # second step: EMA (momentum 0.99) of both norms
    emb2, teacher2, labels2, margin2, direction2 = batch(1)
    losses2 = distill.term_losses(emb2, teacher2, labels2)
    total2 = distill.combine(losses2, emb2, margin2, 1, 10, measure=False)
    m2 = 0.99 * m1 + 0.01 * direction2.norm()
    k2 = 0.99 * k1 + 0.01 * (2 * (emb2 - teacher2)).norm()
    torch.testing.assert_close(total2, (0.5 * m2 / k2).detach() * losses2[0])
    assert int(distill.balance.updates) == 2


def test_warmup_ramps_every_term_linearly():
    emb, teacher, labels, margin, _ = batch()
    distill = Distillation(targets=torch.zeros(6, 2, 4), terms=[KDTerm("a", Quadratic(1.0), 2.0)], warmup_epochs=0.5)
    losses = distill.term_losses(emb, teacher, labels)
    direct = 2.0 * (emb - teacher).pow(2).sum()
    for step, ramp in ((0, 1 / 5), (3, 4 / 5), (4, 1.0), (40, 1.0)):  # 0.5 epoch of 10 steps = 5 steps
        torch.testing.assert_close(distill.combine(losses, emb, margin, step, 10, False), ramp * direct)


def test_one_sided_rank_loss_penalises_only_where_the_student_is_worse():
    s = torch.tensor([0.10, 0.50, 0.90])
    t = torch.tensor([0.60, 0.40, 0.95])
    s_thr, t_thr, temp = torch.tensor([0.3, 0.7]), torch.tensor([0.35, 0.65]), 0.05

    def rank(x, thr):
        return torch.sigmoid((x[:, None] - thr[None, :]) / temp).sum(1)

    diff = rank(t, t_thr) - rank(s, s_thr)
    torch.testing.assert_close(rank_mse(s, t, s_thr, t_thr, temp), (diff ** 2).mean())
    torch.testing.assert_close(rank_mse(s, t, s_thr, t_thr, temp, worse=1), (diff.clamp(min=0) ** 2).mean())
    torch.testing.assert_close(rank_mse(s, t, s_thr, t_thr, temp, worse=-1), (diff.clamp(max=0) ** 2).mean())


def test_one_sided_ekd_applies_the_one_sided_rank_loss_to_its_selected_pairs():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    student, teacher = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    loss = EKDLoss(mode="reference", anchors=(2, 5), temperature=0.05, momentum=1.0, topk=10, one_sided=True)
    got = loss(student, teacher, labels)
    stats = loss.last_stats
    rows, cols = torch.triu_indices(8, 8, offset=1)
    s = F.normalize(student, dim=1)
    t_ = F.normalize(teacher, dim=1)
    s_pairs, t_pairs = (s @ s.t())[rows, cols], (t_ @ t_.t())[rows, cols]
    pos, neg = stats["positive_mask"], stats["negative_mask"]
    s_thr, t_thr = stats["student_thresholds"], stats["teacher_thresholds"]
    direct = (0.02 * rank_mse(s_pairs[pos], t_pairs[pos], s_thr, t_thr, 0.05, worse=1)
              + 0.01 * rank_mse(s_pairs[neg], t_pairs[neg], s_thr, t_thr, 0.05, worse=-1))
    torch.testing.assert_close(got, direct)
    symmetric = EKDLoss(mode="reference", anchors=(2, 5), temperature=0.05, momentum=1.0, topk=10)
    assert symmetric(student, teacher, labels) >= got


def test_kd_config_terms():
    thresholds = {"1e-1": 0.1, "1e-2": 0.2, "1e-3": 0.3, "1e-4": 0.4, "1e-5": 0.5, "1e-6": 0.6}
    terms = KDConfig(kd="l2+ekd", l2_weight=20, ekd_weight=5, ekd_temperature=0.05, ekd_one_sided=True,
                     ekd_queue_size=64).terms({"thresholds": thresholds})
    assert [(name, type(loss), weight) for name, loss, weight in terms] == [
        ("l2", FeatureL2Loss, 20), ("ekd", EKDLoss, 5)]
    ekd = terms[1][1]
    assert ekd.temperature == 0.05 and ekd.one_sided and ekd.queue.size == 64
    assert KDConfig(kd="none").terms() == []
    assert [(t[0], t[2]) for t in KDConfig(kd="l2", l2_weight=7).terms()] == [("l2", 7)]
    with pytest.raises(PipelineError, match="--kd ekd needs --pools"):
        KDConfig(kd="l2+ekd").terms(None)
    assert KDConfig(kd="ekd", ekd_mode="reference").terms()[0][1].mode == "reference"  # needs no pools
    with pytest.raises(PipelineError, match="--kd 'fitnet': 'fitnet' is not a method"):
        KDConfig(kd="fitnet")
    with pytest.raises(PipelineError, match="--ekd-temperature 0: must be >= 0.0001"):
        KDConfig(ekd_temperature=0)


def test_l2_term_on_the_gathered_batch_equals_the_formula():
    emb, teacher, labels, margin, _ = batch()
    distill = Distillation(targets=torch.zeros(6, 2, 4), loss=FeatureL2Loss(), weight=20.0)
    total = distill.combine(distill.term_losses(emb, teacher, labels), emb, margin, 0, 10, False)
    direct = (F.normalize(emb, dim=1) - F.normalize(teacher, dim=1)).pow(2).sum(1).mean()
    torch.testing.assert_close(total, 20.0 * direct)
