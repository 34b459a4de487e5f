"""The three MGLL terms against hand computation, and CLIP/SigLIP against open_clip."""

import math

import open_clip.loss as oc_loss
import pytest
import torch
import torch.nn.functional as F

from mgll.encoder.batch_texts import build_batch_texts
from mgll.encoder.config import load_config
from mgll.encoder.losses import (
    MGLLLoss,
    MGLLOptions,
    clip_loss,
    pointwise_loss,
    sample_text_features,
    schedule_factor,
    siglip_loss,
    smooth_kl_loss,
    soft_clip_loss,
)

D = torch.float64


def _unit(rows):
    t = torch.tensor(rows, dtype=D)
    return t / t.norm(dim=1, keepdim=True)


# 3 images, level 1 (status) with 2 texts, level 2 (disease) with 3 texts; image 1 has two diseases.
IMG = _unit([[1.0, 0.2, -0.3], [0.1, 0.9, 0.4], [-0.5, 0.3, 0.8]])
T1 = _unit([[0.9, 0.1, 0.0], [0.0, 0.7, 0.7]])
Y1 = torch.tensor([[1, 0], [0, 1], [0, 1]], dtype=D)
T2 = _unit([[1.0, 0.0, 0.1], [0.2, 1.0, 0.0], [-0.3, 0.1, 1.0]])
Y2 = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=D)
SCALE = torch.tensor(5.0, dtype=D)


def _dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _hand_soft_clip(img, txt, y, s):
    B, K = y.shape
    logits = [[s * _dot(img[i], txt[k]) for k in range(K)] for i in range(B)]
    i2t = 0.0
    for i in range(B):
        z = math.log(sum(math.exp(v) for v in logits[i]))
        row = sum(float(y[i, k]) for k in range(K))
        for k in range(K):
            i2t -= float(y[i, k]) / row * (logits[i][k] - z)
    i2t /= B
    t2i = 0.0
    for k in range(K):
        z = math.log(sum(math.exp(logits[i][k]) for i in range(B)))
        col = sum(float(y[i, k]) for i in range(B))
        for i in range(B):
            t2i -= float(y[i, k]) / col * (logits[i][k] - z)
    t2i /= K
    return (i2t + t2i) / 2


def _hand_pointwise(img, txt, y, t, b):
    B, K = y.shape
    total = 0.0
    for i in range(B):
        for k in range(K):
            u = t * _dot(img[i], txt[k]) + b
            p = 1 / (1 + math.exp(-u))
            total -= float(y[i, k]) * math.log(p) + (1 - float(y[i, k])) * math.log(1 - p)
    return total / B


def _hand_sample(txt, y):
    out = []
    for i in range(y.shape[0]):
        ks = [k for k in range(y.shape[1]) if y[i, k] > 0]
        v = [sum(float(txt[k][d]) for k in ks) / len(ks) for d in range(txt.shape[1])]
        n = math.sqrt(sum(x * x for x in v))
        out.append([x / n for x in v])
    return out


def _hand_smooth_kl(img, samples_per_level, s):
    B = img.shape[0]
    probs = []
    for samples in samples_per_level:
        P = []
        for i in range(B):
            logits = [s * _dot(img[i], samples[j]) for j in range(B)]
            z = sum(math.exp(v) for v in logits)
            P.append([math.exp(v) / z for v in logits])
        probs.append(P)
    L = len(probs)
    total = 0.0
    for P in probs:
        kl = 0.0
        for i in range(B):
            for j in range(B):
                m = sum(Q[i][j] for Q in probs) / L
                kl += P[i][j] * math.log(P[i][j] / m)
        total += kl / B
    return total


def test_soft_clip_matches_hand_computation():
    for txt, y in ((T1, Y1), (T2, Y2)):
        got = soft_clip_loss(IMG, txt, y, SCALE)
        assert got.dtype == D
        assert got.item() == pytest.approx(_hand_soft_clip(IMG, txt, y, 5.0), abs=1e-12)


