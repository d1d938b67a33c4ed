"""EKDLoss against independent numpy re-computations of the official formula and of global mode."""

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.losses.ekd import EKDLoss

THRESHOLDS_JSON = {"1e-1": 0.30, "1e-2": 0.45, "1e-3": 0.55, "1e-4": 0.62, "1e-5": 0.70, "1e-6": 0.78,
                   "tpr": {"1e-1": 0.99}, "counts": {"negatives": 123}}


# ---------------------------------------------------------------- plain numpy re-computation (float64)
def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs(x, labels):
    """Similarities and same-label flags of all pairs i<j, row-major, with explicit loops."""
    sims, same = [], []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            sims.append(float(x[i] @ x[j]))
            same.append(labels[i] == labels[j])
    return np.array(sims), np.array(same, dtype=bool)


def _sigmoid(x, temp):
    return 1.0 / (1.0 + np.exp(np.clip(-x / temp, -50, 50)))


def _rank_mse(s, t, s_thr, t_thr, temp):
    if len(s) == 0:
        return 0.0
    s_rank = _sigmoid(s[:, None] - s_thr[None, :], temp).sum(1)
    t_rank = _sigmoid(t[:, None] - t_thr[None, :], temp).sum(1)
    return float(np.mean((s_rank - t_rank) ** 2))


