"""Prompt data: verl-schema files, the Table 5 template, tokenized datasets, a resumable sampler."""

from icpo.data.dataset import (
    DataError,
    PromptDataset,
    PromptItem,
    PromptRecord,
    PromptSampler,
    load_files,
    load_records,
)
from icpo.data.templates import R1_SYSTEM_PROMPT, build_prompt, has_chat_template, to_messages

__all__ = [
    "DataError",
    "PromptDataset",
    "PromptItem",
    "PromptRecord",
    "PromptSampler",
    "R1_SYSTEM_PROMPT",
    "build_prompt",
    "has_chat_template",
    "load_files",
    "load_records",
    "to_messages",
]
