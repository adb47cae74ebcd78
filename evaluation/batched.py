"""Many questions about one image, answered together: the image's prefix computed once, the
questions' own tokens prefilled and decoded as one batch, each with its own ToDRE Stage 2.

Both shortcuts are exact for ToDRE on a causal decoder:
- The prefix (every token up to and including the last visual token) never attends to what
  follows it, so its keys and values at every layer are the same for every question about that
  image under one configuration: computed once, held once, read by every row.
- Stage 2 (eq. 7) measures a_tv from the text queries, which are all in a question's own tokens,
  against the keys of the whole sequence; a_vt is exactly 0 when the image precedes the text. When
  question r evicts after layer L_r, its own tokens stop seeing the visual keys: in its prefill
  from layer L_r + 1 on, in its decoding from layer L_r on (the evicting layer's cache loses them,
  as in Llava.prefill). The tokens before the image never saw it, so their entries stay valid.
  So each row evicts at its own layer against one shared prefix (a mask over the prefix's visual
  keys), and its answer is the answer it gets alone.

The decoder's own layers compute (norms, projections, MLP); only attention is written here, as two
parts (the shared prefix, the row's own keys) under one softmax, and the rows' Stage 2 decisions
are todre.Stage2's. Batch size 1 with the prefix recomputed is model.generate.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import todre
from llama import apply_rope
from model import Llava, Placement, PrefillInfo, penalize


@dataclass
class Row:
    """What one question of a batch produced: as model.Generation, without its own timings."""

    token_ids: list[int]
    info: PrefillInfo
    logits: list[torch.Tensor] = field(default_factory=list)  # each step's (vocab,) model logits, when asked for


def shared_prefix(prompts: list[torch.Tensor], is_visual) -> int | None:
    """The length p of the prefix every prompt shares, ending at the last visual token, or None when
    the prompts do not share it token for token (a format that puts text before the image) or the
    text after the image is empty."""
    first = prompts[0]
    visual = is_visual(first).nonzero()
    if len(visual) == 0:
        return None
    p = int(visual[-1]) + 1
    for ids in prompts:
        if len(ids) <= p or not torch.equal(ids[:p], first[:p]):
            return None
    return p


@torch.inference_mode()
def prefill_prefix(
    model: Llava, ids: torch.Tensor, visual_embeds: torch.Tensor, placement: Placement | None = None
) -> list[tuple]:
    """The prefix's keys and values at every layer, [(k, v) each (kv_heads, p, head_dim)]: the whole
    decoder run once over it, no Stage 2 (it has no text queries). placement: as model.generate's."""
    cache = model.new_kv_cache(0)
    model.prefill(ids, visual_embeds, todre.NO_PRUNING, cache, placement=placement)
    return [tuple(t[0] for t in cache.get(i)) for i in range(len(model.language_model.layers))]