class OfficialEKD:
    """The TFace EKD forward, step by step, in numpy: EMA state, thresholds n // a, top-k student negatives."""

    def __init__(self, anchors, topk, temp, momentum, pos_w, neg_w):
        self.anchors, self.topk, self.temp, self.m = anchors, topk, temp, momentum
        self.pos_w, self.neg_w = pos_w, neg_w
        self.s_state = np.zeros(len(anchors))
        self.t_state = np.zeros(len(anchors))

    def update(self, s_raw, t_raw, labels):
        """EMA update; returns the indices (into the negatives) of the selected hardest ones."""
        s, same = _pairs(_unit(s_raw), labels)
        t, _ = _pairs(_unit(t_raw), labels)
        s_neg, t_neg = s[~same], t[~same]
        order = np.argsort(-s_neg, kind="stable")
        sorted_t = np.sort(t_neg)[::-1]
        idx = [len(s_neg) // a for a in self.anchors]
        self.s_state = self.m * s_neg[order][idx] + (1 - self.m) * self.s_state
        self.t_state = self.m * sorted_t[idx] + (1 - self.m) * self.t_state
        return order[:self.topk]

    def loss(self, s_raw, t_raw, labels, selected):
        """Loss with the current state and a fixed selection (what autograd differentiates)."""
        s, same = _pairs(_unit(s_raw), labels)
        t, _ = _pairs(_unit(t_raw), labels)
        pos = _rank_mse(s[same], t[same], self.s_state, self.t_state, self.temp)
        neg = _rank_mse(s[~same][selected], t[~same][selected], self.s_state, self.t_state, self.temp)
        return self.pos_w * pos + self.neg_w * neg


def _finite_difference(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (f(up) - f(down)) / (2 * h)
    return grad


def _batch(rng, labels, dim=6):
    s = rng.normal(size=(len(labels), dim))
    t = s + 0.7 * rng.normal(size=s.shape)  # correlated teacher, so ranks partly agree
    return s, t


@pytest.mark.parametrize("kw", [
    {},  # the official constants
    {"anchors": (2, 3, 5, 40), "topk": 12, "temperature": 0.05, "momentum": 0.3, "pos_weight": 0.5,
     "neg_weight": 0.25},
])
def test_reference_mode_matches_official_formula_over_steps(kw):
    full = {"anchors": (10, 100, 1000, 10000, 100000, 1000000), "topk": 2000, "temperature": 0.01,
            "momentum": 0.01, "pos_weight": 0.02, "neg_weight": 0.01, **kw}
    official = OfficialEKD(full["anchors"], full["topk"], full["temperature"], full["momentum"],
                           full["pos_weight"], full["neg_weight"])
    loss_fn = EKDLoss(mode="reference", **kw).double()
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5, 6])
    for step in range(4):
        s_raw, t_raw = _batch(rng, labels)
        s = torch.tensor(s_raw, requires_grad=True)
        value = loss_fn(s, torch.tensor(t_raw), torch.tensor(labels))
        value.backward()

        selected = official.update(s_raw, t_raw, labels)
        expected = official.loss(s_raw, t_raw, labels, selected)
        np.testing.assert_allclose(value.item(), expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(loss_fn.ema_student_thresholds.numpy(), official.s_state, rtol=1e-12)
        np.testing.assert_allclose(loss_fn.ema_teacher_thresholds.numpy(), official.t_state, rtol=1e-12)
        fd = _finite_difference(lambda x: official.loss(x, t_raw, labels, selected), s_raw)
        assert np.abs(fd).max() > 1e-4, "the test batch should produce a non-trivial gradient"
        np.testing.assert_allclose(s.grad.numpy(), fd, rtol=1e-4, atol=1e-7)


def test_reference_mode_edge_cases():
    official = OfficialEKD((2, 4), 3, 0.05, 0.5, 0.02, 0.01)
    loss_fn = EKDLoss(mode="reference", anchors=(2, 4), topk=3, temperature=0.05, momentum=0.5).double()
    rng = np.random.default_rng(1)
    # no positives: the positive term is 0 (the official code would give NaN), topk < negatives
    labels = np.arange(6)
    s_raw, t_raw = _batch(rng, labels)
    value = loss_fn(torch.tensor(s_raw), torch.tensor(t_raw), torch.tensor(labels))
    selected = official.update(s_raw, t_raw, labels)
    assert len(selected) == 3
    np.testing.assert_allclose(value.item(), official.loss(s_raw, t_raw, labels, selected), rtol=1e-9)
    assert loss_fn.last_stats["positive_mask"].sum() == 0 and loss_fn.last_stats["negative_mask"].sum() == 3
    # one identity: no negatives, the EMA keeps its state and only the positive term remains
    before = loss_fn.ema_student_thresholds.clone()
    labels = np.zeros(5, dtype=np.int64)
    s_raw, t_raw = _batch(rng, labels)
    value = loss_fn(torch.tensor(s_raw), torch.tensor(t_raw), torch.tensor(labels))
    assert torch.equal(loss_fn.ema_student_thresholds, before)
    s, _ = _pairs(_unit(s_raw), labels)
    t, _ = _pairs(_unit(t_raw), labels)
    np.testing.assert_allclose(value.item(), 0.02 * _rank_mse(s, t, official.s_state, official.t_state, 0.05),
                               rtol=1e-9)


# ---------------------------------------------------------------- global mode
def _brute_force_thresholds(s_unit, labels, queue_emb, queue_labels, anchors):
    negatives = []
    for i in range(len(labels)):
        negatives += [float(s_unit[i] @ q) for q, ql in zip(queue_emb, queue_labels) if ql != labels[i]]
        negatives += [float(s_unit[i] @ s_unit[j]) for j in range(i + 1, len(labels)) if labels[j] != labels[i]]
    ordered = sorted(negatives, reverse=True)
    return np.array([ordered[int(np.floor(len(ordered) / a))] for a in anchors]), max(negatives)


def test_global_mode_thresholds_selection_and_loss_match_direct_computation():
    anchors, topk, temp, queue_size = (2, 5, 10, 100000), 4, 0.05, 30
    teacher_thr = [0.2, 0.35, 0.5, 0.8]
    teacher_arr = np.float32(teacher_thr).astype(np.float64)  # the buffer is created in float32
    loss_fn = EKDLoss(mode="global", teacher_thresholds=teacher_thr, queue_size=queue_size, anchors=anchors,
                      topk=topk, temperature=temp).double()
    rng = np.random.default_rng(2)
    history_emb, history_labels = [], []
    critical_seen = 0
    for step in range(5):
        labels = rng.integers(0, 5, size=12)
        s_raw, t_raw = _batch(rng, labels, dim=5)
        s = torch.tensor(s_raw, requires_grad=True)
        value = loss_fn(s, torch.tensor(t_raw), torch.tensor(labels))
        value.backward()

        s_unit = _unit(s_raw)
        queue_emb = np.concatenate(history_emb)[-queue_size:] if history_emb else np.zeros((0, 5))
        queue_labels = np.concatenate(history_labels)[-queue_size:] if history_labels else np.zeros(0)
        s_thr, largest = _brute_force_thresholds(s_unit, labels, queue_emb, queue_labels, anchors)
        stats = loss_fn.last_stats
        np.testing.assert_allclose(stats["student_thresholds"].numpy(), s_thr, rtol=1e-12)
        assert s_thr[-1] == pytest.approx(largest)  # 1/100000 is not resolved: falls back to the largest

        s_pairs, same = _pairs(s_unit, labels)
        t_pairs, _ = _pairs(_unit(t_raw), labels)
        s_interval = [(sp > s_thr).sum() for sp in s_pairs]
        t_interval = [(tp > teacher_arr).sum() for tp in t_pairs]
        critical = np.array([a != b for a, b in zip(s_interval, t_interval)])
        neg_index = np.flatnonzero(~same)
        hardest = np.zeros(len(same), dtype=bool)
        hardest[neg_index[np.argsort(-s_pairs[neg_index], kind="stable")[:topk]]] = True
        pos_mask, neg_mask = same & critical, (~same & critical) | hardest
        np.testing.assert_array_equal(stats["positive_mask"].numpy(), pos_mask)
        np.testing.assert_array_equal(stats["negative_mask"].numpy(), neg_mask)
        critical_seen += int(pos_mask.sum() > 0) + int((~same & critical & ~hardest).sum() > 0)

        def expected(x):  # the loss with this step's thresholds and selection held fixed
            sp, _ = _pairs(_unit(x), labels)
            return (0.02 * _rank_mse(sp[pos_mask], t_pairs[pos_mask], s_thr, teacher_arr, temp)
                    + 0.01 * _rank_mse(sp[neg_mask], t_pairs[neg_mask], s_thr, teacher_arr, temp))
        np.testing.assert_allclose(value.item(), expected(s_raw), rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(s.grad.numpy(), _finite_difference(expected, s_raw), rtol=1e-4, atol=1e-7)

        history_emb.append(s_unit)
        history_labels.append(labels)
        # the queue now holds the last `queue_size` normalised student embeddings (a ring buffer)
        expected_queue = np.concatenate(history_emb)[-queue_size:]
        held, held_labels = (x.numpy() for x in loss_fn.queue.valid())
        assert int(loss_fn.queue.ptr) == (12 * (step + 1)) % queue_size
        np.testing.assert_allclose(np.sort(held, axis=0), np.sort(expected_queue, axis=0), rtol=1e-12)
        np.testing.assert_array_equal(np.sort(held_labels), np.sort(np.concatenate(history_labels)[-queue_size:]))
    assert critical_seen >= 5, "the batches should exercise critical positives and non-hardest critical negatives"


def test_global_mode_without_any_negative_uses_the_teacher_thresholds():
    loss_fn = EKDLoss(teacher_thresholds=[0.2, 0.6], anchors=(10, 100), temperature=0.05).double()
    labels = np.zeros(4, dtype=np.int64)
    s_raw, t_raw = _batch(np.random.default_rng(5), labels)
    value = loss_fn(torch.tensor(s_raw), torch.tensor(t_raw), torch.tensor(labels))
    np.testing.assert_allclose(loss_fn.last_stats["student_thresholds"].numpy(), np.float32([0.2, 0.6]))
    thr = np.float32([0.2, 0.6]).astype(np.float64)
    s, _ = _pairs(_unit(s_raw), labels)
    t, _ = _pairs(_unit(t_raw), labels)
    crit = np.array([(a > thr).sum() != (b > thr).sum() for a, b in zip(s, t)])
    np.testing.assert_allclose(value.item(), 0.02 * _rank_mse(s[crit], t[crit], thr, thr, 0.05), rtol=1e-9)


def test_global_mode_state_dict_resume_reproduces_the_next_step():
    rng = np.random.default_rng(3)
    steps = [(rng.normal(size=(8, 4)), rng.normal(size=(8, 4)), rng.integers(0, 3, size=8)) for _ in range(4)]
    run = EKDLoss(teacher_thresholds=THRESHOLDS_JSON, queue_size=20, topk=5)
    for s, t, y in steps[:3]:
        run(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), torch.tensor(y))
    resumed = EKDLoss(teacher_thresholds=THRESHOLDS_JSON, queue_size=20, topk=5)  # queue not yet sized
    resumed.load_state_dict(run.state_dict())
    s, t, y = (torch.tensor(steps[3][0], dtype=torch.float32), torch.tensor(steps[3][1], dtype=torch.float32),
               torch.tensor(steps[3][2]))
    assert run(s, t, y).item() == resumed(s, t, y).item()
    for key, value in run.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_teacher_thresholds_parsing_and_bad_options():
    loss_fn = EKDLoss(teacher_thresholds=THRESHOLDS_JSON)
    np.testing.assert_allclose(loss_fn.teacher_thresholds.numpy(), [0.30, 0.45, 0.55, 0.62, 0.70, 0.78], rtol=1e-6)
    listed = EKDLoss(teacher_thresholds=[0.1, 0.2], anchors=(10, 100))
    np.testing.assert_allclose(listed.teacher_thresholds.numpy(), [0.1, 0.2], rtol=1e-6)
    with pytest.raises(PipelineError, match="1e-6"):
        EKDLoss(teacher_thresholds={k: v for k, v in THRESHOLDS_JSON.items() if k != "1e-6"})
    with pytest.raises(PipelineError, match="expected 6"):
        EKDLoss(teacher_thresholds=[0.1, 0.2])
    with pytest.raises(PipelineError, match="teacher_thresholds"):
        EKDLoss(mode="global")
    with pytest.raises(PipelineError, match="mode"):
        EKDLoss(mode="online")
    with pytest.raises(PipelineError, match="inputs disagree"):
        EKDLoss(mode="reference")(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.int64))
