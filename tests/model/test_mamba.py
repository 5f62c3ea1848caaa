"""The Mamba layer: the chunked parallel scan equals the sequential loop (fp32 to 1e-5, float64 to
1e-12) with and without a carried state, for chunk sizes that do and do not divide the length; the
loop equals the recurrence written by hand; the layer equals HF's Jamba mixer (its PyTorch path);
a sequence split in two with the state carried equals it run whole; padding leaves the state alone."""

from __future__ import annotations

import pytest
import torch

from scratchlm.model.mamba import Mamba, scan_chunked, scan_sequential


def scan_inputs(dtype, Bsz=2, T=13, D=6, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bsz, T, D, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(Bsz, T, D, generator=g, dtype=dtype))
    A = -torch.exp(torch.randn(D, N, generator=g, dtype=dtype))
    B = torch.randn(Bsz, T, N, generator=g, dtype=dtype)
    C = torch.randn(Bsz, T, N, generator=g, dtype=dtype)
    h0 = torch.randn(Bsz, D, N, generator=g, dtype=dtype)
    return x, dt, A, B, C, h0


def test_sequential_scan_is_the_recurrence_by_hand():
    x, dt, A, B, C, h0 = scan_inputs(torch.float64, Bsz=1, T=3, D=2, N=2)
    y, h = scan_sequential(x, dt, A, B, C, h0)
    state = h0[0].clone()
    for t in range(3):
        for d in range(2):
            for n in range(2):
                a = torch.exp(dt[0, t, d] * A[d, n])
                state[d, n] = a * state[d, n] + dt[0, t, d] * B[0, t, n] * x[0, t, d]
            assert torch.allclose(y[0, t, d], (state[d] * C[0, t]).sum(), rtol=1e-12, atol=0)
    assert torch.allclose(h[0], state, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_the_sequential_loop(dtype, tol, chunk, with_state):
    x, dt, A, B, C, h0 = scan_inputs(dtype)
    h0 = h0 if with_state else None
    y_ref, h_ref = scan_sequential(x, dt, A, B, C, h0)
    y, h = scan_chunked(x, dt, A, B, C, h0, chunk=chunk)
    scale = y_ref.abs().max()
    assert (y - y_ref).abs().max() <= tol * scale
    assert (h - h_ref).abs().max() <= tol * h_ref.abs().max()


@pytest.mark.parametrize("chunk", [1, 4, 9])
@pytest.mark.parametrize("with_reset", [False, True])
def test_chunked_scan_gradients_equal_the_loop(chunk, with_reset):
    """The chunked scan's hand-written backward (the reversed scan) against autograd through the loop."""
    inputs = [t.requires_grad_() for t in scan_inputs(torch.float64, T=9)]
    reset = torch.tensor([[False] * 4 + [True] + [False] * 4] * 2) if with_reset else None
    y_ref, h_ref = scan_sequential(*inputs, reset=reset)
    g_ref = torch.autograd.grad((y_ref.sin().sum() + h_ref.sum()), inputs)
    y, h = scan_chunked(*inputs, chunk=chunk, reset=reset)
    g = torch.autograd.grad((y.sin().sum() + h.sum()), inputs)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def layer(dtype=torch.float64, scan="chunked", chunk=4) -> Mamba:
    torch.manual_seed(0)
    m = Mamba(16, 32, d_state=4, d_conv=3, dt_rank=3, scan=scan, chunk=chunk)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    m.init_ssm()
    return m.to(dtype)


def test_layer_scans_agree_and_a_split_sequence_equals_it_whole():
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    seq, chunked = layer(scan="sequential"), layer(scan="chunked")
    y_ref, s_ref = seq(u)
    y, s = chunked(u)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    assert s.shape == (2, 32, 3 - 1 + 4)
    y1, s1 = chunked(u[:, :6])
    y2, s2 = chunked(u[:, 6:7], s1)  # one decode step
    y3, s3 = chunked(u[:, 7:], s2)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s3, s_ref, rtol=1e-12, atol=1e-12)


def test_padding_masked_out_leaves_the_row_as_alone():
    m = layer()
    u = torch.randn(1, 7, 16, dtype=torch.float64)
    y_alone, s_alone = m(u)
    padded = torch.cat([torch.randn(1, 3, 16, dtype=torch.float64), u], 1)
    keep = torch.tensor([[False] * 3 + [True] * 7])
    y, s = m(padded, keep=keep)
    torch.testing.assert_close(y[:, 3:], y_alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_alone, rtol=1e-12, atol=1e-12)


def test_layer_equals_hf_jamba_mixer():
    transformers = pytest.importorskip("transformers")

    cfg = transformers.JambaConfig(hidden_size=16, mamba_expand=2, mamba_d_state=4, mamba_d_conv=3, mamba_dt_rank=3,
                                   rms_norm_eps=1e-6, use_mamba_kernels=False, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    # HF's norms and A run in fp32 whatever the input dtype, so compare in fp32
    hf = transformers.models.jamba.modeling_jamba.JambaMambaMixer(cfg, layer_idx=0)
    ours = layer(torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(dict(ours.named_parameters())[name].view_as(p))
    u = torch.randn(2, 9, 16)
    with torch.no_grad():
        ref = hf(u)
        y, _ = ours(u)
    err = (y - ref).abs().max().item()
    print(f"mamba layer vs HF mixer: max abs diff {err:.2e}")
    assert err <= 1e-5 * ref.abs().max().item(), err  # fp32: the same sums in a different order


def test_a_reset_restarts_the_scan_in_both_scans():
    x, dt, A, B, C, h0 = scan_inputs(torch.float64)
    reset = torch.zeros(2, 13, dtype=torch.bool)
    reset[:, 5] = True
    y_ref, h_ref = scan_sequential(x, dt, A, B, C, h0, reset)
    y, h = scan_chunked(x, dt, A, B, C, h0, 4, reset)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    y_tail, h_tail = scan_sequential(x[:, 5:], dt[:, 5:], A, B[:, 5:], C[:, 5:])  # from a zero state
    torch.testing.assert_close(y[:, 5:], y_tail, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_tail, rtol=1e-12, atol=1e-12)
