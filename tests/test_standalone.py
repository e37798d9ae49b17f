"""The standalone causal LM: config validation, save/load, cache continuation and greedy generate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from hippolm.layers import MIXER_TYPES
from hippolm.models import HippoCache, HippoConfig, HippoForCausalLM

VOCAB = 61


def tiny(mixer=MIXER_TYPES, **kw) -> HippoForCausalLM:
    """One layer of every mixer by default, float64 so greedy choices are exact."""
    layers = len(mixer) if isinstance(mixer, (list, tuple)) else 2
    cfg = HippoConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      mixer=list(mixer) if isinstance(mixer, tuple) else mixer, window=5, max_position=64, **kw)
    torch.manual_seed(0)
    model = HippoForCausalLM(cfg).double().eval()
    # Larger output weights than the 0.02 init so logits are not all nearly tied.
    for block in model.model.layers:
        torch.nn.init.normal_(block.mlp.down_proj.weight, std=0.5)
    return model


def ids(B=2, T=9, seed=0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(loaded) is HippoForCausalLM
    assert loaded.config.layer_mixers == list(MIXER_TYPES)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied stays tied
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and all(torch.equal(t, want[k]) for k, t in got.items())
    # Loaded tensors sit at other memory alignments, so BLAS may round differently: 1 ulp, not more.
    x = ids()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-13)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HippoConfig)


def test_untied_embeddings_round_trip(tmp_path):
    model = tiny("gdn", tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = HippoForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits, rtol=0, atol=1e-13)


def test_generate_greedy_equals_repeated_full_forwards():
    model = tiny()
    prompt = ids(T=7)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    seq = prompt
    for _ in range(12):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    assert len(set(out[:, 7:].flatten().tolist())) > 2  # not a degenerate constant output


@pytest.mark.parametrize("mixer", ["swa", "loglinear_mamba2"])
def test_generate_single_mixer_models(mixer):
    model = tiny(mixer)
    prompt = ids(B=1, T=4, seed=3)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


def test_cache_continues_a_forward_exactly():
    model, x = tiny(), ids(T=20)
    full = model(x).logits
    first = model(x[:, :11], use_cache=True)
    cache = first.past_key_values
    assert isinstance(cache, HippoCache) and cache.get_seq_length() == 11
    rest = model(x[:, 11:], past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=0, atol=1e-10)
    assert cache.get_seq_length() == 20
    assert model(x).past_key_values is None  # no cache unless asked for


def test_cache_reorder_follows_the_batch():
    model, x = tiny(), ids(T=10)
    cache = model(x[:, :8], use_cache=True).past_key_values
    cache.reorder_cache(torch.tensor([1, 0]))
    swapped = model(x[[1, 0], 8:], past_key_values=cache).logits
    torch.testing.assert_close(swapped, model(x[[1, 0]]).logits[:, 8:], rtol=0, atol=1e-10)


def test_labels_give_the_shifted_cross_entropy():
    model, x = tiny("attention"), ids()
    labels = x.clone()
    labels[:, :3] = -100
    out = model(x, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown mixer 'mamba3'"):
        HippoConfig(mixer="mamba3")
    with pytest.raises(ValueError, match="unknown mixer 'lstm'"):
        HippoConfig(mixer=["gdn", "lstm"], num_hidden_layers=2)
    with pytest.raises(ValueError, match="3 layers but num_hidden_layers is 2"):
        HippoConfig(mixer=["gdn", "gdn", "swa"], num_hidden_layers=2)
    with pytest.raises(ValueError, match="not divisible"):
        HippoConfig(hidden_size=30, num_attention_heads=4)


@pytest.mark.parametrize("mixer", ["mamba2", "loglinear_gdn"])
def test_A_init_range_sets_the_decay_rates_and_round_trips(mixer, tmp_path):
    torch.manual_seed(0)
    model = HippoForCausalLM(HippoConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, mixer=mixer,
                                         A_init_range=(2.0, 3.0)))
    for block in model.model.layers:
        A = block.mixer.A_log.exp()
        assert A.min() >= 2.0 - 1e-6 and A.max() <= 3.0 + 1e-6
    default = HippoForCausalLM(HippoConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, mixer=mixer))
    assert default.model.layers[0].mixer.A_log.exp().max() > 3.0  # U(1, 16) over 4 heads x 2 layers
    model.save_pretrained(tmp_path)
    assert HippoConfig.from_pretrained(tmp_path).A_init_range == [2.0, 3.0]
    for bad in ((0.0, 1.0), (4.0, 2.0), (1.0,), "1,16"):
        with pytest.raises(ValueError, match="A_init_range"):
            HippoConfig(A_init_range=bad)


def test_padding_is_refused():
    model, x = tiny("gdn"), ids()
    mask = torch.ones_like(x)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        model(x, attention_mask=mask)
    assert torch.equal(model(x, attention_mask=torch.ones_like(x)).logits, model(x).logits)


def test_loglinear_model_refuses_sequences_beyond_max_position():
    model = tiny("loglinear_gdn")
    with pytest.raises(ValueError, match="levels"):
        model(ids(T=65))


@pytest.mark.parametrize("hidden", [16, 64])
@pytest.mark.parametrize("mixer", ["attention", "mamba2", "gdn", "loglinear_gdn"])
def test_new_small_model_projections_keep_unit_scale(mixer, hidden):
    """Regression: with transformers' fixed 0.02 init, a hidden-size-64 model's projections scaled
    their (unit RMS) input by ~0.16 and GDN / Mamba-2 stayed at chance on MQAR for thousands of steps;
    the default init std is now hidden_size ** -0.5, so every input projection keeps unit scale."""
    torch.manual_seed(0)
    model = HippoForCausalLM(HippoConfig(vocab_size=VOCAB, hidden_size=hidden, mixer=mixer, max_position=64))
    assert model.config.initializer_range == pytest.approx(hidden**-0.5)
    x = torch.randn(4096, hidden)  # what a layer's input RMSNorm hands its projections
    mixer_module = model.model.layers[0].mixer
    projections = [m for name, m in mixer_module.named_modules()
                   if isinstance(m, torch.nn.Linear) and name in ("q_proj", "k_proj", "v_proj", "in_proj", "g_proj")]
    assert projections
    for proj in projections:
        assert 0.5 < proj(x).std().item() < 2.0
    # Tied embeddings give logits of order 1 from a normalised hidden state.
    assert 0.5 < (x @ model.lm_head.weight.T).std().item() < 2.0


@pytest.mark.parametrize("mixer", ["attention", "mamba2", "gdn"])
def test_new_model_blocks_start_at_embedding_scale(mixer):
    """Regression: the projections writing into the residual stream (mixer output, MLP down) start
    at std initializer_range / sqrt(fan_in), so each branch adds about a token embedding's scale.
    At the full hidden_size ** -0.5 they added unit scale, ~8x the embeddings at hidden size 64,
    and softmax attention never learned MQAR (see test_mqar.test_attention_solves_tiny_mqar)."""
    torch.manual_seed(0)
    hidden = 64
    model = HippoForCausalLM(HippoConfig(vocab_size=VOCAB, hidden_size=hidden, mixer=mixer, max_position=64))
    std = model.config.initializer_range
    block = model.model.layers[0]
    outputs = [m for m in model.modules() if getattr(m, "_residual_output", False)]
    assert len(outputs) == 2 * model.config.num_hidden_layers  # one per mixer, one per MLP
    assert block.mixer.get_submodule("o_proj" if mixer != "mamba2" else "out_proj") in outputs
    assert block.mlp.down_proj in outputs
    for proj in outputs:
        assert proj.weight.std().item() == pytest.approx(std / proj.in_features**0.5, rel=0.1)
    x = model.model.embed_tokens(ids(T=32))
    with torch.no_grad():
        branch = block.mixer(block.mixer_norm(x), None, output_state=False)[0]
        mlp = block.mlp(block.mlp_norm(x))
    assert x.std().item() == pytest.approx(std, rel=0.2)
    for out in (branch, mlp):
        assert out.std().item() < 2 * std  # not ~sqrt(hidden_size) times the embeddings
