"""Chat messages -> prompt token ids: the checkpoint's chat template, else a plain one.

A checkpoint may have a Jinja chat template, as HF tokenizers ship them: `chat_template` in its
`tokenizer_config.json`, or the file `chat_template.jinja` (which `moejax convert` copies too). It is
rendered in Jinja's sandbox with `messages`, `add_generation_prompt=True`, `bos_token` and `eos_token`, and
its text is tokenized without adding special tokens (the template writes them). Without one, the plain
template writes a line "<role>: <content>" per message and then "assistant:", and the text is tokenized as
a completion's prompt is (with the tokenizer's special tokens, e.g. BOS).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moejax.errors import MoejaxError
from moejax.serving.http.api import bad_field

ROLES = ("system", "developer", "user", "assistant")


def checked_messages(messages) -> list[dict]:
    """The messages as [{"role", "content": str}]; raises ApiError naming the message at fault."""
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", "messages is required: a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_field(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise bad_field(f"messages[{i}].role", f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _text(message.get("content"), i)})
    return out


def _text(content, i: int) -> str:
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...}) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise bad_field(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")


class ChatTemplate:
    """Renders chat messages into prompt token ids with `tokenizer` (a moejax Tokenizer, or None)."""

    def __init__(self, tokenizer, template: str | None = None, special_tokens: dict | None = None, source: str = ""):
        self.tokenizer, self.special_tokens = tokenizer, special_tokens or {}
        self.template = None
        if template is not None:
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            environment.globals.update(raise_exception=_raise, strftime_now=lambda f: datetime.datetime.now().strftime(f))
            environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
            try:
                self.template = environment.from_string(template)
            except jinja2.TemplateSyntaxError as err:
                raise MoejaxError(f"{source}: its chat_template does not parse: {err}") from None

    @classmethod
    def from_checkpoint(cls, path: Path, tokenizer) -> ChatTemplate:
        """The chat template of the checkpoint at `path`, else the plain one."""
        config_path, template_path = Path(path) / "tokenizer_config.json", Path(path) / "chat_template.jinja"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            template = config.get("chat_template")
            if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
                template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
            source = config_path
            if not isinstance(template, str) and template_path.is_file():
                template, source = template_path.read_text(), template_path
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MoejaxError(f"{path}: cannot read its chat template ({err})") from None
        special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
        return cls(tokenizer, template if isinstance(template, str) else None, special, str(source))

    @property
    def kind(self) -> str:
        return "the checkpoint's" if self.template is not None else "plain"

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of checked messages followed by the assistant's turn; raises ApiError."""
        if self.tokenizer is None:
            raise bad_field("messages", "this model has no tokenizer, which chat needs: use /v1/completions with "
                            "token ids")
        if self.template is None:
            return self.tokenizer.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")
        try:
            text = self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except jinja2.TemplateError as err:
            raise bad_field("messages", f"the model's chat template refuses these messages: {err}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _token_text(token) -> str:
    """A special token of tokenizer_config.json: a string or {"content": string, ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""
