"""Class-centre distillation (AdaDistill and its relatives) against the official formulas, written here from
fdbtrs/AdaDistill `utils/losses.py` (`AdaptiveAArcFace`, `AdaptiveACosFace`): a (D, C) kernel updated without
gradient, `a = clamp(clamp(cos(s, t), -1, 1) * clamp(cos(kernel[:, y], t), 1e-6, 1), 1e-6, 1)`,
`kernel[:, y] = a * kernel[:, y] + (1 - a) * t`, then margin logits on the normalised kernel and cross-entropy."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.losses.centres import AdaDistill, CentreEMA, TeacherCentres, batch_centre_targets
from pipeline.losses.config import KDConfig
from pipeline.losses.margin import MarginHead
from pipeline.training.distill import Distillation

C, D, IN, B, STEPS = 7, 6, 5, 6, 6


class OfficialAdaptiveHead:
    """The official head, step by step, in float64 (kernel (D, C), labels assumed distinct per batch)."""

    def __init__(self, kernel: torch.Tensor, kind: str, s: float, m: float):
        self.kernel, self.kind, self.s, self.m = kernel.clone(), kind, s, m

    def logits(self, student: torch.Tensor, teacher: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        emb = student / student.norm(dim=1, keepdim=True)
        t = teacher / teacher.norm(dim=1, keepdim=True)
        with torch.no_grad():
            cos_st = F.cosine_similarity(emb, t).clamp(-1, 1)
            lam = F.cosine_similarity(self.kernel[:, label].T, t).clamp(1e-6, 1).view(-1, 1)
            alpha = (cos_st.view(-1, 1) * lam).clamp(1e-6, 1.0).T
            self.kernel[:, label] = alpha * self.kernel[:, label] + (1.0 - alpha) * t.T
        kernel_norm = self.kernel / self.kernel.norm(dim=0, keepdim=True)
        cos = torch.mm(emb, kernel_norm).clamp(-1, 1)
        hot = F.one_hot(label, cos.shape[1]).to(cos.dtype) * self.m
        if self.kind == "arcface":
            return torch.cos(torch.acos(cos) + hot) * self.s
        return (cos - hot) * self.s


def _batch(step: int):
    g = torch.Generator().manual_seed(10 + step)
    x = torch.randn(B, IN, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, D, generator=g, dtype=torch.float64)
    labels = torch.randperm(C, generator=g)[:B]  # distinct: where the official update is well defined
    return x, teacher, labels


@pytest.mark.parametrize("kind, s, m", [("arcface", 64.0, 0.45), ("cosface", 64.0, 0.35)])
def test_adadistill_matches_the_official_head_over_consecutive_steps(kind, s, m):
    torch.manual_seed(0)
    ours_net = torch.nn.Linear(IN, D).double()
    ref_net = torch.nn.Linear(IN, D).double()
    ref_net.load_state_dict(ours_net.state_dict())
    head = MarginHead(C, D, kind=kind, s=s, m=m, learn_centres=False).double()
    assert "weight" not in dict(head.named_parameters())  # no gradient, no optimiser
    official = OfficialAdaptiveHead(head.weight.T.clone(), kind, s, m)
    distill = Distillation(targets=torch.zeros(1, 1, D), head=AdaDistill())
    for step in range(STEPS):
        x, teacher, labels = _batch(step)
        student = ours_net(x)
        distill.update_centres(head.weight, student.detach(), teacher, labels)
        loss = head(student, labels)
        ref_loss = F.cross_entropy(official.logits(ref_net(x), teacher, labels), labels)
        torch.testing.assert_close(head.weight, official.kernel.T, rtol=0, atol=1e-12, msg=f"centres, step {step}")
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10, msg=f"loss, step {step}")
        for net, value in ((ours_net, loss), (ref_net, ref_loss)):
            net.zero_grad()
            value.backward()
        for ours, ref in zip(ours_net.parameters(), ref_net.parameters()):
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-8, atol=1e-10, msg=f"gradient, step {step}")
            assert ours.grad.abs().max() > 1e-4  # the check is not vacuous
        with torch.no_grad():
            for net in (ours_net, ref_net):
                for p in net.parameters():
                    p -= 0.5 * p.grad
    assert 0 < distill.diagnostics()["adadistill/alpha_mean"] <= 1


def test_a_label_met_several_times_moves_to_the_mean_of_its_proposals():
    centres = torch.randn(3, 4, dtype=torch.float64)
    teacher = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    labels = torch.tensor([2, 0, 2, 2, 1])
    alpha = torch.tensor([0.1, 0.5, 0.7, 0.2, 0.9], dtype=torch.float64)
    classes, moved = batch_centre_targets(centres, teacher, labels, alpha)
    assert classes.tolist() == [0, 1, 2]
    for row, c in enumerate(classes.tolist()):
        mine = [i for i in range(5) if labels[i] == c]
        expected = sum(alpha[i] * centres[c] + (1 - alpha[i]) * teacher[i] for i in mine) / len(mine)
        torch.testing.assert_close(moved[row], expected, rtol=0, atol=1e-14)


def test_centre_ema_uses_the_fixed_momentum_and_fixed_centres_never_move():
    teacher_centres = F.normalize(torch.randn(C, D), dim=1)
    centres = torch.randn(C, D)
    student, teacher = torch.randn(B, D), torch.randn(B, D)
    labels = torch.arange(B)
    ema = CentreEMA(momentum=0.8)
    before = centres.clone()
    ema.update_centres(centres, student, teacher, labels)
    torch.testing.assert_close(centres[:B], 0.8 * before[:B] + 0.2 * F.normalize(teacher, dim=1))
    torch.testing.assert_close(centres[B:], before[B:])
    fixed = TeacherCentres(teacher_centres)
    fixed.init_centres(centres)
    fixed.update_centres(centres, student, teacher, labels)
    torch.testing.assert_close(centres, teacher_centres, rtol=0, atol=0)
    with pytest.raises(PipelineError, match="centre-fixed: the teacher's identity centres are"):
        fixed.init_centres(torch.zeros(C + 1, D))


def test_kd_config_declares_needs_and_builds_head_methods():
    assert KDConfig(kd="adadistill").needs() == set()
    assert KDConfig(kd="adadistill", centre_init="teacher").needs() == {"centres"}
    assert KDConfig(kd="centre-fixed").needs() == {"centres"}
    assert KDConfig(kd="adadistill+ekd", ekd_mode="teacher").needs() == {"thresholds"}
    config = KDConfig(kd="adadistill+l2")
    assert [name for name, _, _ in config.terms()] == ["l2"]
    assert isinstance(config.head_method(), AdaDistill)
    centres = torch.ones(3, 2)
    config = KDConfig(kd="adadistill", centre_init="teacher")
    method = config.head_method({"centres": centres.numpy()})
    target = torch.zeros(3, 2)
    method.init_centres(target)
    assert torch.equal(target, centres)
    for bad, message in (("adadistill+centre-ema", "both set the margin head's centres"),
                         ("l2+l2", "named twice"), ("fitnet", "'fitnet' is not a method")):
        with pytest.raises(PipelineError, match=message):
            KDConfig(kd=bad)


def test_adadistill_alpha_is_the_official_product_of_clamped_cosines():
    method = AdaDistill()
    s = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), dim=1)
    t = F.normalize(torch.tensor([[1.0, 1.0], [0.0, -1.0], [1.0, 0.0]]), dim=1)
    old = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    alpha = method.alpha(s, t, old)
    expected = [math.cos(math.pi / 4) * math.cos(math.pi / 4), 1e-6, 1e-6]  # negative cosines clamp to 1e-6
    torch.testing.assert_close(alpha, torch.tensor(expected), rtol=1e-6, atol=1e-9)
