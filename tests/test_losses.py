"""CRD (Eq. 4) and KD (Eq. 2) losses against hand computations."""

import math

import pytest
import torch

from codir_ds.distill.losses import crd_loss, kd_loss
from oracles import crd_scores


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))


def test_crd_loss_matches_hand_computation():
    tau = 0.5
    h_t = [[1.0, 0.0], [0.6, 0.8]]
    h_s = [[2.0, 1.0], [0.0, 3.0]]
    negs = [[[0.0, 1.0], [-1.0, 1.0]], [[1.0, 0.0], [1.0, -2.0]]]
    expected = 0.0
    for t, s, ns in zip(h_t, h_s, negs):
        pos = math.exp(_cos(t, s) / tau)
        den = pos + sum(math.exp(_cos(t, n) / tau) for n in ns)
        expected += -math.log(pos / den)
    expected /= 2
    loss = crd_loss(torch.tensor(h_t), torch.tensor(h_s), torch.tensor(negs), tau)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    pos, neg = crd_scores(torch.tensor(h_t), torch.tensor(h_s), torch.tensor(negs))
    assert pos.shape == (2,) and neg.shape == (2, 2) and pos.dtype == torch.float32
    assert pos[1].item() == pytest.approx(_cos(h_t[1], h_s[1]), abs=1e-6)
    assert neg[0, 1].item() == pytest.approx(_cos(h_t[0], negs[0][1]), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_crd_loss_low_precision_inputs_give_fp32_and_no_overflow(dtype):
    torch.manual_seed(0)
    b, k, m = 4, 8, 16
    h = torch.randn(b, m) * 30  # large activations
    negs = torch.randn(b, k, m) * 30
    # identical teacher/student vectors: cos = 1, cos/τ = 14.3, exp = 1.6e6 > fp16 max
    ref = crd_loss(h, h, negs, 0.07)
    low = crd_loss(h.to(dtype), h.to(dtype), negs.to(dtype), 0.07)
    assert low.dtype == torch.float32
    assert torch.isfinite(low) and torch.isfinite(ref)
    # differences come only from rounding the inputs to fp16/bf16
    assert low.item() == pytest.approx(ref.item(), rel=0.05, abs=0.02)
    # also under autocast (the loss must not be pushed back to low precision)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = crd_loss(h.to(dtype), h.to(dtype), negs.to(dtype), 0.07)
    assert auto.dtype == torch.float32 and auto.item() == pytest.approx(low.item(), rel=1e-5)


def test_crd_loss_extreme_similarity_is_finite():
    h = torch.ones(2, 4, dtype=torch.float16)
    negs = -torch.ones(2, 3, 4, dtype=torch.float16)
    loss = crd_loss(h, h, negs, 0.01)  # cos/τ = ±100: exp(100) overflows even fp32
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(3 * math.exp(-200), abs=1e-12)


def test_crd_loss_gradients_flow_to_teacher_and_student():
    torch.manual_seed(1)
    h_t = torch.randn(3, 5, dtype=torch.float16, requires_grad=True)
    h_s = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True)
    negs = torch.randn(3, 4, 5)
    crd_loss(h_t, h_s, negs, 0.1).backward()
    assert h_t.grad is not None and h_t.grad.dtype == torch.float16
    assert h_s.grad is not None and h_s.grad.abs().sum() > 0
    assert h_t.grad.float().abs().sum() > 0


def test_crd_shape_errors():
    with pytest.raises(ValueError):
        crd_loss(torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 1, 3), 0.1)
    with pytest.raises(ValueError):
        crd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), 0.1)
    with pytest.raises(ValueError):
        crd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 1, 3), 0.0)


def test_kd_loss_matches_hand_kl_two_classes():
    z_s = [0.5, -0.5]
    z_t = [2.0, 1.0]
    temp = 2.0

    def softmax(z):
        e = [math.exp(v / temp) for v in z]
        return [v / sum(e) for v in e]

    p, q = softmax(z_t), softmax(z_s)
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    loss = kd_loss(torch.tensor([z_s]), torch.tensor([z_t]), temp)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # averaged over rows: a second, identical row leaves the value unchanged
    loss2 = kd_loss(torch.tensor([z_s, z_s]), torch.tensor([z_t, z_t]), temp)
    assert loss2.item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_zero_for_equal_logits_and_handles_more_dims():
    z = torch.randn(2, 3, 7)
    assert kd_loss(z, z.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    z_s = torch.randn(2, 3, 7, dtype=torch.float16)
    z_t = torch.randn(2, 3, 7, dtype=torch.float16)
    flat = kd_loss(z_s.reshape(6, 7), z_t.reshape(6, 7), 2.0)
    assert kd_loss(z_s, z_t, 2.0).item() == pytest.approx(flat.item(), rel=1e-6)
    assert flat.dtype == torch.float32


def test_kd_loss_has_no_temperature_squared_factor():
    # Scaling logits and temperature together leaves softmax(z/T), hence the
    # KL, unchanged; a hidden T² factor would scale the loss by 100.
    z_s, z_t = torch.randn(4, 5), torch.randn(4, 5)
    a = kd_loss(z_s, z_t, 1.0)
    b = kd_loss(10 * z_s, 10 * z_t, 10.0)
    assert b.item() == pytest.approx(a.item(), rel=1e-5)


def test_kd_loss_gradient_only_to_student_and_empty_rows():
    z_s = torch.randn(3, 4, requires_grad=True)
    z_t = torch.randn(3, 4, requires_grad=True)
    kd_loss(z_s, z_t, 2.0).backward()
    assert z_s.grad is not None and z_t.grad is None
    empty = torch.zeros(0, 4, requires_grad=True)
    out = kd_loss(empty, torch.zeros(0, 4), 2.0)
    assert out.item() == 0.0 and out.requires_grad


def test_crd_loss_classes_equals_per_anchor_copy():
    """Class-shared negatives (no [B, K, m] copy) give crd_loss's value and gradients."""
    from codir_ds.distill.losses import crd_loss, crd_loss_classes
    torch.manual_seed(3)
    h_t = torch.randn(5, 8, requires_grad=True)
    h_s = torch.randn(5, 8, requires_grad=True)
    class_neg = torch.randn(3, 7, 8)
    classes = torch.tensor([0, 2, 2, 1, 0])
    ref = crd_loss(h_t, h_s, class_neg[classes], 0.07)
    g_ref = torch.autograd.grad(ref, (h_t, h_s))
    got, pos, mean_neg = crd_loss_classes(h_t, h_s, class_neg, classes, 0.07)
    g_got = torch.autograd.grad(got, (h_t, h_s))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(g_ref, g_got):
        assert torch.allclose(a, b, atol=1e-6)
    t = torch.nn.functional.normalize(h_t.detach(), dim=-1)
    n = torch.nn.functional.normalize(class_neg, dim=-1)
    assert torch.allclose(mean_neg, torch.einsum("bm,bkm->bk", t, n[classes]).mean(1), atol=1e-6)
    assert pos.shape == (5,)
