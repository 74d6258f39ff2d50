"""Chat templates as segments: each piece of the prompt text, and whether the loss supervises it.

Labels are built from the same segments that build the input ids (see processor.py), so masks can never
drift from the tokens: no length arithmetic per template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "... <image> ..."}
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool = False


class Template:
    name: str
    end_of_turn: str  # text that ends an assistant turn; generation stops on it
    # Our templates leave BOS to the tokenizer (LLaVA's tokenizer_image_token adds it); a tokenizer's own chat
    # template writes whatever BOS it wants into its text, and apply_chat_template adds none on top
    bos_from_tokenizer: bool = True

    def render(self, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        raise NotImplementedError

    def jinja(self) -> str | None:
        """This template as a transformers chat template (written on export), or None when it has none."""
        return None


class PlainTemplate(Template):
    """Stage-1 alignment (LLaVA `plain`): the image, then the caption. User text is not used."""

    name = "plain"

    def __init__(self, eos: str) -> None:
        self.end_of_turn = eos

    def render(self, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        segments = []
        for m in messages:
            if m["role"] == "user":
                segments.append(Segment("<image>" * m["content"].count("<image>")))
            elif m["role"] == "assistant":
                segments.append(Segment(m["content"] + self.end_of_turn, supervised=True))
        return segments


class VicunaTemplate(Template):
    """LLaVA-1.5 `vicuna_v1`: `SYSTEM USER: q ASSISTANT: a</s>USER: ...`."""

    name = "vicuna_v1"

    def __init__(self, eos: str) -> None:
        self.end_of_turn = eos

    def render(self, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        system = VICUNA_SYSTEM
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        segments = [Segment(system + " ")]
        for i, m in enumerate(messages):
            if m["role"] == "user":
                segments.append(Segment(f"USER: {m['content']} ASSISTANT:"))
            elif m["role"] == "assistant":
                segments.append(Segment(" " + m["content"] + self.end_of_turn, supervised=True))
            else:  # a system message after the first turn has no place in vicuna_v1; never supervise it
                raise ValueError(
                    f"vicuna_v1: message {i} has role {m['role']!r}; only a leading 'system', then 'user' and "
                    "'assistant' turns, are supported"
                )
        return segments

    def jinja(self) -> str:
        """The same prompt as a transformers chat template (for export), BOS left to the tokenizer's caller."""
        return (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}{%- set system = " + _jinja_str(VICUNA_SYSTEM) + " -%}{%- set turns = messages -%}"
            "{%- endif -%}"
            "{{ system + ' ' }}"
            "{%- for m in turns -%}"
            "{%- if m['role'] == 'user' -%}{{ 'USER: ' + m['content'] + ' ASSISTANT:' }}"
            "{%- elif m['role'] == 'assistant' -%}{{ ' ' + m['content'] + " + _jinja_str(self.end_of_turn) + " }}"
            "{%- else -%}{{ raise_exception('vicuna_v1: only a leading system message, then user and assistant') }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )


class ChatMLTemplate(Template):
    """`<|im_start|>role\\ncontent<|im_end|>\\n` (Qwen, SmolLM2)."""

    name = "chatml"
    end_of_turn = "<|im_end|>"

    def render(self, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        segments = []
        for m in messages:
            if m["role"] == "assistant":
                segments.append(Segment("<|im_start|>assistant\n"))
                segments.append(Segment(m["content"] + self.end_of_turn, supervised=True))
                segments.append(Segment("\n"))
            else:
                segments.append(Segment(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"))
        if add_generation_prompt:
            segments.append(Segment("<|im_start|>assistant\n"))
        return segments

    def jinja(self) -> str:
        return (
            "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
        )


class TokenizerTemplate(Template):
    """The tokenizer's own Jinja chat template, cut into segments by rendering growing prefixes.

    The text an assistant turn adds is the difference between the render that ends with it and the
    render that ends with the generation prompt before it; its end-of-turn token closes the supervised
    part, and whatever the template adds after that (a newline) is not supervised.
    """

    name = "auto"
    bos_from_tokenizer = False

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.end_of_turn = self._detect_end_of_turn()

    def _apply(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _detect_end_of_turn(self) -> str:
        probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "XYZ"}]
        tail = self._apply(probe, False).split("XYZ")[-1]
        for token in self.tokenizer.all_special_tokens:
            if token and tail.startswith(token):
                return token
        return tail.strip() or (self.tokenizer.eos_token or "")

    def render(self, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        segments: list[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = self._apply(messages[:i], add_generation_prompt=True)
                full = self._apply(messages[: i + 1], add_generation_prompt=False)
                if not (prompt.startswith(done) and full.startswith(prompt)):
                    raise ValueError("the tokenizer's chat template does not render turns as a growing prefix")
                answer = full[len(prompt) :]
                cut = (
                    answer.find(self.end_of_turn) + len(self.end_of_turn) if self.end_of_turn in answer else len(answer)
                )
                segments += [Segment(prompt[len(done) :]), Segment(answer[:cut], True), Segment(answer[cut:])]
                done = full
        final = self._apply(messages, add_generation_prompt=add_generation_prompt)
        if not final.startswith(done):
            raise ValueError("the tokenizer's chat template does not render turns as a growing prefix")
        segments.append(Segment(final[len(done) :]))
        return [s for s in segments if s.text]


def _jinja_str(text: str) -> str:
    """A Python string as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


TEMPLATE_NAMES = ("auto", "plain", "vicuna_v1", "chatml")


def get_template(name: str, tokenizer: Any) -> Template:
    """`auto`: the tokenizer's own chat template when it has one, else vicuna_v1."""
    eos = tokenizer.eos_token or ""
    if name == "auto":
        return TokenizerTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else VicunaTemplate(eos)
    if name == "plain":
        return PlainTemplate(eos)
    if name == "vicuna_v1":
        return VicunaTemplate(eos)
    if name == "chatml":
        return ChatMLTemplate()
    raise ValueError(f"unknown template {name!r}; available: {', '.join(TEMPLATE_NAMES)}")
