"""llama.py: RoPE scaling as transformers' Llama computes it, and how its configs are read."""

import pytest
import torch
import transformers as tf

import conftest

ROPE_SCALINGS = {"linear": {"rope_type": "linear", "factor": 2.0}, "dynamic": {"rope_type": "dynamic", "factor": 3.0}}


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers_llama_past_the_original_context(kind):
    """A tiny transformers Llama with max_position_embeddings 24 run over 40 positions and then 6
    decoded tokens (dynamic NTK rescales at every step past 24), against ours on its weights."""
    from llama import KVCache, Llama, LlamaConfig

    params = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=24,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    hf_config = tf.LlamaConfig(**params, rope_scaling=dict(ROPE_SCALINGS[kind]), attn_implementation="eager")
    hf = tf.LlamaForCausalLM(hf_config).eval()
    conftest.randomize(hf, seed=11)
    ours = Llama(LlamaConfig.from_dict({**params, "rope_scaling": dict(ROPE_SCALINGS[kind])})).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = hf(ids, use_cache=True)
        cache, got_cache = expected.past_key_values, KVCache(2, room=6)
        got = ours(ours.embed_tokens(ids), torch.arange(40), got_cache)
        assert (got - expected.logits).abs().max() < 1e-4
        token = expected.logits[0, -1].argmax()
        for step in range(6):
            expected = hf(token.view(1, 1), past_key_values=cache, use_cache=True)
            got = ours(ours.embed_tokens(token.view(1, 1)), torch.tensor([40 + step]), got_cache)
            assert (got - expected.logits).abs().max() < 1e-4
            cache, token = expected.past_key_values, expected.logits[0, -1].argmax()
        plain = Llama(LlamaConfig.from_dict(params)).eval()
        plain.load_state_dict(ours.state_dict())
        unscaled = plain(plain.embed_tokens(ids), torch.arange(40), KVCache(2, room=0))
        assert (unscaled - ours(ours.embed_tokens(ids), torch.arange(40), KVCache(2, room=0))).abs().max() > 1e-3


def test_rope_scaling_is_read_as_transformers_reads_it():
    from llama import rope_parameters

    both = {
        "rope_theta": 1e4,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "rope_parameters": {"rope_type": "default"},
    }
    assert rope_parameters(both) == {"rope_theta": 1e4, "rope_type": "linear", "rope_factor": 2.0}  # rope_scaling wins
    nested = {"rope_theta": 1e4, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}}
    assert rope_parameters(nested) == {"rope_theta": 5e5, "rope_type": "dynamic", "rope_factor": 2.0}
    assert rope_parameters({"rope_theta": 1e4}) == {"rope_theta": 1e4, "rope_type": "default", "rope_factor": 1.0}