def test_pointwise_matches_hand_computation():
    for txt, y in ((T1, Y1), (T2, Y2)):
        got = pointwise_loss(IMG, txt, y, torch.tensor(10.0, dtype=D), torch.tensor(-3.0, dtype=D))
        assert got.item() == pytest.approx(_hand_pointwise(IMG, txt, y, 10.0, -3.0), abs=1e-12)


def test_smooth_kl_matches_hand_computation():
    s1, s2 = sample_text_features(T1, Y1), sample_text_features(T2, Y2)
    torch.testing.assert_close(s2, torch.tensor(_hand_sample(T2, Y2), dtype=D), atol=1e-12, rtol=0)
    got = smooth_kl_loss(IMG, [s1, s2], SCALE)
    want = _hand_smooth_kl(IMG, [_hand_sample(T1, Y1), _hand_sample(T2, Y2)], 5.0)
    assert want > 1e-3  # the example is not degenerate
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_mgll_total_is_weighted_sum_of_hand_terms():
    loss = MGLLLoss(soft_clip_weight=0.7, pointwise_weight=0.2, smooth_kl_weight=1.5).double()
    with torch.no_grad():
        loss.pointwise.pointwise_logit_scale.fill_(math.log(10.0))
        loss.pointwise.pointwise_logit_bias.fill_(-3.0)
    out = loss(IMG, [T1, T2], [Y1, Y2], SCALE)
    soft = (_hand_soft_clip(IMG, T1, Y1, 5.0) + _hand_soft_clip(IMG, T2, Y2, 5.0)) / 2
    point = (_hand_pointwise(IMG, T1, Y1, 10.0, -3.0) + _hand_pointwise(IMG, T2, Y2, 10.0, -3.0)) / 2
    kl = _hand_smooth_kl(IMG, [_hand_sample(T1, Y1), _hand_sample(T2, Y2)], 5.0)
    assert out["soft_clip"].item() == pytest.approx(soft, abs=1e-12)
    assert out["pointwise"].item() == pytest.approx(point, abs=1e-12)
    assert out["smooth_kl"].item() == pytest.approx(kl, abs=1e-12)
    assert out["loss"].item() == pytest.approx(0.7 * soft + 0.2 * point + 1.5 * kl, abs=1e-12)


def test_zero_weight_terms_own_no_parameters():
    assert MGLLLoss(pointwise_weight=0.0).pointwise is None
    assert len(list(MGLLLoss().parameters())) == 0  # the default a2 = 0 (benchmarks/results/ablation.md)
    assert len(list(MGLLLoss(pointwise_weight=0.1).parameters())) == 2


def _random_features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


@pytest.mark.parametrize("n", [1, 5, 16])
def test_clip_equals_open_clip(n):
    img, txt = _random_features(n, 32, n)
    scale = torch.tensor(14.3)
    want = oc_loss.ClipLoss()(img, txt, scale)
    assert abs(clip_loss(img, txt, scale).item() - want.item()) <= 1e-6


@pytest.mark.parametrize("n", [1, 5, 16])
def test_siglip_equals_open_clip(n):
    img, txt = _random_features(n, 32, 100 + n)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    want = oc_loss.SigLipLoss()(img, txt, scale, bias)
    assert abs(siglip_loss(img, txt, scale, bias).item() - want.item()) <= 1e-6


def test_soft_clip_with_one_distinct_text_per_image_is_clip():
    img, txt = _random_features(8, 16, 3)
    scale = torch.tensor(20.0)
    got = soft_clip_loss(img, txt, torch.eye(8), scale)
    torch.testing.assert_close(got, clip_loss(img, txt, scale), atol=1e-6, rtol=0)


def test_identical_texts_are_one_column_never_a_negative():
    from mgll.data import Level

    levels = [Level("status", "a {} eye"), Level("disease", "showing {}")]
    labels = [
        {"status": ["abnormal"], "disease": ["drusen", "haemorrhage"]},
        {"status": ["abnormal"], "disease": ["drusen"]},
        {"status": ["normal"], "disease": ["no disease"]},
    ]
    bt = build_batch_texts(labels, levels)
    assert [bt.texts[c] for c in bt.level_columns[0]] == ["a abnormal eye", "a normal eye"]
    torch.testing.assert_close(bt.level_targets[0], torch.tensor([[1.0, 0], [1, 0], [0, 1]]))
    torch.testing.assert_close(bt.level_targets[1], torch.tensor([[1.0, 1, 0], [1, 0, 0], [0, 0, 1]]))
    assert len(set(bt.texts)) == len(bt.texts)