@torch.inference_mode()
def answer_batch(
    model: Llava,
    prompts: list[torch.Tensor],
    p: int,
    prefix: list[tuple],
    settings: todre.Settings,
    max_new_tokens: int,
    keep_logits: bool = False,
    placement: Placement | None = None,
) -> list[Row]:
    """Greedy answers to `prompts` (each (n_r,) ids, all sharing `prefix`, the keys and values of
    their first p tokens): their own tokens prefilled together, then decoded together, each row
    stopping at its own stop token or max_new_tokens, each with its own Stage 2 (and the
    checkpoint's repetition penalty over its own prompt and answer, as model.decode)."""
    lm, device = model.language_model, model.device
    start = text_start(model, prompts[0], p, placement)
    b, layers = len(prompts), len(lm.layers)
    own = [ids[p:] for ids in prompts]
    sizes = [len(t) for t in own]  # each row's own tokens
    lengths, width = torch.tensor(sizes, device=device), max(sizes)
    ids = torch.zeros(b, width, dtype=torch.long, device=device)
    for r, t in enumerate(own):
        ids[r, : len(t)] = t
    visual = model.is_visual(prompts[0][:p]).nonzero()[:, 0]  # eq. 7's V: in the prefix, the same for every row
    stage2 = []
    for ids_r in prompts:
        _, text = todre.token_sets(model.is_visual(ids_r))
        stage2.append(todre.Stage2(settings, layers, visual, text))
    # Keys and values of each row's own tokens, then of what it generates: (b, kv_heads, room, head_dim).
    room = width + max_new_tokens
    own_k, own_v = [None] * layers, [None] * layers
    evicted = [layers] * b  # the layer after which each row's image left (kept on the host: no syncs)

    # Prefill of the rows' own tokens: positions start .. start + n_r - 1, padding after each row's end.
    positions = start + torch.arange(width, device=device)
    valid = torch.arange(room, device=device)[None, :] < lengths[:, None]  # (b, room): own keys so far
    x = lm.embed_tokens(ids)  # (b, width, d)
    cos, sin = text_rope(model, positions, x.dtype)  # (width, head_dim), the same positions for every row
    for i, layer in enumerate(lm.layers):
        see_visual = torch.tensor(
            [e >= i for e in evicted], device=device
        )  # prefill: evicted after L, unseen from L + 1
        h, q, k, v = attend(
            layer, x, cos, sin, prefix[i], None, None, valid[:, :width], see_visual, visual, causal=True
        )
        own_k[i] = torch.cat([k, k.new_zeros(b, k.shape[1], room - width, k.shape[3])], dim=2)
        own_v[i] = torch.cat([v, v.new_zeros(b, v.shape[1], room - width, v.shape[3])], dim=2)
        x = mlp(layer, x + h)
        for r, n in enumerate(sizes):
            if evicted[r] < layers or (i not in stage2[r].measured and i != stage2[r].evict_at):
                continue  # evicted already, or nothing for Stage 2 to do at this layer
            q_full = torch.cat([q.new_zeros(q.shape[1], p, q.shape[3]), q[r, :, :n]], dim=1)  # prefix rows: never read
            k_full = torch.cat([prefix[i][0], k[r, :, :n]], dim=1)
            if stage2[r].after_layer(i, q_full, k_full) is not None:
                evicted[r] = i
    last = x[torch.arange(b, device=device), lengths - 1]  # each row's last own token
    logits = lm.logits(last[:, None])[:, 0]  # (b, vocab)

    # Decoding: row r's token s goes at position start + n_r + s, its keys at index width + s.
    rows = [Row([], PrefillInfo(s.ratios, s.evict_layer)) for s in stage2]
    done = [False] * b
    seen = [set(ids_r.tolist()) for ids_r in prompts] if model.repetition_penalty != 1.0 else None
    for step in range(max_new_tokens):
        scores = logits
        if seen is not None:  # each row's own prompt and answer so far, as model.decode
            scores = torch.stack([penalize(logits[r], seen[r], model.repetition_penalty) for r in range(b)])
        tokens = scores.argmax(-1).tolist()  # greedy, as model.sample at temperature 0: one sync per step
        for r, token in enumerate(tokens):
            if done[r]:
                continue  # a finished row is still computed with the batch, its tokens ignored
            if keep_logits:
                rows[r].logits.append(logits[r])  # the model's, before any penalty
            if token in model.stop_ids:
                done[r] = True
            else:
                rows[r].token_ids.append(token)
                if seen is not None:
                    seen[r].add(token)
        if all(done) or step == max_new_tokens - 1:
            break
        x = lm.embed_tokens(torch.tensor(tokens, device=device)[:, None])  # (b, 1, d)
        position = (start + lengths + step)[:, None]  # (b, 1): each row's own position
        cos, sin = text_rope(model, position.flatten(), x.dtype)
        cos, sin = cos[:, None, None], sin[:, None, None]  # (b, 1, 1, head_dim): per row
        slot = width + step
        valid[:, slot] = True
        for i, layer in enumerate(lm.layers):
            see_visual = torch.tensor([e > i for e in evicted], device=device)  # decoding: from L on
            h, _, k, v = attend(layer, x, cos, sin, prefix[i], own_k[i], own_v[i], valid, see_visual, visual, slot=slot)
            x = mlp(layer, x + h)
        logits = lm.logits(x)[:, 0]
    return rows


