"""Prompting: a benchmark problem as the model's own chat-formatted prompt.

The user turn is the problem, a blank line, and the instruction; it is rendered by the chat template in the model's
tokenizer config (`tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`), so the
prompt is exactly what the model saw in its own post-training, special tokens and default system prompt included.

`enable_thinking` is Qwen3's switch between thinking and non-thinking answers in its hybrid chat template. It is
passed to the template only when the template reads it; setting it for a template that does not (Qwen2, or Qwen3's
2507 Thinking/Instruct releases, whose templates always or never think) is an error rather than a silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(kw_only=True, slots=True)
class PromptConfig:
    """How a problem is asked."""

    instruction: str = DEFAULT_INSTRUCTION
    """Appended to the problem after a blank line; "" sends the bare problem."""
    system: str | None = None
    """A system message; None leaves the template's default (some templates add one of their own)."""
    enable_thinking: bool | None = None
    """Qwen3 hybrid templates: True thinks, False answers directly; None leaves the template's default."""


def user_message(cfg: PromptConfig, problem: str) -> str:
    """The user turn: the problem, then the instruction."""
    return f"{problem}\n\n{cfg.instruction}" if cfg.instruction else problem


def _template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one renders chat
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: evaluation prompts are"
            " rendered with the model's own template (tokenizer_config.json `chat_template`)"
        )
    return template


def render_prompt(cfg: PromptConfig, tokenizer: Any, problem: str) -> str:
    """The prompt text for one problem, ending where the assistant's answer begins."""
    template = _template(tokenizer)
    messages = [{"role": "user", "content": user_message(cfg, problem)}]
    if cfg.system is not None:
        messages.insert(0, {"role": "system", "content": cfg.system})
    extra: dict[str, bool] = {}
    if cfg.enable_thinking is not None:
        if "enable_thinking" not in template:
            raise ValueError(
                f"enable_thinking={cfg.enable_thinking} is set, but the chat template of"
                f" {getattr(tokenizer, 'name_or_path', '')!r} does not read it; leave it unset (None) for this model"
            )
        extra["enable_thinking"] = cfg.enable_thinking
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