def test_image_to_text_gradient_is_pull_toward_weighted_centroid():
    """dL/dI_i = s * (sum_k p_ik T_k - sum_k w_ik T_k) / B for the image->text half."""
    img = IMG.clone().requires_grad_(True)
    s = 5.0
    loss = soft_clip_loss(img, T2, Y2, torch.tensor(s, dtype=D), direction="image_to_text")
    (grad,) = torch.autograd.grad(loss, img)
    p = torch.softmax(s * IMG @ T2.T, dim=1)
    w = Y2 / Y2.sum(dim=1, keepdim=True)
    want = s * (p @ T2 - w @ T2) / IMG.shape[0]
    torch.testing.assert_close(grad, want, atol=1e-12, rtol=0)


def test_soft_clip_rejects_inconsistent_targets():
    with pytest.raises(ValueError, match="at least one positive"):
        soft_clip_loss(IMG, T1, torch.tensor([[1, 0], [0, 0], [0, 1]], dtype=D), SCALE)
    with pytest.raises(ValueError, match="shape"):
        soft_clip_loss(IMG, T1, torch.ones(2, 2, dtype=D), SCALE)


def test_smooth_kl_is_zero_when_levels_agree():
    img, txt = _random_features(6, 8, 7)
    assert smooth_kl_loss(img, [txt, txt, txt], torch.tensor(30.0)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_smooth_kl_finite_at_extremes(dtype):
    img, a = _random_features(6, 8, 11)
    _, b = _random_features(6, 8, 12)
    for scale in (1e-4, 1.0, 100.0, 1e4):
        img_d = img.to(dtype).requires_grad_(True)
        out = smooth_kl_loss(img_d, [a.to(dtype), b.to(dtype)], torch.tensor(scale))
        out.backward()
        assert torch.isfinite(out) and out.item() >= 0
        assert torch.isfinite(img_d.grad.float()).all()
    # identical rows: every image and every sample text the same
    same = img[:1].repeat(6, 1)
    out = smooth_kl_loss(same.to(dtype), [same.to(dtype), a.to(dtype)], torch.tensor(1e4))
    assert torch.isfinite(out)


def test_smooth_kl_bf16_close_to_float32():
    img, a = _random_features(8, 16, 21)
    _, b = _random_features(8, 16, 22)
    ref = smooth_kl_loss(img, [a, b], torch.tensor(10.0))
    low = smooth_kl_loss(img.bfloat16(), [a.bfloat16(), b.bfloat16()], torch.tensor(10.0))
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) < 0.05 * ref.item() + 1e-3


def test_mgll_loss_finite_under_bf16_autocast():
    loss = MGLLLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(IMG.float(), [T1.float(), T2.float()], [Y1.float(), Y2.float()], torch.tensor(100.0))
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss"].dtype == torch.float32


# ----------------------------------------------------------------------------- the study's variants, by hand

# a third level with 4 texts, so "levels with >= 3 texts" keeps two of three levels
T3 = _unit([[0.3, 0.3, 0.9], [0.8, -0.2, 0.1], [0.1, 0.6, -0.4], [-0.7, 0.2, 0.3]])
Y3 = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=D)


def _bce_sum(img, txt, y, t, b):
    return _hand_pointwise(img, txt, y, t, b) * y.shape[0]  # the hand helper divides by B


def test_pointwise_reductions_match_hand_scales():
    t, b = torch.tensor(10.0, dtype=D), torch.tensor(-3.0, dtype=D)
    for txt, y in ((T1, Y1), (T2, Y2), (T3, Y3)):
        total = _bce_sum(IMG, txt, y, 10.0, -3.0)
        B, K = y.shape
        pos = float(y.sum())
        assert pointwise_loss(IMG, txt, y, t, b, "sum_texts").item() == pytest.approx(total / B, abs=1e-12)
        assert pointwise_loss(IMG, txt, y, t, b, "mean_pairs").item() == pytest.approx(total / (B * K), abs=1e-12)
        assert pointwise_loss(IMG, txt, y, t, b, "mean_positives").item() == pytest.approx(total / pos, abs=1e-12)
    with pytest.raises(ValueError, match="reduction must be one of"):
        pointwise_loss(IMG, T1, Y1, t, b, "mean")


