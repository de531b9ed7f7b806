"""Per-token log-probs and entropy of response tokens for packed micro-batches.

The decoder body runs on the micro-batch, but the LM head only on the positions that score a
response token. When the head is a plain linear layer (:func:`use_fused_linear`,
``actor.fused_linear``), ``icpo.ops.linear_token_logprobs`` computes log-probs and entropy from
those hidden states and the head's weight chunk by chunk: no ``[T, V]`` logits exist in the
forward, in the backward, or in a graph kept from scoring until the update (it holds hidden
states). Otherwise the head's logits are built and ``icpo.ops.token_logprobs`` reads them once.

With flash-attention the micro-batch runs as one packed row (varlen kernels, no padding). Other
attention implementations (SDPA, eager: CPU) would need a dense ``T x T`` block-diagonal mask for
a packed row, quadratic in the micro-batch's tokens, so there the samples run as right-padded
``[b, L]`` batches of similar lengths (:func:`length_buckets`, so little compute goes to padding)
and the hidden states are re-packed in the micro-batch's order; the results are the same.

On that padded path, samples that share a prompt (the G responses of a GRPO group) share its
forward: each distinct prompt runs once, and its keys and values are handed to the responses as
a KV cache (:func:`_shared_prefix_hidden`), gradients included. With the G = 8 short prompts of
the tiny preset this removes about a third of the scoring compute; with long prompts, more.
"""

from __future__ import annotations

import math
import sys

import torch

