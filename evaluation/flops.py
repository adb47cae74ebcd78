"""FLOP accounting for the tools: the paper's eq. 1-2 (what its speed-up claims count) and what a
Llama layer really computes, side by side in bench.py and in evaluate.py's records."""


def paper_flops(text_config, n: int, visual: int, evict_layer: int | None, new_tokens: int) -> tuple[float, float]:
    """Paper eq. 1-2: (prefill, decode) FLOPs of a decoder for a prompt of n tokens, `visual` of
    them visual, generating new_tokens. text_config: anything with num_hidden_layers, hidden_size
    and intermediate_size (T, d, m). With Stage 2, layers before and after the eviction count with
    their own length: the evicting layer's prefill still sees the visual tokens, its decoding not."""
    d, m, T, L = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers, new_tokens

    def prefill(n):
        return 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m

    def decode(n):
        return 4 * L * d**2 + 2 * L * d * m + d * L * (2 * n + L - 1)

    if evict_layer is None:
        return T * prefill(n), T * decode(n)
    before, after = evict_layer + 1, T - evict_layer - 1
    return (
        before * prefill(n) + after * prefill(n - visual),
        evict_layer * decode(n) + (T - evict_layer) * decode(n - visual),
    )


def exact_prefill_flops(cfg, n: int, visual: int, evict_layer: int | None) -> float:
    """What a Llama layer really computes, for comparison with eq. 1: q/k/v/o projections (GQA-sized
    k and v), the three SwiGLU matrices (eq. 1 counts two), and causal attention (each query sees
    its prefix, n(n+1)/2 pairs, where eq. 1 counts n^2). 2 FLOPs per multiply-add."""
    d, m, T = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim

    def layer(n):
        return 2 * (n * d * (2 * d + 2 * kv) + 3 * n * d * m + n * (n + 1) * d)

    if evict_layer is None:
        return T * layer(n)
    return (evict_layer + 1) * layer(n) + (T - evict_layer - 1) * layer(n - visual)