def text_start(model, ids: torch.Tensor, p: int, placement: Placement | None) -> int:
    """The position of token p, the first of the rows' own (text) tokens: p with positions counting
    0..n-1 (LLaVA); with Qwen2.5-VL's M-RoPE, where its image's grid puts the text after it."""
    if placement is None:
        return p
    return int(model.positions(ids[: p + 1], placement)[0, -1])


def text_rope(model, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin (n, head_dim) of text tokens at 1-D positions: Qwen2.5-VL's M-RoPE gives a text
    token the same position three times."""
    if isinstance(model, Llava):
        return model.language_model.rope(positions, dtype)
    return model.rope(positions.expand(3, -1), dtype)


def mlp(layer, x):
    h = layer.post_attention_layernorm(x)
    return x + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))


def attend(layer, x, cos, sin, prefix_kv, own_k, own_v, valid, see_visual, visual, causal=False, slot=None):
    """One layer's self-attention for a batch of rows over [the shared prefix | each row's own keys].

    x (b, t, d). prefix_kv: (k, v) each (kv_heads, p, head_dim), read by every row, never copied
    per row. Own keys: this call's (prefill, t > 1, causal) or own_k/own_v buffers (decoding, t = 1,
    this token's written at `slot`). valid (b, own keys): which own keys exist; see_visual (b,):
    whether each row still sees the prefix's visual keys. Returns (out (b, t, d), q, k, v) with q
    (b, heads, t, head_dim) after RoPE and this call's k, v (b, kv_heads, t, head_dim)."""
    attn = layer.self_attn
    b, t, _ = x.shape
    hx = layer.input_layernorm(x)
    q = attn.q_proj(hx).view(b, t, attn.heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hx).view(b, t, attn.kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(hx).view(b, t, attn.kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if slot is not None:
        own_k[:, :, slot] = k[:, :, 0]
        own_v[:, :, slot] = v[:, :, 0]
        keys, values = own_k, own_v
    else:
        keys, values = k, v
    group = attn.heads // attn.kv_heads
    qg = q.view(b, attn.kv_heads, group, t, attn.head_dim)  # GQA: query heads grouped by their kv head
    pk, pv = prefix_kv
    scale = attn.head_dim**-0.5
    # Products in the model's dtype, as scaled_dot_product_attention computes them; softmax in float32.
    prefix_scores = torch.einsum("bkgtd,kpd->bkgtp", qg, pk).float() * scale  # (b, kv, g, t, p)
    own_scores = torch.einsum("bkgtd,bksd->bkgts", qg, keys).float() * scale  # (b, kv, g, t, s)
    prefix_mask = torch.ones(b, pk.shape[1], dtype=torch.bool, device=x.device)
    prefix_mask[:, visual] = see_visual[:, None]
    own_mask = valid[:, None, :].expand(b, t, keys.shape[2])
    if causal:
        own_mask = own_mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    scores = torch.cat(
        [
            prefix_scores.masked_fill(~prefix_mask[:, None, None, None, :], float("-inf")),
            own_scores.masked_fill(~own_mask[:, None, None], float("-inf")),
        ],
        dim=-1,
    )
    weights = scores.softmax(-1).to(x.dtype)
    p = pk.shape[1]
    out = torch.einsum("bkgtp,kpd->bkgtd", weights[..., :p], pv)
    out = out + torch.einsum("bkgts,bksd->bkgtd", weights[..., p:], values)
    out = out.reshape(b, attn.heads, t, attn.head_dim).transpose(1, 2).reshape(b, t, -1)
    return attn.o_proj(out), q, k, v
