"""Tests for the SMSL neck (smsl/smsl.py): shapes, equations, parameter counts, argument checks."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smsl import SMSL, SMSLNeck, build_smsl_neck

# P3..P7 of an 803×1211 image (strides 8..128, odd sizes) and P2..P6 of a small odd image.
P3_P7 = [(101, 152), (51, 76), (26, 38), (13, 19), (7, 10)]
P2_P6 = [(45, 61), (23, 31), (12, 16), (6, 8), (3, 4)]


def _features(sizes, channels=16, batch=2, seed=0, scale=1):
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (f"p{i}", torch.randn(batch, channels, h // scale or 1, w // scale or 1, generator=gen))
        for i, (h, w) in enumerate(sizes)
    )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _reference(smsl: SMSL, feats: OrderedDict) -> list[torch.Tensor]:
    """Eq. 1-15 written out level by level with loops, using ``smsl``'s weights."""
    xs = list(feats.values())
    k = smsl.gather_level
    size = xs[k].shape[-2:]
    d = []
    for i, x in enumerate(xs):
        if i < k:
            d.append(F.adaptive_max_pool2d(x, size))
        else:
            d.append(F.interpolate(x, size=size, mode="nearest"))
    n = len(d)
    c = smsl.in_channels
    if smsl.channel_rescaling is not None:
        d_cat = torch.cat(d, dim=1)  # Eq. 1
        x_gap = d_cat.mean(dim=(2, 3))  # Eq. 2
        cr = smsl.channel_rescaling
        s = torch.sigmoid(cr.fc2(torch.relu(cr.fc1(x_gap))))  # Eq. 3
        j = d_cat * s[:, :, None, None]  # Eq. 4
        q = [j[:, i * c : (i + 1) * c] for i in range(n)]  # Eq. 5-6
    else:
        q = d
    g = sum(q).mean(dim=(2, 3))  # Eq. 7-8

    def combine(scb):
        z = torch.relu(F.layer_norm(scb.fc1(g), (c // smsl.reduction,), scb.norm.weight, scb.norm.bias))
        m = scb.fc2(z).reshape(-1, n, c)
        a = torch.exp(m) / torch.exp(m).sum(dim=1, keepdim=True)  # Eq. 11
        return sum(a[:, i, :, None, None] * q[i] for i in range(n))  # Eq. 12-13

    glob = 0
    if smsl.global_feature is not None:
        f_g = combine(smsl.global_feature.combination)
        nl = smsl.global_feature.refine
        b, _, h, w = f_g.shape
        th = nl.theta(f_g).reshape(b, -1, h * w)
        ph = nl.phi(f_g).reshape(b, -1, h * w)
        gx = nl.g(f_g).reshape(b, -1, h * w)
        attn = torch.softmax(th.transpose(1, 2) @ ph, dim=-1)  # embedded Gaussian, no scaling
        glob = f_g + nl.conv_out((gx @ attn.transpose(1, 2)).reshape(b, -1, h, w))
    outs = []
    for i, x in enumerate(xs):
        f = combine(smsl.selective_combination[i]) + glob  # Eq. 14
        if i < k:
            f = F.interpolate(f, size=x.shape[-2:], mode="nearest")
        else:
            f = F.adaptive_max_pool2d(f, x.shape[-2:])
        outs.append(f + x)  # Eq. 15
    return outs


def _perturb_nonlocal_out(smsl: SMSL) -> None:
    # conv_out is zero-initialised (as MMCV / BFP); give it weights so the non-local path is exercised.
    if smsl.global_feature is not None:
        nn.init.normal_(smsl.global_feature.refine.conv_out.weight, std=0.1)


def test_parameter_count_matches_paper_table_2():
    # CR: (1280*160+160) + (160*1280+1280); SCB: (256*32+32) + 2*32 + (32*1280+1280); non-local 4*(256*256+256)
    cr, scb, nonlocal_ = 411_040, 50_528, 263_168
    assert _count(SMSL(256, 5, 8)) == cr + 6 * scb + nonlocal_ == 977_376  # Table 2: +0.98M
    assert _count(SMSL(256, 5, 8, channel_rescaling=False)) == 977_376 - cr
    assert _count(SMSL(256, 5, 8, global_feature=False)) == 977_376 - (scb + nonlocal_)
    assert _count(SMSL(256, 5, 8, channel_rescaling=False, global_feature=False)) == 5 * scb


@pytest.mark.parametrize(
    "sizes,cr,gf",
    [
        (P3_P7, True, True),
        (P2_P6[:4], True, True),
        (P3_P7, False, True),
        (P2_P6, True, False),
        (P3_P7[3:], True, True),
    ],
)
def test_keeps_keys_order_shapes_and_matches_equations(sizes, cr, gf):
    torch.manual_seed(0)
    smsl = SMSL(16, len(sizes), reduction=4, channel_rescaling=cr, global_feature=gf).eval()
    _perturb_nonlocal_out(smsl)
    feats = _features(sizes)
    with torch.no_grad():
        out = smsl(feats)
        ref = _reference(smsl, feats)
    assert list(out) == list(feats)
    for (key, x), y, r in zip(feats.items(), out.values(), ref):
        assert y.shape == x.shape, key
        torch.testing.assert_close(y, r, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(y, x)  # the fused residual adds something at every level


def test_default_gather_level_is_middle():
    assert SMSL(16, 5, 4).gather_level == 2  # P5 of P3..P7
    assert SMSL(16, 4, 4).gather_level == 1  # P3 of P2..P5
    assert SMSL(16, 2, 4).gather_level == 0
    assert SMSL(16, 5, 4, gather_level=4).gather_level == 4


@pytest.mark.parametrize("gf", [True, False])
def test_attention_sums_to_one_per_channel(gf):
    torch.manual_seed(0)
    smsl = SMSL(16, 5, reduction=4, global_feature=gf)
    feats = _features(P3_P7, scale=4)
    a = smsl.attention_weights(feats)
    assert a.shape == (2, 5 + gf, 5, 16)  # global block's weights last
    assert (a > 0).all()
    torch.testing.assert_close(a.sum(dim=2), torch.ones(2, 5 + gf, 16))
    assert not torch.allclose(a[:, 0], a[:, 1])  # every target level has its own weights


def test_channel_gates_strictly_between_zero_and_one():
    torch.manual_seed(0)
    smsl = SMSL(16, 5, reduction=4)
    s = smsl.channel_gates(_features(P3_P7, scale=4))
    assert s.shape == (2, 5, 16)
    assert ((s > 0) & (s < 1)).all()
    with pytest.raises(RuntimeError, match="channel_rescaling"):
        SMSL(16, 5, 4, channel_rescaling=False).channel_gates(_features(P3_P7, scale=4))


def test_every_parameter_gets_a_gradient():
    # Follows MMCV/BFP: the non-local conv_out starts at zero, so at step 0 g/theta/phi get no
    # gradient (only conv_out does). After one optimizer step every parameter must get one.
    torch.manual_seed(0)
    smsl = SMSL(16, 5, reduction=4)
    feats = _features(P3_P7, scale=4)
    target = [torch.randn_like(x) for x in feats.values()]
    opt = torch.optim.SGD(smsl.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        loss = sum((y * t).sum() for y, t in zip(smsl(feats).values(), target))
        loss.backward()

    step()
    refine = smsl.global_feature.refine
    assert refine.conv_out.weight.grad.abs().sum() > 0
    assert refine.g.weight.grad.abs().sum() == 0  # zero-init conv_out blocks them at first
    opt.step()
    step()
    for name, p in smsl.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_closed_gates_make_smsl_the_identity():
    # Forcing every CR gate to 0 (sigmoid(-1e4) == 0) zeroes Q, hence F^l, F^g and G (conv_out
    # zero-init): the output is exactly the residual input (Eq. 15).
    smsl = SMSL(16, 5, reduction=4)
    nn.init.zeros_(smsl.channel_rescaling.fc2.weight)
    nn.init.constant_(smsl.channel_rescaling.fc2.bias, -1e4)
    feats = _features(P3_P7, scale=4)
    with torch.no_grad():
        out = smsl(feats)
    for x, y in zip(feats.values(), out.values()):
        assert torch.equal(x, y)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="reduction=3"):
        SMSL(256, 5, reduction=3)
    with pytest.raises(ValueError, match="gather_level=5"):
        SMSL(256, 5, gather_level=5)
    with pytest.raises(ValueError, match="gather_level=-1"):
        SMSL(256, 5, gather_level=-1)
    with pytest.raises(ValueError, match="num_levels=1"):
        SMSL(256, 1)
    smsl = SMSL(16, 5, reduction=4)
    feats = _features(P3_P7, scale=8)
    with pytest.raises(ValueError, match="num_levels=5"):
        smsl(OrderedDict(list(feats.items())[:4]))
    feats["p3"] = torch.randn(2, 8, 2, 3)
    with pytest.raises(ValueError, match="'p3'.*8 channels"):
        smsl(feats)


class _ToyNeck(nn.Module):
    def __init__(self, out_channels: int = 16) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.proj = nn.Conv2d(3, out_channels, 1)

    def forward(self, x: OrderedDict) -> OrderedDict:
        return OrderedDict((k, self.proj(v)) for k, v in x.items())


def test_smsl_neck_wraps_a_base_neck():
    neck = build_smsl_neck(_ToyNeck(16), num_levels=4, reduction=4)
    assert isinstance(neck, SMSLNeck) and neck.out_channels == 16 and neck.smsl.in_channels == 16
    x = OrderedDict((str(i), torch.randn(1, 3, 24 >> i, 20 >> i)) for i in range(3))
    x["pool"] = torch.randn(1, 3, 2, 2)
    out = neck(x)
    assert list(out) == ["0", "1", "2", "pool"]
    assert [o.shape[-2:] for o in out.values()] == [v.shape[-2:] for v in x.values()]
    with pytest.raises(ValueError, match="out_channels=16"):
        SMSLNeck(_ToyNeck(16), SMSL(32, 4, 4))


@pytest.mark.parametrize("shape,size", [((2, 3, 100, 167), (25, 42)), ((1, 4, 25, 42), (13, 21)),
                                        ((1, 2, 25, 42), (7, 11)), ((1, 2, 9, 9), (9, 9)), ((1, 1, 5, 7), (3, 4))])
def test_adaptive_max_pool2d_equals_atens(shape, size):
    from smsl.smsl import adaptive_max_pool2d

    x = torch.randn(shape)
    x[0, 0, 0, 0] = float("nan")
    assert torch.equal(adaptive_max_pool2d(x, size).isnan(), F.adaptive_max_pool2d(x, size).isnan())
    x = torch.randn(shape, requires_grad=True)
    out = adaptive_max_pool2d(x, size)
    assert torch.equal(out, F.adaptive_max_pool2d(x, size))
    (g,) = torch.autograd.grad(out.sum(), x)  # no ties in random data: the same argmax, the same gradient
    (ref,) = torch.autograd.grad(F.adaptive_max_pool2d(x, size).sum(), x)
    assert torch.equal(g, ref)
