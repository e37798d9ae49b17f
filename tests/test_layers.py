"""Token mixers: state carried across calls gives exactly one full pass; windows; log-linear levels."""

from __future__ import annotations

import pytest
import torch

from hippolm.layers import MIXER_TYPES, KVCache, MixerArgs, RecurrentState, build_mixer

ARGS = MixerArgs(hidden_size=24, num_heads=2, head_dim=8, expand_v=2, window=6, max_position=128)
T = 75  # crosses the op's 64-token chunk and several log-linear level boundaries


def make(kind: str, args: MixerArgs = ARGS, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_mixer(kind, args).double()
    if getattr(m, "levels", None) is not None:
        # Distinct weights per level (a new layer has them all equal, which hides level mistakes).
        torch.nn.init.normal_(m.levels.proj.weight, std=0.5)
    return m


def inputs(B: int = 2, T: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, ARGS.hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kind", MIXER_TYPES)
def test_prefill_then_decode_equals_full_forward(kind):
    m, x = make(kind), inputs()
    full, _ = m(x)
    out, state = m(x[:, :40])
    outs = [out]
    for t in range(40, T):
        o, state = m(x[:, t : t + 1], state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-11)


@pytest.mark.parametrize("kind", MIXER_TYPES)
def test_chunked_prefill_equals_one_pass(kind):
    m, x = make(kind), inputs()
    full, final = m(x)
    outs, state = [], None
    for a, b in [(0, 1), (1, 13), (13, 64), (64, 66), (66, T)]:
        o, state = m(x[:, a:b], state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-11)
    # The carried state is the one-pass state, so either continues identically.
    y = inputs(T=5, seed=2)
    torch.testing.assert_close(m(y, state)[0], m(y, final)[0], rtol=0, atol=1e-11)


@pytest.mark.parametrize("kind", MIXER_TYPES)
def test_sequences_in_a_batch_are_independent(kind):
    m, x = make(kind), inputs(B=3)
    full, _ = m(x)
    alone, _ = m(x[1:2])
    torch.testing.assert_close(full[1:2], alone, rtol=0, atol=1e-11)


@pytest.mark.parametrize("kind", MIXER_TYPES)
def test_state_types_and_no_state_when_not_asked(kind):
    m, x = make(kind), inputs(T=5)
    _, state = m(x)
    assert isinstance(state, KVCache if kind in ("attention", "swa") else RecurrentState)
    out, none = m(x, output_state=False)
    assert none is None
    torch.testing.assert_close(out, m(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", MIXER_TYPES)
def test_every_parameter_gets_a_gradient(kind):
    m = build_mixer(kind, ARGS)
    out, _ = m(inputs(T=20).float())
    out.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if getattr(m, "levels", None) is not None:
        assert m.levels.proj.weight.grad.abs().sum() > 0  # level weights are trained from their zero start


def test_sliding_window_sees_exactly_its_window_and_cache_stays_bounded():
    W = ARGS.window
    m, x = make("swa"), inputs(B=1, T=30)
    base, _ = m(x)
    t, far = 20, 20 - W  # token `far` is just outside the window of query t
    x2 = x.clone()
    x2[0, far] += 1.0
    changed = (m(x2)[0] - base).abs().amax(-1)[0]
    assert changed[t] == 0 and changed[far + W - 1] > 1e-6
    _, state = m(x[:, :3])
    for i in range(3, 30):
        _, state = m(x[:, i : i + 1], state)
        assert state.keys.shape[2] == min(i + 1, W - 1)
    assert state.position == 30


def test_full_attention_differs_from_window():
    x = inputs(T=30)
    full, window = make("attention"), make("swa")
    assert torch.equal(full.q_proj.weight, window.q_proj.weight)  # same seed, same weights
    assert (full(x)[0] - window(x)[0])[:, ARGS.window :].abs().max() > 1e-6
    torch.testing.assert_close(full(x)[0][:, : ARGS.window], window(x)[0][:, : ARGS.window], rtol=0, atol=1e-12)


@pytest.mark.parametrize("base", ["mamba2", "gdn"])
def test_loglinear_with_equal_levels_is_the_linear_layer(base):
    # Collapse oracle at layer level: equal level weights scale the read-out by one number, which
    # the per-head RMSNorm removes (eps ~ 0 and Mamba-2's D skip off, so the identity is exact).
    args = MixerArgs(**{**ARGS.__dict__, "eps": 1e-30})
    lin, log = make(base, args), make(f"loglinear_{base}", args)
    torch.nn.init.zeros_(log.levels.proj.weight)
    state = {k: v for k, v in log.state_dict().items() if not k.startswith("levels.")}
    lin.load_state_dict(state)
    if base == "mamba2":
        lin.D.data.zero_()
        log.D.data.zero_()
    x = inputs()
    torch.testing.assert_close(log(x)[0], lin(x)[0], rtol=1e-9, atol=1e-12)
    torch.nn.init.normal_(log.levels.proj.weight, std=0.5)
    assert (log(x)[0] - lin(x)[0]).abs().max() > 1e-3  # distinct levels do change the layer


def test_loglinear_levels_cover_max_position_and_refuse_longer():
    args = MixerArgs(**{**ARGS.__dict__, "max_position": 16})
    m = make("loglinear_gdn", args)
    assert m.num_levels == 5  # ceil(log2 16) + 1
    _, state = m(inputs(T=16))
    assert state.memory.slots.shape[2] == 5 and state.memory.position.tolist() == [16, 16]
    with pytest.raises(ValueError, match="levels"):
        m(inputs(T=17))
    with pytest.raises(ValueError, match="levels"):
        m(inputs(T=1), state)  # the 17th token, decoded


def test_mamba2_initialisation():
    m = build_mixer("mamba2", MixerArgs(hidden_size=16, num_heads=64, head_dim=4))
    A = m.A_log.exp()
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert A.min() >= 1 and A.max() <= 16
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.A_log, m.dt_bias, m.D))


def test_unknown_mixer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown mixer 'retnet'"):
        build_mixer("retnet", ARGS)
    with pytest.raises(ValueError, match="window"):
        build_mixer("swa", MixerArgs(hidden_size=8, num_heads=1, head_dim=8))


@pytest.mark.parametrize("kind", ["loglinear_mamba2", "loglinear_gdn"])
def test_loglinear_batch_of_sequences_at_different_positions(kind):
    # States merged from prefixes of different lengths: each row continues as it would alone.
    m, x = make(kind), inputs(B=2, T=40)
    _, s0 = m(x[0:1, :30])
    _, s1 = m(x[1:2, :17])
    merged = RecurrentState(torch.cat([s0.conv, s1.conv]),
                            type(s0.memory)(torch.cat([s0.memory.slots, s1.memory.slots]),
                                            torch.cat([s0.memory.position, s1.memory.position])))
    y = inputs(B=2, T=6, seed=5)
    out, state = m(y, merged)
    torch.testing.assert_close(out[0:1], m(y[0:1], s0)[0], rtol=0, atol=1e-11)
    torch.testing.assert_close(out[1:2], m(y[1:2], s1)[0], rtol=0, atol=1e-11)
    assert state.memory.position.tolist() == [36, 23]
