"""Conversation templates of InternVL-Chat and the exact prompt strings ``chat()`` feeds the tokenizer.

The templates reproduce ``internvl_chat/internvl/conversation.py`` of the official repository: the MPT separator style
(InternVL 1.5 / 2 / 2.5) and the legacy ``internvl_zh`` style (InternVL-Chat-V1-1).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from internvl_fm.errors import ConfigError

__all__ = [
    "IMG_START_TOKEN",
    "IMG_END_TOKEN",
    "IMG_CONTEXT_TOKEN",
    "IMAGE_PLACEHOLDER",
    "ChatTemplate",
    "UnknownTemplateError",
    "TEMPLATES",
    "get_template",
    "render_prompt",
    "expand_image_placeholders",
    "with_image_placeholder",
    "with_image_placeholders",
    "build_chat_query",
]

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"

_INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
_INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

Turn = tuple[str, "str | None"]


class UnknownTemplateError(ConfigError, KeyError):
    """A template name that is not one of :data:`TEMPLATES`; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation template.

    ``style`` is ``"mpt"`` (``system_template.format(system) + sep``, then ``role + message + sep`` per answered
    message and a bare ``role`` for the pending one) or ``"internvl_zh"`` (``system + " "``, then
    ``role + ": " + message`` followed by ``" "`` after a user turn and ``sep`` after an assistant turn).
    """

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    style: str = "mpt"
    stop_str: str | None = None

    @property
    def stop_token(self) -> str:
        """The token whose id ends generation in ``chat()`` (``sep.strip()``)."""
        return self.sep.strip()

    def render(self, turns: Iterable[Turn], system: str | None = None) -> str:
        """Render ``(user, assistant-or-None)`` turns; ``system=None`` means the template's default message."""
        system_message = self.system_message if system is None else system
        messages: list[tuple[str, str | None]] = []
        for user, assistant in turns:
            messages.append((self.roles[0], user))
            messages.append((self.roles[1], assistant))
        if self.style == "mpt":
            out = self.system_template.format(system_message=system_message) + self.sep
            for role, message in messages:
                out += role + message + self.sep if message else role
            return out
        if self.style == "internvl_zh":
            seps = (" ", self.sep)
            out = system_message + seps[0]
            for i, (role, message) in enumerate(messages):
                out += role + ": " + message + seps[i % 2] if message else role + ":"
            return out
        raise ValueError(f"template {self.name!r} has an unknown style {self.style!r}")


_IM_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
_IM_SYSTEM = "<|im_start|>system\n{system_message}"

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate("internlm2-chat", _IM_SYSTEM, _INTERNVL2_SYSTEM, _IM_ROLES, "<|im_end|>"),
        ChatTemplate("Hermes-2", _IM_SYSTEM, _INTERNVL2_SYSTEM, _IM_ROLES, "<|im_end|>", stop_str="<|endoftext|>"),
        ChatTemplate("phi3-chat", "<|system|>\n{system_message}", _INTERNVL2_SYSTEM, ("<|user|>\n", "<|assistant|>\n"),
                     "<|end|>"),
        ChatTemplate("internvl2_5", _IM_SYSTEM, _INTERNVL2_5_SYSTEM, _IM_ROLES, "<|im_end|>\n"),
        ChatTemplate("internvl_zh", "", "", ("<human>", "<bot>"), "</s>", style="internvl_zh"),
    )
}


def get_template(name: str) -> ChatTemplate:
    """Look up a template by name; unknown names raise :class:`UnknownTemplateError` listing the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UnknownTemplateError(
            f"unknown chat template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}") from None


def render_prompt(
    template: str | ChatTemplate, turns: Iterable[Sequence[str | None]], system: str | None = None
) -> str:
    """Render a conversation with a template.

    ``turns`` are ``(user, assistant)`` pairs; the last assistant is ``None`` for a generation prompt.
    ``system=None`` uses the template's default system message.
    """
    tpl = template if isinstance(template, ChatTemplate) else get_template(template)
    return tpl.render([(t[0], t[1]) for t in turns], system=system)


def image_token_span(num_image_token: int, num_patches: int) -> str:
    """``<img>`` + ``<IMG_CONTEXT>`` * (num_image_token * num_patches) + ``</img>``."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_patches) + IMG_END_TOKEN


def expand_image_placeholders(query: str, num_patches_list: Sequence[int], num_image_token: int) -> str:
    """Replace the first remaining ``<image>`` by the image span of each entry of ``num_patches_list``, in order."""
    for num_patches in num_patches_list:
        if IMAGE_PLACEHOLDER not in query:
            raise ValueError(
                f"the prompt has fewer {IMAGE_PLACEHOLDER} placeholders than images ({len(num_patches_list)} given)")
        query = query.replace(IMAGE_PLACEHOLDER, image_token_span(num_image_token, int(num_patches)), 1)
    return query


def with_image_placeholder(question: str, has_images: bool, history: Sequence | None = None) -> str:
    """``chat()``'s rule: without history, a question with images but no ``<image>`` gets ``"<image>\\n"`` prepended."""
    if history is None and has_images and IMAGE_PLACEHOLDER not in question:
        return IMAGE_PLACEHOLDER + "\n" + question
    return question


def with_image_placeholders(text: str, num_images: int) -> str:
    """Place ``num_images`` images before ``text`` unless it already holds ``<image>``: ``"<image>\\n"`` for one,
    ``"Image-1: <image>\\nImage-2: <image>\\n..."`` for several (the model cards' multi-image prompt)."""
    if num_images == 0 or IMAGE_PLACEHOLDER in text:
        return text
    if num_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n{text}"
    return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_images)) + text


def build_chat_query(
    question: str,
    template: str | ChatTemplate,
    num_patches_list: Sequence[int] | None,
    num_image_token: int,
    history: Sequence[Sequence[str]] | None = None,
    system: str | None = None,
) -> str:
    """The exact string the official ``chat()`` tokenizes.

    Without history, a question that holds no ``<image>`` gets ``"<image>\\n"`` prepended when images are given
    (``num_patches_list`` non-empty). Each ``<image>`` (history included) is then expanded, in order, into
    ``<img><IMG_CONTEXT>*(num_image_token*num_patches)</img>``.
    """
    num_patches_list = list(num_patches_list or [])
    question = with_image_placeholder(question, has_images=bool(num_patches_list), history=history)
    turns: list[Turn] = [(q, a) for q, a in (history or [])]
    turns.append((question, None))
    query = render_prompt(template, turns, system=system)
    return expand_image_placeholders(query, num_patches_list, num_image_token)
