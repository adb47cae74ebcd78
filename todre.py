"""ToDRE: training-free visual token pruning by diversity and task relevance (arXiv 2505.18757 v1).

Pure tensor functions and their settings; imports only torch and the standard library, so this file
can be copied into another codebase alone.

Stage 1 (before the LLM, paper §4.1, Algorithm 1): pick a pivot by [CLS] attention, then grow a
maximally diverse set of k visual tokens with greedy k-center on cosine similarity (the paper's
v2 revision uses greedy max-sum instead: `greedy_max_sum`).
Stage 2 (inside the LLM prefill, paper §4.2): at a few probe layers, measure how much attention
flows between text and visual tokens (eq. 7); once both directions fall below tau, the visual
tokens have handed their information to the text and are removed for the rest of the model.
"""

import math
from dataclasses import dataclass, replace

import torch

V1_PROBES = (4 / 8, 5 / 8, 6 / 8, 7 / 8)  # paper v1 §4.2: L/2, 5L/8, 6L/8, 7L/8
V2_PROBES = (7 / 8,)  # paper v2: one probe layer


def is_count(value) -> bool:
    """An int that is not a bool: a token count, a layer number."""
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Stage 1: diversity-driven selection, before the LLM
# ---------------------------------------------------------------------------------------------


def token_budget(num_candidates: int, retain: float = 1.0, keep_tokens: int | None = None) -> int:
    """k for Stage 1: `keep_tokens` if given, else round(retain * num_candidates); clamped to
    [1, num_candidates]. 0.10 of the 2880 patch tokens of a 672x672 image keeps 288, 0.25 keeps 720."""
    check_budget(retain, keep_tokens)
    if keep_tokens is not None:
        return min(num_candidates, keep_tokens)
    return max(1, min(num_candidates, round(retain * num_candidates)))


def check_budget(retain, keep_tokens) -> None:
    """ValueError unless retain is a fraction in (0, 1] and keep_tokens None or a positive count."""
    if isinstance(retain, bool) or not isinstance(retain, (int, float)) or not 0 < retain <= 1:  # NaN fails too
        hint = f"; for a token count use keep_tokens={retain}" if is_count(retain) and retain > 1 else ""
        raise ValueError(f"retain is a fraction in (0, 1], got {retain!r}{hint}")
    if keep_tokens is not None and not (is_count(keep_tokens) and keep_tokens >= 1):
        raise ValueError(f"keep_tokens must be a positive integer, got {keep_tokens!r}")


def select_pivot(cls_attn: torch.Tensor, anyres: bool) -> int:
    """The pivot token (Algorithm 1, lines 1-6) as an index into `cls_attn.flatten()`.

    cls_attn: (crops, t) [CLS] -> patch attention per crop (AnyRes: crop 0 is the global thumbnail),
    or (1, t) for a single image without AnyRes, or (frames, t) for a video.
    - AnyRes: the highest-scoring token of the thumbnail, which sees the whole image.
    - otherwise: the highest-scoring token overall; for video that is argmax over (f, t), i.e. a*t + b.
    Ties go to the lowest index.
    """
    scores = cls_attn[0] if anyres else cls_attn.flatten()
    return int(scores.argmax())


def random_pivot(num_candidates: int, seed: int) -> int:
    """A pivot drawn uniformly from the candidates, reproducibly (the paper v2's random-pivot ablation)."""
    return int(torch.randint(num_candidates, (1,), generator=torch.Generator().manual_seed(seed)))