from icpo import ops
from icpo.config.schema import FusedLinear
from icpo.errors import UserError
from icpo.models.loading import kv_cache_shareable
from icpo.ops.token_logprobs import MIN_TEMPERATURE
from icpo.trainer import distributed as dist
from icpo.trainer.batching import PackedBatch, pack_samples, segment_positions


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack and LM head of a transformers causal LM (Qwen2, Llama, Mistral, ...)."""
    base = getattr(model, "get_base_model", None)
    if callable(base):  # PEFT: the transformers model, its LoRA layers inside (adapters on/off)
        model = base()
    head = model.get_output_embeddings()
    body = getattr(model, model.base_model_prefix, None)
    if head is None or body is None:
        raise TypeError(f"{type(model).__name__}: icpo needs a causal LM with a separate decoder "
                        "body and LM head")
    return body, head


def _logit_transform(model: torch.nn.Module) -> tuple[float, float | None]:
    """``(scale, softcap)``: what the model's own forward does to ``head(hidden)`` before the
    softmax: ``x * scale``, then ``softcap * tanh(x / softcap)`` when softcap is not None.

    Read from the config attributes the transformers families use (the same list TRL's fused
    head reads): Gemma 2/3's ``final_logit_softcapping``, Cohere's ``logit_scale``, Falcon-H1's
    ``lm_head_multiplier``, Granite's ``logits_scaling`` (a divisor)."""
    cfg = model.config.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None) or None
    scale = getattr(cfg, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(cfg, name, None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        div = cfg.logits_scaling
        scale = div if cfg.model_type == "hyperclovax" else 1.0 / div
    return (1.0 if scale is None else float(scale)), softcap


def _fused_blocker(model: torch.nn.Module, head: torch.nn.Module, temperature: float) -> str | None:
    """Why ``linear_token_logprobs`` cannot give this model's log-probs; None when it can."""
    if type(head).forward is not torch.nn.Linear.forward or "forward" in vars(head):
        return f"an output head of type {type(head).__name__}, not a plain linear layer"
    scale, softcap = _logit_transform(model)
    if softcap is not None:
        return f"logit soft-capping (final_logit_softcapping={softcap})"
    if not (math.isfinite(scale) and scale > 0 and temperature / scale >= MIN_TEMPERATURE):
        return f"a logit scale of {scale}"
    return None


_NOTED: set[str] = set()


def use_fused_linear(model: torch.nn.Module, mode: FusedLinear = "auto",
                     temperature: float = 1.0) -> bool:
    """Whether scoring ``model`` goes through ``icpo.ops.linear_token_logprobs`` under
    ``actor.fused_linear = mode``: "off" never; "auto" when the output head is a plain
    ``nn.Linear`` (tied or not, bias or not) and the logits are that layer's output up to a
    positive scale, else the full logits with a one-line note (once per reason, rank 0);
    "on" as auto, but a head it cannot fuse is a UserError."""
    if mode == "off":
        return False
    if mode not in ("auto", "on"):
        raise ValueError(f"fused_linear must be 'auto', 'on' or 'off', got {mode!r}")
    why = _fused_blocker(model, _body_and_head(model)[1], temperature)
    if why is None:
        return True
    name = type(model).__name__
    if mode == "on":
        raise UserError(f"actor.fused_linear=on: {name} has {why}, which the fused linear "
                        "log-prob op cannot compute; set actor.fused_linear to auto or off")
    if why not in _NOTED and dist.rank() == 0:
        print(f"icpo: note: {name} has {why}: its log-probs are taken from the full [T, V] "
              "logits (actor.fused_linear=auto)", file=sys.stderr, flush=True)
    _NOTED.add(why)
    return False


def _head_logprobs(model: torch.nn.Module, head: torch.nn.Module, scored: torch.Tensor,
                   labels: torch.Tensor, temperature: float, with_entropy: bool,
                   fused: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) of ``labels`` under the head's distribution at ``scored``."""
    scale, softcap = _logit_transform(model)
    if not fused:
        logits = head(scored)
        if scale != 1.0:
            logits = logits * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return ops.token_logprobs(logits, labels, temperature=temperature,
                                 return_entropy=with_entropy)

    # The op runs as the head module's forward, not beside it: whatever hooks the head carries
    # then fire as for head(scored). Under ZeRO-3 those are DeepSpeed's: its pre-forward hook
    # gathers the partitioned weight (every rank calls the head once per forward, so the
    # all-gathers stay in step), the hook it puts on the outputs gathers it again before the
    # op's backward, which reads the weight to recompute the logits, and the weight's gradient
    # lands in autograd's accumulation as a linear layer's would, so its reduce-scatter hook
    # takes it. Gathering the weight by hand (GatheredParameters) would hand the backward a
    # released weight and skip that hand-off.
    def forward(hidden: torch.Tensor, target: torch.Tensor):
        return ops.linear_token_logprobs(hidden, head.weight, target, bias=head.bias,
                                         temperature=temperature / scale,
                                         return_entropy=with_entropy)

    head.forward = forward
    try:
        return head(scored, labels)
    finally:
        del head.forward


def decoder_body(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a transformers causal LM: what gives :func:`lm_head_logprobs` its
    hidden states."""
    return _body_and_head(model)[0]


def lm_head_logprobs(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                     temperature: float, with_entropy: bool = True,
                     fused_linear: FusedLinear = "auto",
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) of ``labels`` (-100: ignored) from ``model``'s last hidden states
    ``hidden`` (``[T, H]`` or ``[B, L, H]``) through its LM head, as its own forward applies
    it: the fused op when :func:`use_fused_linear` says so. For code that runs
    :func:`decoder_body` itself (icpo.integrations.trl)."""
    fused = use_fused_linear(model, fused_linear, temperature)
    return _head_logprobs(model, _body_and_head(model)[1], hidden, labels, temperature,
                          with_entropy, fused)


def response_logprobs(model: torch.nn.Module, batch: PackedBatch, temperature: float,
                      with_entropy: bool = True, share_prefix: bool = True,
                      lockstep: bool = False, fused_linear: FusedLinear = "auto",
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (and entropy) of every response token in ``batch``: fp32 ``[T_resp]`` each.

    ``temperature`` is the sampling temperature: the confidence and the ratio in the loss are
    taken under the distribution the responses were drawn from (docs/algorithm.md step 3).
    ``share_prefix``: run each distinct prompt once when that saves compute (padded path only).
    ``lockstep``: exactly one forward of the decoder body, whatever the batch holds (no length
    buckets, no shared prefix): under ZeRO-3 every forward gathers parameters collectively, so
    all ranks must run as many. ``fused_linear``: ``actor.fused_linear``
    (:func:`use_fused_linear`); either way the head module runs once per call.
    """
    body, head = _body_and_head(model)
    fused = use_fused_linear(model, fused_linear, temperature)
    scored = None
    if str(getattr(model.config, "_attn_implementation", "")).startswith("flash"):
        hidden = body(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                      use_cache=False).last_hidden_state[0]
    else:
        if share_prefix and not lockstep and _can_share_prefix(body):
            scored = _shared_prefix_hidden(body, batch)
        if scored is None:
            call_tokens = math.inf if lockstep else BUCKET_CALL_TOKENS
            hidden = _padded_hidden(body, batch, call_tokens=call_tokens)
    if scored is None:
        scored = hidden.index_select(0, batch.score_positions)
    return _head_logprobs(model, head, scored, batch.labels, temperature, with_entropy, fused)


#: What one more forward call costs, in padded tokens' worth of compute (CPU, small models):
#: the bucketing below only splits a batch when that saves more padding than this.
BUCKET_CALL_TOKENS = 128


def length_buckets(lengths: list[int], call_tokens: int = BUCKET_CALL_TOKENS) -> list[list[int]]:
    """Group sample indices into buckets of similar length, minimizing the padded compute
    ``sum(rows * longest) + call_tokens * buckets`` (exact DP over the distinct lengths).

    Returns the buckets, each a list of indices into ``lengths``, longest first; every index
    appears once. Small O(distinct lengths ** 2), independent of the number of samples.
    """
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    values = sorted(by_len, reverse=True)
    counts = [len(by_len[v]) for v in values]
    # best[j]: cheapest split of the j longest distinct lengths; cut[j]: where its last bucket
    # starts.
    best, cut = [0.0] + [math.inf] * len(values), [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        rows = 0
        for i in range(j - 1, -1, -1):  # last bucket = distinct lengths i..j-1, padded to values[i]
            rows += counts[i]
            cost = best[i] + rows * values[i] + call_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], len(values)
    while j > 0:
        buckets.append([k for v in values[cut[j]:j] for k in by_len[v]])
        j = cut[j]
    return buckets[::-1]


def _padded_hidden(body: torch.nn.Module, batch: PackedBatch,
                   call_tokens: float = BUCKET_CALL_TOKENS) -> torch.Tensor:
    """Hidden states ``[T, H]`` in packed order, computed on right-padded ``[b, L]`` batches of
    samples of similar length (one per :func:`length_buckets` bucket; one bucket when
    ``call_tokens`` is infinite)."""
    cu = batch.seq_cu_seqlens
    lengths = cu.diff()
    parts, token_idx = [], []
    for rows in length_buckets(lengths.tolist(), call_tokens):
        lens = lengths[torch.tensor(rows, dtype=torch.int64, device=cu.device)]
        sub_cu = torch.zeros(len(rows) + 1, dtype=torch.int64, device=cu.device)
        sub_cu[1:] = lens.cumsum(0)
        idx = segment_positions(cu, rows)  # this bucket's tokens in the packed row
        padded, mask = ops.unpack_to_padded(batch.input_ids.index_select(0, idx), sub_cu)
        mask = mask.to(torch.long)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = body(input_ids=padded, attention_mask=mask, position_ids=positions,
                      use_cache=False).last_hidden_state
        parts.append(hidden[mask.bool()])
        token_idx.append(idx)
    return _in_order(parts, token_idx)


def _in_order(parts: list[torch.Tensor], places: list[torch.Tensor]) -> torch.Tensor:
    """Rows of ``parts`` (concatenated) put at the positions ``places`` gives each of them:
    ``places`` together must be a permutation of ``0 .. rows - 1``."""
    order = torch.cat(places)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(parts).index_select(0, inverse)


#: Prompt tokens that sharing must save before a micro-batch takes the shared-prefix path.
SHARE_MIN_SAVED_TOKENS = 2 * BUCKET_CALL_TOKENS


def _can_share_prefix(body: torch.nn.Module) -> bool:
    """Whether a KV cache carries a prompt's states to its responses exactly: full attention in
    every layer (no sliding window, no hybrid layers), and no gradient checkpointing while training
    (transformers drops the cache under it)."""
    if not kv_cache_shareable(body.config):
        return False
    if body.training and any(getattr(m, "gradient_checkpointing", False) for m in body.modules()):
        return False
    return True


def _shared_prefix_hidden(body: torch.nn.Module, batch: PackedBatch) -> torch.Tensor | None:
    """Hidden states at ``batch.score_positions`` (``[T_resp, H]``, packed response order), each
    distinct prompt run once; ``None`` when too few prompt tokens repeat to be worth it.

    1. The distinct prompts run right-padded as ``[P, Wp]`` with a KV cache. The state of a
       prompt's last token scores its responses' first tokens.
    2. Responses, without their last token (whose state scores nothing), run right-padded in
       buckets of similar length, attending to their prompt's cached keys and values (rows of
       the cache gathered per bucket; the prompt's padding masked; positions continue from the
       prompt's length). Gradients reach the prompt pass through the gathered cache.
    """
    from transformers import DynamicCache

    seq_lens = batch.seq_cu_seqlens.diff().tolist()
    resp_lens = batch.resp_cu_seqlens.diff().tolist()
    starts = batch.seq_cu_seqlens[:-1].tolist()
    ids = batch.input_ids.tolist()
    distinct: dict[tuple[int, ...], int] = {}
    owner = []
    for start, n, r in zip(starts, seq_lens, resp_lens):
        owner.append(distinct.setdefault(tuple(ids[start:start + n - r]), len(distinct)))
    prompts = list(distinct)
    saved = sum(n - r for n, r in zip(seq_lens, resp_lens)) - sum(map(len, prompts))
    if saved < SHARE_MIN_SAVED_TOKENS:
        return None
    device = batch.input_ids.device
    as_long = lambda x: torch.tensor(  # noqa: E731  (a one-line helper)
        x, dtype=torch.int64, device=device)
    p_lens = as_long([len(p) for p in prompts])
    p_ids, p_mask = ops.unpack_to_padded(as_long([t for p in prompts for t in p]),
                                         torch.cat([p_lens.new_zeros(1), p_lens.cumsum(0)]))
    p_mask = p_mask.to(torch.long)
    p_pos = torch.arange(p_ids.shape[1], device=device).expand_as(p_ids)
    out = body(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos,
               past_key_values=DynamicCache(config=body.config), use_cache=True)
    cache = out.past_key_values
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    owner_t = as_long(owner)
    parts = [out.last_hidden_state[owner_t, p_lens[owner_t] - 1]]  # scores response token 0
    targets = [batch.resp_cu_seqlens[:-1]]
    in_lens = [r - 1 for r in resp_lens]  # response tokens fed in: all but the last
    for rows in length_buckets(in_lens):
        width = max(in_lens[i] for i in rows)
        if width == 0:
            continue
        rows_t = as_long(rows)
        own = owner_t[rows_t]
        lens = as_long([in_lens[i] for i in rows])
        col = torch.arange(width, device=device)
        valid = col[None] < lens[:, None]
        resp_start = batch.seq_cu_seqlens[rows_t + 1] - batch.resp_cu_seqlens.diff()[rows_t]
        r_ids = torch.where(valid, batch.input_ids[(resp_start[:, None] + col).clamp(
            max=batch.input_ids.numel() - 1)], 0)
        mask = torch.cat([p_mask[own], valid.to(torch.long)], dim=1)
        pos = p_lens[own][:, None] + col
        sub = DynamicCache(config=body.config)
        for i, (k, v) in enumerate(layers):
            sub.update(k.index_select(0, own), v.index_select(0, own), i)
        hidden = body(input_ids=r_ids, attention_mask=mask, position_ids=pos,
                      past_key_values=sub, use_cache=True).last_hidden_state
        parts.append(hidden[valid])
        # input token j of a response (its token j) scores response token j + 1
        targets.append((batch.resp_cu_seqlens[rows_t][:, None] + 1 + col)[valid])
    return _in_order(parts, targets)


@torch.no_grad()
def score_all(model: torch.nn.Module, batches: list[PackedBatch], temperature: float,
              with_entropy: bool = True, lockstep_batches: int | None = None,
              fused_linear: FusedLinear = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenated response log-probs (and entropies) of ``batches`` in order, no gradient
    (empty tensors for no batches: a rank whose groups drop_mixed_groups dropped).

    ``lockstep_batches``: run one forward per batch and pad with forwards on ``filler`` batches
    to this many (the most any rank has), so every rank runs as many (ZeRO-3). ``fused_linear``:
    as :func:`response_logprobs`."""
    lockstep = lockstep_batches is not None
    logps, ents = [], []
    for batch in batches:
        logp, ent = response_logprobs(model, batch, temperature, with_entropy, lockstep=lockstep,
                                      fused_linear=fused_linear)
        logps.append(logp)
        ents.append(ent)
    if len(batches) < (lockstep_batches or 0):
        filler = filler_batch(next(model.parameters()).device)
        for _ in range(len(batches), lockstep_batches):
            response_logprobs(model, filler, temperature, False, lockstep=True,
                              fused_linear=fused_linear)
    if not batches:
        return torch.zeros(0), (torch.zeros(0) if with_entropy else None)
    logp = torch.cat(logps)
    return logp, (torch.cat(ents) if with_entropy else None)


def filler_batch(device: torch.device, token: int = 0) -> PackedBatch:
    """A one-token-prompt, one-token-response batch whose results are thrown away: the extra
    forwards (and backwards) a rank runs to keep its collectives in step with the others."""
    return pack_samples([[token]], [[token]], [0]).to(device)
