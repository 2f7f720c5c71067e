"""Tokenizer loading, chat-formatted encoding, and the student/teacher tokenizer identity check.

TOPD compares the two models' distributions token by token, so both must use one tokenizer: the same vocabulary
(token -> id), the same special tokens and EOS, the same chat template. `check_same_tokenizer` verifies it
instead of assuming it, and names the first difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
    """A Hugging Face tokenizer from a local directory (never the hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def token_ids(encoded: Any) -> list[int]:
    """The ids of what `apply_chat_template` / a tokenizer call returned (a list, or a BatchEncoding)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The chat-formatted user turn, ending where the assistant's answer starts."""
    return token_ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))


def encode_example(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], int]:
    """(token ids of the chat-formatted conversation through the response's end-of-turn token, number of prompt
    tokens). Raises ValueError when the template does not render the prompt as a prefix of the conversation."""
    prefix = encode_prompt(tokenizer, prompt)
    full = token_ids(
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    )
    if full[: len(prefix)] != prefix:
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    eos = tokenizer.eos_token_id
    end = full.index(eos, len(prefix)) + 1 if eos in full[len(prefix) :] else len(full)
    return full[:end], len(prefix)


def tokenizer_differences(a: Any, b: Any) -> list[str]:
    """Human-readable differences between two tokenizers (empty when they are identical for TOPD's purposes)."""
    diffs: list[str] = []
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:5]
        only_b = sorted(set(vb) - set(va))[:5]
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:5]
        diffs.append(
            f"vocabularies differ (sizes {len(va)} vs {len(vb)}; only in first: {only_a}; only in second: {only_b};"
            f" different ids: {moved})"
        )
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            diffs.append(f"{attr} differs: {getattr(a, attr, None)} vs {getattr(b, attr, None)}")
    if sorted(a.all_special_tokens) != sorted(b.all_special_tokens):
        diffs.append(f"special tokens differ: {sorted(a.all_special_tokens)} vs {sorted(b.all_special_tokens)}")
    if (a.chat_template or None) != (b.chat_template or None):
        diffs.append("chat templates differ")
    return diffs


def check_same_tokenizer(student_dir: str | Path, teacher_dir: str | Path) -> None:
    """Raise ValueError naming the differences when the teacher's tokenizer is not the student's."""
    diffs = tokenizer_differences(load_tokenizer(student_dir), load_tokenizer(teacher_dir))
    if diffs:
        raise ValueError(
            f"the teacher's tokenizer ({teacher_dir}) differs from the student's ({student_dir}): "
            + "; ".join(diffs)
            + ". TOPD compares per-token distributions, so both models must share one tokenizer: pick a teacher"
            " from the student's family, or convert one of them to the other's tokenizer first."
        )