def greedy_k_center(features: torch.Tensor, k: int, pivot: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Greedy k-center on cosine similarity (paper v1, eq. 4-5, Algorithm 1 lines 7-13).

    features: (n, d) candidate tokens. Returns LongTensor[k] of distinct row indices in selection
    order, the pivot first. Each step adds the token whose highest similarity to the chosen set is
    lowest: s <- V V_p^T; repeat c = argmin s, s <- max(s, V V_c^T).
    Ties go to the lowest index; a zero row has similarity 0 with everything. Rows holding NaN or
    inf raise ValueError. O(n*k*d) time and O(n*d) extra memory (one normalised copy of the
    features, never an n x n matrix). `dtype`: see `scaled_rows`.
    """
    return _greedy_diverse(features, k, pivot, torch.maximum, dtype)


def greedy_max_sum(features: torch.Tensor, k: int, pivot: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Greedy max-sum diversification (the paper's v2 revision): as greedy_k_center, but the
    running score is the SUM of cosine similarities to the chosen set:
    s <- X X_p^T; repeat c = argmin s, s <- s + X X_c^T. Same interface and guarantees."""
    return _greedy_diverse(features, k, pivot, torch.add, dtype)


def scaled_rows(features: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features made safe for cosine similarity in any dtype: (rows, inv_norm) such that
    `(rows @ rows[c]) * inv_norm * inv_norm[c]` is the cosine similarity of every row to row c.

    Each row is divided by the power of two at or above its largest magnitude, which is exact in
    binary floating point (exact ties stay exact) and bounds every entry by 1, so a product of two
    rows cannot overflow even in float16, where `features @ features[c]` overflows to inf once
    token norms pass ~256. inv_norm (n,) is 1 / row norm in float32 (float64 for float64 input),
    0 for a zero row, which therefore has similarity 0 with everything.
    dtype: the dtype of `rows`, in which similarities are computed. By default float64 and float32
    features keep their own, and 16-bit features use float16: with rows bounded it cannot
    overflow, it has 3 more mantissa bits than bfloat16, and it was the fastest here (288 steps
    over 2880 x 4096 tokens on a 2-core CPU: float16 0.28 s, float32 0.69 s, bfloat16 0.73 s;
    GPUs run both 16-bit types at the same speed).
    Raises ValueError naming the rows that hold NaN or inf.
    """
    bad = (~torch.isfinite(features)).any(dim=-1).nonzero()[:, 0].tolist()
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ValueError(f"features hold NaN or inf in {len(bad)} row(s): {shown}")
    if dtype is None:
        dtype = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float16
    wide = torch.promote_types(features.dtype, torch.float32)
    largest = features.abs().amax(dim=-1, keepdim=True).to(wide)
    power_of_two = torch.exp2(torch.ceil(torch.log2(largest))).where(largest > 0, torch.ones_like(largest))
    rows = features.to(wide, copy=True).div_(power_of_two)  # the one copy of the features
    norm = torch.linalg.vector_norm(rows, dim=-1)
    inv_norm = torch.where(norm > 0, 1 / norm, torch.zeros_like(norm))
    return rows.to(dtype), inv_norm


@torch.no_grad()  # a selection has no gradient; features that require one are fine
def _greedy_diverse(features: torch.Tensor, k: int, pivot: int, update, dtype) -> torch.Tensor:
    """The greedy loop both selectors share; `update(score, similarity_to_new_token)` is max or sum."""
    n = features.shape[0]
    if not 1 <= k <= n or not 0 <= pivot < n:
        raise ValueError(f"need 1 <= k <= n and 0 <= pivot < n, got k={k}, pivot={pivot}, n={n}")
    rows, inv_norm = scaled_rows(features, dtype)

    def similarity(c):  # (n,) cosine similarity of every token to token c, in float32 or wider
        return (rows @ rows[c]).to(inv_norm.dtype) * inv_norm * inv_norm[c]

    chosen = torch.empty(k, dtype=torch.long, device=features.device)
    chosen[0] = pivot
    score = similarity(pivot)
    score[pivot] = float("inf")  # chosen tokens can never be the argmin again
    for i in range(1, k):
        c = torch.argmin(score)  # the token least similar to everything chosen so far
        chosen[i] = c
        update(score, similarity(c), out=score)
        score[c] = float("inf")
    return chosen


def cls_top_k(cls_scores: torch.Tensor, k: int) -> torch.Tensor:
    """[CLS] baseline, one global top-k: the k candidates with the highest [CLS] attention, best
    first, whatever crop they are in. cls_scores: (n,). Ties go to the lowest index."""
    if not 1 <= k <= cls_scores.shape[0]:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={cls_scores.shape[0]}")
    return torch.sort(cls_scores, descending=True, stable=True).indices[:k]


def cls_top_k_per_crop(cls_scores: torch.Tensor, crops: torch.Tensor, k: int) -> torch.Tensor:
    """FasterVLM's [CLS] baseline on tiled images: every crop keeps its own best tokens.

    cls_scores: (n,) each candidate's [CLS] attention within its crop; crops: (n,) its crop (or
    frame) number. Each crop keeps round(k / n * its candidates) of its highest-scoring tokens
    (= round(retain * its candidates)); rounding can leave the total off k by a few, so the
    lowest-scoring kept tokens are then dropped, or the highest-scoring others added, until exactly
    k remain. Ties go to the lowest index. Returns LongTensor[k], sorted by index.
    """
    n = cls_scores.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    order = torch.sort(cls_scores, descending=True, stable=True).indices  # best first, overall
    _, crop_of, counts = crops.unique(return_inverse=True, return_counts=True)
    quota = torch.tensor([round(k / n * c) for c in counts.tolist()], device=crops.device)
    rank_in_crop = torch.empty(n, dtype=torch.long, device=crops.device)
    for c in range(len(counts)):
        mine = order[crop_of[order] == c]  # this crop's candidates, best first
        rank_in_crop[mine] = torch.arange(len(mine), device=crops.device)
    kept = rank_in_crop < quota[crop_of]
    kept_by_score, others_by_score = order[kept[order]], order[~kept[order]]
    if len(kept_by_score) >= k:
        chosen = kept_by_score[:k]  # trim the lowest-scoring kept tokens
    else:
        chosen = torch.cat([kept_by_score, others_by_score[: k - len(kept_by_score)]])  # fill with the best others
    return chosen.sort().values


@dataclass
class Candidates:
    """Stage 1's input: the candidate visual tokens and what the selectors read of them."""

    features: torch.Tensor  # (n, d) candidate tokens (after the projector, in LLM embedding space)
    cls_scores: torch.Tensor  # (n,) each candidate's [CLS] attention within its crop or frame
    crops: torch.Tensor  # (n,) the crop (or frame) each candidate comes from
    pivot: int  # the candidate Algorithm 1 starts from (select_pivot)


# Stage 1 selectors by name, each (candidates, k) -> LongTensor of k candidate indices: the paper's
# two diversity selections, and the [CLS] baseline of FasterVLM (a Table 1 peer), per crop as
# FasterVLM does or as one global top-k.
SELECTORS = {
    "kcenter": lambda c, k: greedy_k_center(c.features, k, c.pivot),
    "maxsum": lambda c, k: greedy_max_sum(c.features, k, c.pivot),
    "cls": lambda c, k: cls_top_k_per_crop(c.cls_scores, c.crops, k),
    "cls-global": lambda c, k: cls_top_k(c.cls_scores, k),
}


# ---------------------------------------------------------------------------------------------
# Stage 2: relevance-driven eviction, inside the LLM prefill
# ---------------------------------------------------------------------------------------------


def probe_layers(num_layers: int, fractions=V1_PROBES) -> list[int]:
    """Decoder layers (0-based indices) where Stage 2 measures eq. 7.

    The paper numbers layers from 1 (its Table 6 probes layer L, which exists only when counting
    from 1), so layer f*L of the paper is index f*L - 1 here (rounded down, at least 0):
    v1's L/2, 5L/8, 6L/8, 7L/8 are 15, 19, 23, 27 for 32 layers and 19, 24, 29, 34 for 40;
    v2's 7L/8 is 27 for 32 layers.
    """
    return sorted({max(0, int(f * num_layers) - 1) for f in fractions})


def cross_modal_ratios(
    q: torch.Tensor, k: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, chunk: int = 256
) -> tuple[float, float]:
    """Eq. 7: the share of attention that text queries pay to visual keys (a_tv), and vice versa (a_vt).

    q: (heads, n, head_dim) one layer's queries after RoPE, for a causal prefill of n tokens;
    k: (kv_heads, n, head_dim) its keys (GQA: query head h reads kv head h // (heads / kv_heads)).
    visual, text: LongTensor positions of the V and T tokens; all others (S) count only as keys.
    A is the causal softmax attention averaged over heads. Two exact shortcuts keep this cheap:
    every row of A sums to 1, so a ratio's denominator is its number of query rows; and a query
    can attend to a target only if some target sits at or before it, so only those rows are
    computed (`chunk` rows at a time). With the image before the text no visual row qualifies and
    a_vt is exactly 0; text before the image computes the rows it needs.
    Returns (a_tv, a_vt) as floats; a ratio over an empty set of queries is 0.
    """
    heads, n, head_dim = q.shape
    keys = k.float().repeat_interleave(heads // k.shape[0], dim=0)  # (heads, n, head_dim)
    key_pos = torch.arange(n, device=q.device)

    def ratio(queries: torch.Tensor, targets: torch.Tensor) -> float:
        if len(queries) == 0 or len(targets) == 0:
            return 0.0
        is_target = torch.zeros(n, dtype=torch.bool, device=q.device)
        is_target[targets] = True
        rows = queries[queries >= targets.min()]  # the other rows see no target through the causal mask
        to_target = torch.zeros((), device=q.device)
        for part in rows.split(chunk):
            scores = (q[:, part].float() @ keys.transpose(1, 2)) * head_dim**-0.5  # (heads, r, n)
            scores.masked_fill_(key_pos[None, None, :] > part[None, :, None], float("-inf"))  # causal
            attn = scores.softmax(dim=-1).mean(dim=0)  # (r, n): A_ij averaged over heads
            to_target = to_target + attn[:, is_target].sum()
        return float(to_target) / len(queries)

    return ratio(text, visual), ratio(visual, text)


def should_evict(ratios: tuple[float, float], tau: float) -> bool:
    """Paper §4.2: the visual tokens go once both a_tv and a_vt (eq. 7) have fallen below tau."""
    return all(ratio < tau for ratio in ratios)


def token_sets(is_visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7's token sets from a (n,) bool mask of the visual positions: (V, T) as LongTensor
    positions. V is the image (or video); T is the text after it; the tokens before the image (S:
    the system prompt and the start of the question) are neither, and count only as keys."""
    positions = torch.arange(len(is_visual), device=is_visual.device)
    visual = positions[is_visual]
    text = positions[positions > visual.max()] if len(visual) else positions[:0]
    return visual, text


class Stage2:
    """ToDRE Stage 2 (paper §4.2) for one prefill, as a unit a host's layer loop calls:

        stage2 = Stage2(settings, num_layers, visual, text)   # visual, text: token_sets(...)
        for i, layer in enumerate(layers):
            ...                                       # run layer i; keep its post-RoPE q and its keys
            keep = stage2.after_layer(i, q, k)        # q (heads, n, head_dim), k (kv_heads, n, head_dim)
            if keep is not None:                      # LongTensor: indices of the current sequence that stay
                ...                                   # drop the others from x and from layer i's KV cache

    It measures eq. 7 at the probe layers of `settings` (every layer with every_layer=True, the
    paper's Figure 2, without changing what it decides), and fires at most once: at the first probe
    layer where both ratios are below tau, or after settings.evict_layer whatever the ratios. After
    firing it returns None and measures nothing. It never fires without visual tokens, nor with
    tau 0 and no evict_layer. What the host must do when it fires:
    - remove the visual tokens from the residual stream before layer i + 1, and from layer i's KV
      cache too (decoding reads that cache: the evicting layer's prefill saw the image, its decoding
      does not); layers after i never see them;
    - keep every remaining token's original position (the RoPE angles are not recomputed);
    - continue decoding at position n, the prompt's length before the eviction.
    """

    def __init__(
        self, settings: "Settings", num_layers: int, visual: torch.Tensor, text: torch.Tensor, every_layer: bool = False
    ):
        self.settings, self.visual, self.text = settings, visual, text
        active = len(visual) > 0 and (settings.tau > 0 or settings.evict_layer is not None)
        self.probes = set(settings.layers_to_probe(num_layers)) if active else set()
        self.evict_at = settings.evict_layer if active else None
        self.measured = set(range(num_layers)) if every_layer and len(visual) else set(self.probes)
        self.ratios: dict[int, tuple[float, float]] = {}  # layer -> (a_tv, a_vt), eq. 7
        self.evict_layer: int | None = None  # the layer after which the visual tokens left

    def after_layer(self, i: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """Called after layer i with its queries and keys over the current sequence; returns the
        indices of that sequence to keep when the visual tokens leave now, else None."""
        if self.evict_layer is not None:
            return None  # fired already: nothing left to measure or evict
        if i in self.measured:
            self.ratios[i] = cross_modal_ratios(q, k, self.visual, self.text)
        fire = i == self.evict_at or (i in self.probes and should_evict(self.ratios[i], self.settings.tau))
        if not fire:
            return None
        self.evict_layer = i
        is_visual = torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
        is_visual[self.visual] = True
        return (~is_visual).nonzero()[:, 0]


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How to prune; the defaults are the paper's v1 (retain 10%, k-center, 4 probes, tau 0.03)."""

    retain: float = 0.1  # Stage 1 budget: a fraction of the patch tokens, in (0, 1]; 1.0 = Stage 1 off
    keep_tokens: int | None = None  # Stage 1 budget as a token count instead (peers report 64/128/192)
    select: str = "kcenter"  # Stage 1 selector, a key of SELECTORS
    pivot: str = "attention"  # Stage 1's first token: "attention" ([CLS] attention, Algorithm 1) or "random"
    pivot_seed: int = 0  # the seed of a random pivot
    newlines: str = "drop"  # what Stage 1 does with the image_newline tokens: "drop" or "keep" them all
    tau: float = 0.03  # Stage 2 threshold on both eq. 7 ratios; 0 = Stage 2 off
    probe_fractions: tuple = V1_PROBES  # Stage 2 probe layers, as fractions of the depth L
    probe_layers: tuple | None = None  # explicit probe layers (0-based), overriding probe_fractions
    evict_layer: int | None = None  # force Stage 2 after this layer whatever the ratios (benchmarks only)

    @property
    def stage1(self) -> bool:
        """Whether Stage 1 runs: retain 1.0 with no token count switches it off, newlines included."""
        return self.keep_tokens is not None or self.retain != 1.0

    def layers_to_probe(self, num_layers: int) -> list[int]:
        """The Stage 2 probe layers (0-based) of a decoder with num_layers layers; none when tau is 0."""
        if self.tau == 0:
            return []
        return sorted(self.probe_layers) if self.probe_layers else probe_layers(num_layers, self.probe_fractions)

    def __post_init__(self):
        check_budget(self.retain, self.keep_tokens)
        if self.select not in SELECTORS:
            raise ValueError(f"unknown selector {self.select!r}: use one of {', '.join(SELECTORS)}")
        if self.pivot not in ("attention", "random"):
            raise ValueError(f"pivot must be 'attention' or 'random', got {self.pivot!r}")
        if not (is_count(self.pivot_seed) and self.pivot_seed >= 0):
            raise ValueError(f"pivot_seed must be an integer >= 0, got {self.pivot_seed!r}")
        if self.newlines not in ("drop", "keep"):
            raise ValueError(f"newlines must be 'drop' or 'keep', got {self.newlines!r}")
        if not (isinstance(self.tau, (int, float)) and math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau!r}")
        if self.probe_layers is not None and not (
            isinstance(self.probe_layers, (tuple, list)) and all(is_count(x) and x >= 0 for x in self.probe_layers)
        ):
            raise ValueError(f"probe_layers must be layer numbers >= 0, got {self.probe_layers!r}")
        if self.evict_layer is not None and not (is_count(self.evict_layer) and self.evict_layer >= 0):
            raise ValueError(f"evict_layer must be a layer number >= 0, got {self.evict_layer!r}")
        if not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in self.probe_fractions):
            raise ValueError(f"probe_fractions must be fractions of the depth in (0, 1], got {self.probe_fractions!r}")


# The paper's two versions. v1 (May 2025) is the default; its authors' revision v2 (Nov 2025)
# selects by max-sum diversity and probes once, at 7L/8, with tau 0.10.
VARIANTS = {
    "v1": Settings(),
    "v2": Settings(select="maxsum", tau=0.10, probe_fractions=V2_PROBES),
}
NO_PRUNING = Settings(retain=1.0, tau=0.0)


def variant(name: str, **overrides) -> Settings:
    """The settings of paper version `name` ("v1" or "v2"), with every override that is not None applied."""
    if "probe_layers" in overrides and overrides["probe_layers"] is not None:
        overrides["probe_layers"] = tuple(overrides["probe_layers"])
    return replace(VARIANTS[name], **{key: value for key, value in overrides.items() if value is not None})
