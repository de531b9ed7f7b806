"""Prompt templates: the R1 system prompt of the paper's Table 5 and how prompts become text.

A prompt is either chat messages (``[{"role": ..., "content": ...}, ...]``, verl's schema) or
plain text (treated as one user message). With ``template="r1"`` the Table 5 system prompt is
added as a system message unless the prompt already has one. The messages then go through the
tokenizer's chat template with a generation prompt; a tokenizer without a chat template gets a
plain ``System: ...\\nUser: ...\\nAssistant:`` layout instead.
"""

from __future__ import annotations

from typing import Any, Union

#: The system prompt of the paper's Table 5 (DeepSeek-R1's training prompt), verbatim; the
#: paper's line breaks are only the PDF's wrapping.
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>."
)

TEMPLATES = ("r1", "none")

Prompt = Union[str, list[dict[str, Any]]]


def to_messages(prompt: Prompt, template: str = "r1") -> list[dict[str, str]]:
    """Chat messages for ``prompt`` under ``template`` ("r1" adds Table 5's system prompt
    unless a system message is present; "none" leaves the prompt as it is)."""
    if template not in TEMPLATES:
        raise ValueError(f"template: got {template!r}; expected one of {TEMPLATES}")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise TypeError("prompt: expected a string or a non-empty list of "
                        f"{{'role': str, 'content': str}} messages, got {prompt!r:.200}")
    if template == "r1" and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": R1_SYSTEM_PROMPT})
    return messages


def has_chat_template(tokenizer: Any) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer: Any, prompt: Prompt, template: str = "r1") -> str:
    """The text the policy is conditioned on, ending where the assistant's reply starts.

    Tokenize the result with ``add_special_tokens=False``: chat templates already write BOS
    where the model needs one, and the plain layout prepends it here.
    """
    messages = to_messages(prompt, template)
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"tokenizer.apply_chat_template returned {type(text).__name__}, "
                            "expected str")
        return text
    if template == "none" and isinstance(prompt, str):
        # No template and no chat template: the text is a ready-made completion prompt.
        return _bos_prefix(tokenizer) + prompt
    body = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return f"{_bos_prefix(tokenizer)}{body}\nAssistant:"


def _is_message(m: Any) -> bool:
    return (isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str))


def _bos_prefix(tokenizer: Any) -> str:
    """BOS text when the tokenizer would add one by itself (Llama-style), else ''."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 (a tokenizer that cannot do this adds no BOS)
        return ""
    return bos if ids and ids[0] == bos_id else ""