def _pointwise_only(**opts):
    return MGLLLoss(soft_clip_weight=0.0, pointwise_weight=1.0, smooth_kl_weight=0.0, options=MGLLOptions(**opts)).double()


def test_fixed_pointwise_temperature_is_siglip_init_without_parameters():
    loss = _pointwise_only(pointwise_temperature="fixed")
    assert loss.pointwise is None and not list(loss.parameters())
    out = loss(IMG, [T1, T2], [Y1, Y2], SCALE)
    want = (_hand_pointwise(IMG, T1, Y1, 10.0, -10.0) + _hand_pointwise(IMG, T2, Y2, 10.0, -10.0)) / 2
    assert out["pointwise"].item() == pytest.approx(want, abs=1e-12)
    learn = _pointwise_only()
    with torch.no_grad():
        learn.pointwise.pointwise_logit_scale.fill_(math.log(4.0))  # a learnt value moves it; the fixed one cannot move
    assert learn(IMG, [T1, T2], [Y1, Y2], SCALE)["pointwise"].item() != pytest.approx(want, abs=1e-3)


def test_pointwise_on_fine_levels_only_leaves_out_the_coarsest():
    loss = _pointwise_only(pointwise_levels="fine", pointwise_temperature="fixed", pointwise_reduction="mean_pairs")
    out = loss(IMG, [T1, T2, T3], [Y1, Y2, Y3], SCALE)
    fine = (_bce_sum(IMG, T2, Y2, 10.0, -10.0) / 9 + _bce_sum(IMG, T3, Y3, 10.0, -10.0) / 12) / 2
    assert out["pointwise"].item() == pytest.approx(fine, abs=1e-12)
    assert out["loss"].item() == pytest.approx(fine, abs=1e-12)
    single = loss(IMG, [T2], [Y2], SCALE)  # one level: it is the fine level
    assert single["pointwise"].item() == pytest.approx(_bce_sum(IMG, T2, Y2, 10.0, -10.0) / 9, abs=1e-12)


def _kl_only(**opts):
    return MGLLLoss(soft_clip_weight=0.0, pointwise_weight=0.0, smooth_kl_weight=1.0, options=MGLLOptions(**opts)).double()


def test_smooth_kl_on_levels_with_enough_texts():
    samples = [_hand_sample(T, Y) for T, Y in ((T1, Y1), (T2, Y2), (T3, Y3))]
    every = _kl_only()(IMG, [T1, T2, T3], [Y1, Y2, Y3], SCALE)["smooth_kl"].item()
    assert every == pytest.approx(_hand_smooth_kl(IMG, samples, 5.0), abs=1e-12)
    kept = _kl_only(smooth_kl_levels="min_texts", smooth_kl_min_texts=3)(IMG, [T1, T2, T3], [Y1, Y2, Y3], SCALE)
    want = _hand_smooth_kl(IMG, samples[1:], 5.0)  # level 1 has 2 texts: out of the mixture
    assert want > 1e-3 and kept["smooth_kl"].item() == pytest.approx(want, abs=1e-12)
    four = _kl_only(smooth_kl_levels="min_texts", smooth_kl_min_texts=4)(IMG, [T1, T2, T3], [Y1, Y2, Y3], SCALE)
    assert four["smooth_kl"].item() == 0.0  # one level left: no mixture to be close to


def _hand_smooth_kl_t2i(img, samples_per_level, s):
    """Column direction: for each sample text j, a softmax over the images i."""
    B = img.shape[0]
    probs = []
    for samples in samples_per_level:
        Q = []
        for j in range(B):
            logits = [s * _dot(samples[j], img[i]) for i in range(B)]
            z = sum(math.exp(v) for v in logits)
            Q.append([math.exp(v) / z for v in logits])
        probs.append(Q)
    total = 0.0
    for Q in probs:
        kl = 0.0
        for j in range(B):
            for i in range(B):
                m = sum(R[j][i] for R in probs) / len(probs)
                kl += Q[j][i] * math.log(Q[j][i] / m)
        total += kl / B
    return total


