"""Chat messages → prompt text, with the model's own chat template (jinja2), as transformers does.

Where the template comes from, most authoritative first (what transformers loads):
``chat_template.jinja`` in the model directory, then ``tokenizer_config.json``'s
``chat_template`` (a string, or a list of ``{"name", "template"}`` of which ``default`` is
used). It is rendered the way ``apply_chat_template(messages, add_generation_prompt=True,
tokenize=False)`` renders it: a sandboxed jinja2 environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block that only
renders its body, ``raise_exception``, ``strftime_now`` and a ``tojson`` filter that keeps
non-ASCII; the variables are ``messages``, ``add_generation_prompt``, ``tools`` and
``documents`` (None: the gateway takes no tools) and the special tokens (``bos_token``,
``eos_token``, …, ``mask_token``) as strings, from tokenizer_config.json with
special_tokens_map.json's values winning, as transformers loads them. Such a template writes
the special tokens itself, so its text is tokenized without adding any (``add_special_tokens``
False), as transformers' ``apply_chat_template(tokenize=True)`` does.

A model without a template (tandem-tiny) gets :data:`PLAIN_TEMPLATE`: one
``<role>: <content>`` line per message, then ``assistant:``. That text is tokenized like
any prompt (the tokenizer adds BOS where the model's post-processor does).

No torch and no transformers here: the router renders templates next to its tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.engine.errors import CheckpointError, InvalidRequestError
from services.engine.tokenizer import read_json_object

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"
)  # fmt: skip
JINJA2_MIN = (3, 1, 6)
"""Older jinja2 releases have published sandbox escapes (CVE-2024-56326, CVE-2025-27516);
a chat template comes with a model directory, so it is not trusted code. transformers
refuses to render below this version too."""

PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""For models without a chat template: ``user: Hi\\nassistant:``."""


class ChatTemplate:
    """A compiled chat template plus the values it is rendered with."""

    def __init__(
        self, source: str, special_tokens: Mapping[str, str], from_model: bool, origin: str
    ) -> None:
        """``origin`` names where the template came from (for error messages)."""
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.from_model = from_model
        self.origin = origin
        try:
            self._compiled = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(
                f"{origin}: the chat template does not compile (line {exc.lineno}: "
                f"{exc.message}); fix or remove it"
            ) from exc

    @property
    def add_special_tokens(self) -> bool:
        """Whether the rendered text is tokenized with the tokenizer's special tokens."""
        return not self.from_model

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt for ``(role, content)`` pairs, ending where the assistant's reply starts.

        InvalidRequestError when a role is empty or the template refuses the conversation.
        """
        if not messages:
            raise InvalidRequestError("messages", "is empty; send at least one message")
        for index, (role, _) in enumerate(messages):
            if not role:
                raise InvalidRequestError(f"messages[{index}].role", "is required")
        chat = [{"role": role, "content": content} for role, content in messages]
        try:
            return self._compiled.render(
                messages=chat,
                add_generation_prompt=True,
                tools=None,  # as transformers passes them: "is not none" must be false
                documents=None,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:  # raise_exception(), or a type error in the data
            raise InvalidRequestError(
                "messages", f"the model's chat template refuses this conversation: {exc}"
            ) from exc
        except Exception as exc:  # a template bug (e.g. arithmetic on None)
            raise CheckpointError(f"{self.origin}: the chat template failed: {exc!r}") from exc


def load_chat_template(directory: Path) -> ChatTemplate:
    """The template of the model in ``directory``, or the plain one when it has none."""
    directory = Path(directory)
    config = read_json_object(directory / TOKENIZER_CONFIG)
    tokens = _special_tokens(config) | _special_tokens(
        read_json_object(directory / SPECIAL_TOKENS_MAP)
    )
    jinja_file = directory / TEMPLATE_FILE
    if jinja_file.is_file():
        return ChatTemplate(jinja_file.read_text(encoding="utf-8"), tokens, True, str(jinja_file))
    source = _config_template(config.get("chat_template"), directory / TOKENIZER_CONFIG)
    if source is None:
        return ChatTemplate(PLAIN_TEMPLATE, tokens, False, "the plain chat template")
    return ChatTemplate(source, tokens, True, str(directory / TOKENIZER_CONFIG))


def _config_template(value: Any, file: Path) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: transformers uses "default" for chat
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise CheckpointError(
        f"{file}: chat_template must be a string or a list of {{name, template}} with a "
        f"'default' entry, got {type(value).__name__}"
    )


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    tokens = {}
    for name in _SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


class _GenerationBlock(Extension):
    """transformers' ``{% generation %}…{% endgeneration %}`` (marks assistant text for
    training masks); rendering only needs its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters; transformers' keeps the text as is.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    version = tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit())
    if version < JINJA2_MIN:
        raise CheckpointError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes: a model's chat template "
            f"is not rendered with it; install jinja2>={'.'.join(map(str, JINJA2_MIN))}"
        )
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
