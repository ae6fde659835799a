"""MultiAxisAttention with the local backend against nn.MultiheadAttention, and its input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mosaic
from mosaic.testing import mha_reference

CASES = [
    ("axis 1 of 4-D", (2, 7, 3, 16), 1),
    ("axis 2 of 4-D", (2, 3, 7, 16), 2),
    ("axis -2 of 4-D", (2, 3, 6, 16), -2),
    ("axis 1 of 3-D", (3, 9, 16), 1),
    ("axis 3 of 5-D", (2, 2, 3, 5, 16), 3),
    ("axis 0 of 4-D", (6, 2, 3, 16), 0),
]


def _check(module, x, kv=None, **kwargs):
    x = x.clone().requires_grad_()
    kv = None if kv is None else kv.clone().requires_grad_()
    grad = torch.randn_like(x)
    leaves = [x] + ([kv] if kv is not None else []) + list(module.parameters())
    got = torch.autograd.grad(module(x, kv, **kwargs), leaves, grad)
    out = module(x, kv, **kwargs)
    ref = mha_reference(module, x, kv, **kwargs)
    want = torch.autograd.grad(ref, leaves, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,shape,axis", CASES)
@pytest.mark.parametrize("kwargs", [{}, {"kv_len": 3}, {"causal": True}, {"kv_len": 4, "causal": True}])
def test_local_matches_multihead_attention(name, shape, axis, kwargs):
    torch.manual_seed(0)
    module = mosaic.MultiAxisAttention(16, 4, axis)
    _check(module, torch.randn(shape), **kwargs)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_kv_heads_match_repeated_heads(kv_heads):
    torch.manual_seed(1)
    module = mosaic.MultiAxisAttention(16, 4, 1, num_kv_heads=kv_heads)
    _check(module, torch.randn(2, 9, 3, 16), kv_len=5)


def test_cross_attention_matches_sliced_keys():
    torch.manual_seed(2)
    module = mosaic.MultiAxisAttention(16, 4, 2)
    x, kv = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 8, 16)
    _check(module, x, kv, kv_len=6)
    # kv_len keeps exactly the first kv_len positions of the source.
    torch.testing.assert_close(module(x, kv, kv_len=6), module(x, kv[:, :, :6]))


def test_loads_a_multihead_attention_checkpoint():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    module = mosaic.MultiAxisAttention(16, 4, 1)
    module.load_state_dict(mha.state_dict())
    x = torch.randn(5, 7, 16)
    torch.testing.assert_close(module(x), mha(x, x, x, need_weights=False)[0])


def test_autocast_runs_low_precision_activations_with_fp32_parameters():
    torch.manual_seed(5)
    module = mosaic.MultiAxisAttention(16, 4, 1)
    x = torch.randn(2, 9, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x.bfloat16(), kv_len=4)
    torch.testing.assert_close(out.float(), mha_reference(module, x, kv_len=4), rtol=3e-2, atol=3e-2)


def test_dropout_is_active_only_in_training():
    torch.manual_seed(4)
    module = mosaic.MultiAxisAttention(16, 4, 1, dropout=0.5)
    x = torch.randn(2, 9, 16)
    module.eval()
    torch.testing.assert_close(module(x), mha_reference(module, x))
    module.train()
    assert not torch.allclose(module(x), mha_reference(module, x))


def test_bad_inputs_raise_clear_errors():
    module = mosaic.MultiAxisAttention(16, 4, 1)
    with pytest.raises(ValueError, match="attention_axis 5 is out of range"):
        mosaic.MultiAxisAttention(16, 4, 5)(torch.randn(2, 3, 4, 16))
    with pytest.raises(ValueError, match="last dim, which is embed"):
        mosaic.MultiAxisAttention(16, 4, -1)(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="embed size 8"):
        module(torch.randn(2, 3, 4, 8))
    with pytest.raises(ValueError, match="at least 3 dims"):
        module(torch.randn(3, 16))
    with pytest.raises(ValueError, match="not divisible by num_heads 5"):
        mosaic.MultiAxisAttention(16, 5, 1)
    with pytest.raises(ValueError, match="not divisible by num_kv_heads 3"):
        mosaic.MultiAxisAttention(16, 4, 1, num_kv_heads=3)
    for kv_len in (0, 8):
        with pytest.raises(ValueError, match=rf"kv_len={kv_len} is outside \[1, 7\]"):
            module(torch.randn(2, 7, 3, 16), kv_len=kv_len)
    with pytest.raises(TypeError, match="kv_len must be an int"):
        module(torch.randn(2, 7, 3, 16), kv_len=2.5)
    with pytest.raises(ValueError, match="kv shape"):
        module(torch.randn(2, 7, 3, 16), torch.randn(2, 7, 4, 16))
    with pytest.raises(TypeError, match=r"x is torch.int64 on cpu but the module's parameters are torch.float32"):
        module(torch.randint(0, 3, (2, 7, 3, 16)))
    with pytest.raises(ValueError, match="unknown layout"):
        mosaic.MultiAxisAttention(16, 4, 1, layout="striped")
