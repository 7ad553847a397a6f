"""Chat with a decoder-only model: its chat template rendered as `transformers` renders it, and a session that
keeps the conversation and the KV cache across turns.

A chat model was trained on conversations laid out in one exact text format (role headers, end-of-turn
tokens), which its authors ship as a Jinja template in tokenizer_config.json. `render_chat` renders it in the
environment `transformers`' `apply_chat_template` uses (a sandbox, trim_blocks and lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that leaves non-ASCII text alone), so the same messages give the
same text and the same ids. `ChatSession` sends each turn's new tokens only: the cache of the turns before
is kept while the rendered conversation still starts with what it holds.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from .cpu.linear import packed_weights
from .cpu.lm_step import lm_step_decoder
from .errors import TransformerError
from .generate import SamplingSettings, TextStream, pick_next


def _environment():
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 is a dependency
        raise TransformerError("chat templates need jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the text the model was trained on
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env, jinja2.exceptions.TemplateError


def render_chat(
    template: str,
    messages: Sequence[dict],
    add_generation_prompt: bool = True,
    special_tokens: Optional[dict[str, str]] = None,
    **variables: Any,
) -> str:
    """The text of `messages` ([{"role": "user", "content": "..."}, ...]) in the model's chat template;
    `add_generation_prompt` ends it with the header of the assistant's turn. `special_tokens` (bos_token,
    eos_token, ...) and `variables` are visible to the template. Raises TransformerError for a template that
    fails (its own raise_exception included), with the template's message."""
    if not messages:
        raise TransformerError("a chat needs at least one message")
    env, template_error = _environment()
    # messages as transformers passes them: keys whose value is None dropped
    messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    try:
        return env.from_string(template).render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**(special_tokens or {}), **variables},
        )
    except template_error as e:
        raise TransformerError(f"the chat template refused these messages: {e}") from None


class ChatSession:
    """A conversation with a decoder-only checkpoint's model, turn by turn.

    `reply(text)` adds the user's message, renders the conversation, feeds the model the tokens its cache does
    not hold yet, and yields the reply's text piece by piece as tokens come, stopping at any of the model's end
    ids (`ModelConfig.eos_ids`: the end-of-turn tokens) or after `settings.max_new_tokens`. `reset()` starts
    over (the system message, if any, kept). The model's weights are prepared for decoding once, for the whole
    session: `close()` (or leaving a `with` block) releases them, and the weights must not change before."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        chat: dict,
        system: Optional[str] = None,
        settings: SamplingSettings = SamplingSettings(),
    ) -> None:
        if not chat.get("template"):
            raise TransformerError(
                "this checkpoint has no chat template (tokenizer_config.json's chat_template when it was imported): "
                "use `transformer generate` to continue plain text"
            )
        self.model, self.tokenizer, self.chat, self.settings = model.eval(), tokenizer, chat, settings
        self.system = system
        self.stop = set(model.config.eos_ids)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self._prepared = contextlib.ExitStack()
        self._prepared.enter_context(packed_weights(model.decoder, model.output))
        self.reset()

    def close(self) -> None:
        self._prepared.close()

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = None
        self.cached: list[int] = []  # the ids whose keys and values the cache holds
        self.reused = 0  # of the last prompt's ids, how many the cache already held
        self.last_prompt: list[int] = []
        self.last_reply: list[int] = []

    def prompt_ids(self) -> list[int]:
        """The ids of the conversation so far, with the assistant's header after it."""
        text = render_chat(self.chat["template"], self.messages, True, self.chat.get("special_tokens"))
        return self.tokenizer.encode_plain(text)

    @torch.no_grad()
    def reply(self, text: str) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        device = next(self.model.parameters()).device
        # what the cache holds and the new rendering share (the whole earlier conversation, unless re-tokenising
        # a reply's text gave other ids than the model wrote): kept; the rest is read now
        n = 0
        limit = min(len(self.cached), len(ids) - 1)  # at least one token is read, for the next logits
        while n < limit and self.cached[n] == ids[n]:
            n += 1
        if self.cache is None:
            self.cache = self.model.decoder.new_cache(len(ids) + self.settings.max_new_tokens)
        self.cache.truncate(n)
        self.reused, self.last_prompt, self.last_reply = n, list(ids), []
        logits = self.model(torch.tensor([ids[n:]], device=device), self.cache, last_only=True)[:, -1]
        self.cached = list(ids)
        stream, s = TextStream(self.tokenizer, ids), self.settings
        fast = lm_step_decoder(self.model)  # the lean step where it applies, else the modules
        for _ in range(s.max_new_tokens):
            token = int(pick_next(logits, s.temperature, s.top_k, s.top_p, self.generator)[0])
            if token in self.stop:
                break
            self.last_reply.append(token)
            yield stream.push(token)
            last = torch.tensor([token], device=device)
            logits = fast.step(last, self.cache) if fast is not None else self.model(last[:, None], self.cache)[:, -1]
            self.cached.append(token)
        self.messages.append({"role": "assistant", "content": self.tokenizer.decode(self.last_reply)})
