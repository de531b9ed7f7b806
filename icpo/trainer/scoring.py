"""Per-token log-probs and entropy of response tokens for packed micro-batches.

The decoder body runs on the micro-batch, but the LM head only on the positions that score a
response token, so no ``[T, V]`` logits are ever built for prompt tokens; the fused
``icpo.ops.token_logprobs`` kernel then reads those logits once.

With flash-attention the micro-batch runs as one packed row (varlen kernels, no padding). Other
attention implementations (SDPA, eager: CPU) would need a dense ``T x T`` block-diagonal mask for
a packed row, quadratic in the micro-batch's tokens, so there the samples run as a right-padded
``[B, L]`` batch and the hidden states are re-packed; the results are the same.
"""

from __future__ import annotations

import torch

from icpo import ops
from icpo.trainer.batching import PackedBatch


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack and LM head of a transformers causal LM (Qwen2, Llama, Mistral, ...)."""
    head = model.get_output_embeddings()
    body = getattr(model, model.base_model_prefix, None)
    if head is None or body is None or getattr(model.config, "final_logit_softcapping", None):
        raise TypeError(f"{type(model).__name__}: icpo needs a causal LM with a separate decoder "
                        "body and LM head and no logit soft-capping")
    return body, head


def response_logprobs(model: torch.nn.Module, batch: PackedBatch, temperature: float,
                      with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (and entropy) of every response token in ``batch``: fp32 ``[T_resp]`` each.

    ``temperature`` is the sampling temperature: the confidence and the ratio in the loss are
    taken under the distribution the responses were drawn from (SPEC step 3).
    """
    body, head = _body_and_head(model)
    if str(getattr(model.config, "_attn_implementation", "")).startswith("flash"):
        hidden = body(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                      use_cache=False).last_hidden_state[0]
    else:
        hidden = _padded_hidden(body, batch)
    logits = head(hidden.index_select(0, batch.score_positions))
    return ops.token_logprobs(logits, batch.labels, temperature=temperature,
                              return_entropy=with_entropy)


def _padded_hidden(body: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Hidden states ``[T, H]`` in packed order, computed on a right-padded ``[B, L]`` batch."""
    padded, mask = ops.unpack_to_padded(batch.input_ids, batch.seq_cu_seqlens)
    mask = mask.to(torch.long)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = body(input_ids=padded, attention_mask=mask, position_ids=positions,
                  use_cache=False).last_hidden_state
    return hidden[mask.bool()]


@torch.no_grad()
def score_all(model: torch.nn.Module, batches: list[PackedBatch], temperature: float,
              with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenated response log-probs (and entropies) of ``batches`` in order, no gradient."""
    logps, ents = [], []
    for batch in batches:
        logp, ent = response_logprobs(model, batch, temperature, with_entropy)
        logps.append(logp)
        ents.append(ent)
    logp = torch.cat(logps)
    return logp, (torch.cat(ents) if with_entropy else None)
