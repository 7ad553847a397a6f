"""The OpenAI-compatible routes: what programs written for OpenAI's API (its Python and JavaScript clients,
LangChain, curl scripts) send and expect, served by continuous batching (`continuous.py`).

    POST /v1/chat/completions  {"model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                                "stream", "stream_options": {"include_usage"}}  -> chat.completion (or chunks)
    POST /v1/completions       {"model", "prompt": str | [str], ... the same}   -> text_completion (or chunks)
    GET  /v1/models, GET /v1/models/{id}

Requests and answers have OpenAI's shapes (streams are server-sent `data: {chunk}` events ending with `data: [DONE]`);
errors too: {"error": {"message", "type", "param", "code"}}. As OpenAI does, an unknown field is refused (400,
"Unrecognized request argument supplied"); known fields this server cannot honour (tools, logprobs, penalties,
logit_bias, echo, suffix, a JSON response_format) are refused naming the field, never silently ignored;
bookkeeping ones (user, metadata, store, service_tier) are accepted and ignored. `top_k` is accepted as vLLM
accepts it.
"""

import asyncio
import json
import time
import uuid
from typing import Any, Optional, Union

from ..errors import TransformerError
from .batcher import Job
from .continuous import Completion

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_type(status: int) -> str:
    return {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def request_models(max_choices: int) -> dict:
    """The request bodies (pydantic): OpenAI's fields, ranges checked (a violation is a 400 naming the field)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Part(BaseModel):
        type: str
        text: Optional[str] = None

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template
        role: str
        content: Union[str, list[Part], None] = None

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Common(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str
        max_tokens: Optional[int] = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: int = Field(0, ge=0)
        n: int = Field(1, ge=1, le=max_choices)
        stop: Union[str, list[str], None] = None
        seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        logit_bias: Optional[dict[str, float]] = None
        user: Optional[str] = None
        metadata: Optional[dict[str, Any]] = None
        store: Optional[bool] = None
        service_tier: Optional[str] = None

    class Chat(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: Optional[int] = Field(None, ge=1)
        logprobs: Optional[bool] = None
        top_logprobs: Optional[int] = None
        tools: Optional[list[Any]] = None
        functions: Optional[list[Any]] = None
        tool_choice: Optional[Any] = None
        parallel_tool_calls: Optional[bool] = None
        response_format: Optional[dict[str, Any]] = None

    class Text(Common):
        prompt: Union[str, list[str]]
        echo: bool = False
        suffix: Optional[str] = None
        best_of: Optional[int] = None
        logprobs: Optional[int] = None

    return {"chat": Chat, "completion": Text}


def refuse_unsupported(body) -> None:
    """Known OpenAI fields whose meaning this server does not implement: a 400 naming the field."""
    fields = body.model_fields_set
    checks = [
        ("presence_penalty", body.presence_penalty != 0),
        ("frequency_penalty", body.frequency_penalty != 0),
        ("logit_bias", bool(body.logit_bias)),
        ("logprobs", getattr(body, "logprobs", None) not in (None, False)),
        ("top_logprobs", getattr(body, "top_logprobs", None) is not None),
        ("tools", bool(getattr(body, "tools", None))),
        ("functions", bool(getattr(body, "functions", None))),
        ("response_format", (getattr(body, "response_format", None) or {"type": "text"}).get("type") != "text"),
        ("echo", getattr(body, "echo", False)),
        ("suffix", getattr(body, "suffix", None) is not None),
        ("best_of", getattr(body, "best_of", None) not in (None, body.n)),
    ]
    for name, bad in checks:
        if bad and name in fields:
            raise APIError(400, f"{name} is not supported by this server", name, "unsupported_parameter")
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise APIError(400, "stop: at most 4 sequences", "stop")


def message_text(i: int, message) -> dict:
    """A message as the chat template takes it: its content as one string (text parts joined)."""
    content = message.content
    if isinstance(content, list):
        if any(p.type != "text" for p in content):
            raise APIError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        content = "".join(p.text or "" for p in content)
    return {**(message.model_extra or {}), "role": message.role, "content": content}


def add_openai_routes(app, svc) -> None:
    """The routes, served from `svc` (the server's `_Service`)."""
    from fastapi import Request

    models = request_models(svc.limits.max_texts)
    ChatBody, TextBody = models["chat"], models["completion"]

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [svc.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        svc.check_model(model_id)
        return svc.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        prompt = _chat_prompt(svc, body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _complete(svc, request, body, [prompt], max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: TextBody, request: Request):
        svc.check_model(body.model)
        refuse_unsupported(body)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts or len(texts) * body.n > svc.limits.max_texts:
            raise APIError(400, f"prompt: 1 to {svc.limits.max_texts} prompts x n (--max-texts)", "prompt")
        svc.check_texts(texts)
        prompts = [svc.tokenizer.encode(t) or [svc.ckpt.config.bos_id] for t in texts]
        return await _complete(svc, request, body, prompts, body.max_tokens or 16, chat=False)


def _chat_prompt(svc, body) -> list[int]:
    svc.check_model(body.model)
    refuse_unsupported(body)
    chat = svc.ckpt.meta.get("chat") or {}
    if not chat.get("template"):
        raise APIError(
            400, "this model has no chat template (it was not imported with one): use /v1/completions", "messages"
        )
    from ..chat import render_chat

    messages = [message_text(i, m) for i, m in enumerate(body.messages)]
    svc.check_texts([m["content"] or "" for m in messages])
    try:
        text = render_chat(chat["template"], messages, True, chat.get("special_tokens"))
    except TransformerError as e:
        raise APIError(400, str(e), "messages") from None
    return svc.tokenizer.encode_plain(text)


async def _complete(svc, request, body, prompts: list[list[int]], max_tokens: Optional[int], chat: bool):
    """Queue one job per prompt (their choices numbered on), then answer all at once or as a stream."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    reqs = []
    for i, ids in enumerate(prompts):
        ids, tokens = svc.fit(ids, max_tokens)
        reqs.append(
            Completion(
                tuple(ids), tokens, body.temperature, body.top_p, body.top_k, body.n, body.seed, stop, i * body.n
            )
        )
    head = {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
        "created": int(time.time()),
        "model": svc.model_id,
        "system_fingerprint": None,
    }
    usage_prompt = sum(len(r.prompt) for r in reqs) * body.n
    if not body.stream:
        jobs = [Job("complete", [], r) for r in reqs]
        try:
            answers = await asyncio.gather(*(svc.run(request, j) for j in jobs))
        except BaseException:
            for j in jobs:  # one failed (the queue was full, the client left): the others are not run either
                j.cancelled = True
            raise
        choices = [c for a in answers for c in a]
        done = sum(c["tokens"] for c in choices)
        return {
            **head,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [_choice(c, chat) for c in choices],
            "usage": _usage(usage_prompt, done),
        }
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return svc.stream_response(
        reqs, lambda events: _chunks(events, head, chat, body.n * len(reqs), include_usage, usage_prompt)
    )


def _choice(c: dict, chat: bool) -> dict:
    if chat:
        return {
            "index": c["index"],
            "message": {"role": "assistant", "content": c["text"]},
            "finish_reason": c["finish_reason"],
            "logprobs": None,
        }
    return {"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _chunks(events, head: dict, chat: bool, choices: int, include_usage: bool, prompt_tokens: int):
    """Server-sent chunks from the pool's events (choice, text, finish_reason, tokens), then [DONE]."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    usage = {"usage": None} if include_usage else {}

    def chunk(index: int, text: Optional[str], finish: Optional[str], role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice], **usage})}\n\n"

    if chat:  # each choice's first chunk names the role, as OpenAI's do
        for i in range(choices):
            yield chunk(i, None, None, role=True)
    tokens = {}
    async for event in events:
        if isinstance(event, BaseException):  # the worker failed: say so, then end the stream without [DONE]
            yield f"data: {json.dumps(error_body(500, f'generation failed: {event}'))}\n\n"
            return
        index, text, finish, count = event
        tokens[index] = count
        if text:
            yield chunk(index, text, None)
        if finish:
            yield chunk(index, None, finish)
    if include_usage:
        final = {**head, "object": obj, "choices": [], "usage": _usage(prompt_tokens, sum(tokens.values()))}
        yield f"data: {json.dumps(final)}\n\n"
    yield "data: [DONE]\n\n"