def test_smooth_kl_text_to_image_direction():
    samples = [_hand_sample(T1, Y1), _hand_sample(T2, Y2)]
    got = _kl_only(smooth_kl_direction="text_to_image")(IMG, [T1, T2], [Y1, Y2], SCALE)["smooth_kl"].item()
    want = _hand_smooth_kl_t2i(IMG, samples, 5.0)
    assert want > 1e-3 and got == pytest.approx(want, abs=1e-12)
    assert abs(want - _hand_smooth_kl(IMG, samples, 5.0)) > 1e-4  # not the row direction under another name


def test_smooth_kl_schedules():
    assert [schedule_factor("constant", p, 0.5) for p in (0, 0.5, 1)] == [1.0, 1.0, 1.0]
    assert [schedule_factor("warmup", p, 0.5) for p in (0, 0.25, 0.5, 0.9)] == [0.0, 0.5, 1.0, 1.0]
    assert [schedule_factor("decay", p, 0.5) for p in (0, 0.5, 0.75, 1.0)] == [1.0, 1.0, 0.5, 0.0]
    loss = MGLLLoss(soft_clip_weight=1.0, pointwise_weight=0.0, smooth_kl_weight=2.0,
                    options=MGLLOptions(smooth_kl_schedule="warmup", smooth_kl_ramp=0.4)).double()
    soft = (_hand_soft_clip(IMG, T1, Y1, 5.0) + _hand_soft_clip(IMG, T2, Y2, 5.0)) / 2
    kl = _hand_smooth_kl(IMG, [_hand_sample(T1, Y1), _hand_sample(T2, Y2)], 5.0)
    for progress, r in ((0.0, 0.0), (0.1, 0.25), (0.6, 1.0)):
        loss.progress = progress
        out = loss(IMG, [T1, T2], [Y1, Y2], SCALE)
        assert out["smooth_kl"].item() == pytest.approx(kl, abs=1e-12)  # logged unweighted
        assert out["loss"].item() == pytest.approx(soft + 2.0 * r * kl, abs=1e-12)


def test_soft_clip_coarse_level_weight():
    l1, l2, l3 = (_hand_soft_clip(IMG, T, Y, 5.0) for T, Y in ((T1, Y1), (T2, Y2), (T3, Y3)))
    for w in (0.0, 0.5, 2.0):
        loss = MGLLLoss(soft_clip_weight=1.0, pointwise_weight=0.0, smooth_kl_weight=0.0,
                        options=MGLLOptions(soft_clip_coarse=w)).double()
        out = loss(IMG, [T1, T2, T3], [Y1, Y2, Y3], SCALE)
        assert out["soft_clip"].item() == pytest.approx((w * l1 + l2 + l3) / (w + 2), abs=1e-12)
    plain = MGLLLoss(pointwise_weight=0.0, smooth_kl_weight=0.0).double()(IMG, [T1, T2, T3], [Y1, Y2, Y3], SCALE)
    assert plain["soft_clip"].item() == pytest.approx((l1 + l2 + l3) / 3, abs=1e-12)


def test_options_are_config_keys_and_validated():
    cfg = load_config(overrides=["loss.pointwise_reduction=mean_pairs", "loss.smooth_kl_levels=min_texts",
                                 "loss.smooth_kl_min_texts=4", "loss.soft_clip_coarse=0.5"])
    assert (cfg.loss.pointwise_reduction, cfg.loss.smooth_kl_min_texts, cfg.loss.soft_clip_coarse) == ("mean_pairs", 4, 0.5)
    assert set(MGLLOptions.names()) <= set(vars(cfg.loss))
    with pytest.raises(ValueError, match="loss.smooth_kl_direction must be one of"):
        load_config(overrides=["loss.smooth_kl_direction=both"])
    with pytest.raises(ValueError, match="smooth_kl_ramp"):
        load_config(overrides=["loss.smooth_kl_ramp=0"])
