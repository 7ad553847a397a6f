"""`transformer serve CKPT`: an HTTP service over a checkpoint (FastAPI, run by uvicorn), with dynamic batching.

    POST /v1/translate  {"texts": [...], "beam": 5}              -> {"translations": [...]}
    POST /v1/generate   {"prompt": "...", "max_new_tokens": 50, "stream": true}   (server-sent events)
    POST /v1/classify   {"texts": [...]}  -> {"predictions": [{"label", "probabilities"}]}
    POST /v1/embed      {"texts": [...]}  -> {"embeddings": [[...]], "dim": N}
    POST /v1/attention  {"text": "..."}   -> {"translation": "...", "page": "<the attention explorer>"}
    POST /v1/chat/completions, POST /v1/completions, GET /v1/models: OpenAI's API (`serve/openai.py`)
    GET  /health, GET /v1/model, GET / (a page to try it), GET /docs (OpenAPI)

Every error is JSON {"detail": "..."} (on the OpenAI routes, OpenAI's {"error": {...}}): malformed JSON 400, a
wrong or missing field 422 naming it (400 on the OpenAI routes, as OpenAI answers), too many or too long texts and
too large a body 413 with the limit, an unknown route 404, a full queue 429 with Retry-After, a missing or wrong
API key 401. The handlers run the same library functions as the command line, through one worker
(`serve/batcher.py`); a language model's requests are generated together by continuous batching
(`serve/continuous.py`).
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..backend import check_decoding, decoding
from ..checkpoint import Checkpoint
from ..cpu.linear import packed_weights
from ..errors import TransformerError
from ..generate import DecodingSettings
from ..task_registry import routes
from ..templates import template
from .batcher import Batcher, Job, QueueFull
from .continuous import Completion, ContinuousBatcher
from .guards import (
    ApiKey,
    BodyLimit,
    SlowRefusals,
    check_exposure,
    default_hosts,
    error_response,
    header_timeout_protocol,
)
from .openai import PATHS as OPENAI_PATHS
from .openai import APIError, add_openai_routes

log = logging.getLogger("transformer")


@dataclass
class Limits:
    """What one request may ask for (each a `transformer serve` flag)."""

    max_texts: int = 64  # texts per request
    max_text_chars: int = 2000  # characters per text
    max_body_bytes: int = 1_000_000
    max_beam: int = 16
    max_new_tokens: int = 512  # output tokens per text or choice, on every route
    max_attention_tokens: int = 128  # source tokens of /v1/attention (its answer grows with their square)
    request_timeout: float = 300.0  # seconds a request may wait and run (a stream: between two pieces); then 504
    body_timeout: float = 10.0  # seconds a client may take to send its request body; then 408
    max_refusals_per_s: float = 10.0  # 4xx a second to one client address; further ones answered 1 s late (0: off)


@dataclass
class Batching:
    """How requests share the model (each a `transformer serve` flag)."""

    max_batch_tokens: int = 4096  # source tokens per batch (translate, classify, embed)
    max_wait_ms: float = 25.0  # how long a batch waits for more requests
    max_batch: int = 64  # texts per batch; rows generated at once
    max_kv_tokens: int = 32768  # a language model's KV cache: rows x the widest row's reservation
    max_queue: int = 256  # requests waiting; more are answered 429
    max_connections: int = 512  # open connections (uvicorn's limit_concurrency); more are answered 503


class Runner:
    """Runs one batch of one kind with the model: what the worker thread calls."""

    def __init__(self, ckpt: Checkpoint, bf16: bool = False, int8: bool = False, batching: Batching = Batching()):
        self.ckpt, self.bf16 = ckpt, bf16
        model = ckpt.model
        # The served weights never change: decoding prepares them (packed, transposed, int8) once, not per batch.
        self._prepared = contextlib.ExitStack()
        if int8:
            self._prepared.enter_context(decoding(model, int8=True))
        elif hasattr(model, "decoder"):
            self._prepared.enter_context(packed_weights(model.decoder, model.output))
        self.pool = None  # a language model's requests: continuous batching
        if ckpt.config.arch == "decoder-only":
            self.pool = ContinuousBatcher(
                model, ckpt.tgt_tokenizer, batching.max_kv_tokens, batching.max_batch, self.context
            )

    @contextlib.contextmanager
    def context(self):
        """What every model call runs in: inference mode, and bf16 autocast (per thread: entered in the
        worker's) if asked for."""
        with torch.inference_mode(), decoding(self.ckpt.model, bf16=self.bf16):
            yield

    def close(self) -> None:
        """Drop what was prepared: the model multiplies by its own weights again."""
        self._prepared.close()

    def __call__(self, kind: str, settings, texts: list[str], jobs: list[Job], pause=None) -> list:
        """`settings`: a `DecodingSettings` (translate) or None. `pause()`, called between a translation's
        decoding steps, may run other work and says whether to abandon this one."""
        ck = self.ckpt
        abandoned = pause or (lambda: all(j.cancelled for j in jobs))
        with self.context():
            if kind == "translate":
                from ..generate import translate_texts

                return translate_texts(
                    ck.model, ck.src_tokenizer, ck.tgt_tokenizer, texts, settings, len(texts), abandoned
                )
            if kind in ("classify", "embed"):
                from ..classify import classify_texts, embed_texts

                fn = classify_texts if kind == "classify" else embed_texts
                return fn(ck.model, ck.src_tokenizer, texts, batch_size=len(texts)).tolist()
            if kind == "attention":
                from ..generate import translate_texts
                from ..viz import attention_maps, attention_page

                maps = attention_maps(ck.model, ck.src_tokenizer, ck.tgt_tokenizer, texts[0])
                translation = translate_texts(ck.model, ck.src_tokenizer, ck.tgt_tokenizer, texts[:1])[0]
                return [{"translation": translation, "page": attention_page(maps)}]
            raise ValueError(f"no batch of kind {kind!r}")


class _Service:
    """What the route handlers share: the checkpoint, the routes it can serve, the limits and the worker."""

    def __init__(
        self, ckpt: Checkpoint, limits: Limits, batching: Batching, bf16: bool, int8: bool, model_id: str
    ) -> None:
        self.ckpt, self.limits, self.batching, self.bf16, self.int8 = ckpt, limits, batching, bf16, int8
        self.model_id, self.tokenizer = model_id, ckpt.tgt_tokenizer
        self.kinds = set(routes(ckpt.task))
        # the positions a language model sees: the windows it was trained on, else its positions' range
        self.context = ckpt.meta.get("run", {}).get("data", {}).get("block_size") or ckpt.config.max_positions
        self.batcher: Optional[Batcher] = None  # started with the app's lifespan

    def require(self, kind: str) -> None:
        if kind not in self.kinds:
            raise APIError(
                404,
                f"this server holds a '{self.ckpt.task}' checkpoint: /v1/{kind} is not available "
                f"(available: {', '.join('/v1/' + k for k in sorted(self.kinds))})",
            )

    def check_model(self, model: str) -> None:
        """OpenAI clients name the model: it must be the one served."""
        self.require("generate")
        if model != self.model_id:
            raise APIError(
                404,
                f"The model '{model}' does not exist: this server serves '{self.model_id}'",
                "model",
                "model_not_found",
            )

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "transformer"}

    @property
    def created(self) -> int:
        try:
            return int(os.stat(self.ckpt.path).st_mtime)
        except (OSError, TypeError):
            return 0

    def check_texts(self, texts: list[str]) -> int:
        """Refuses too many or too long texts (413); returns a cheap estimate of the tokens they add to a batch."""
        limits = self.limits
        if len(texts) > limits.max_texts:
            raise APIError(413, f"{len(texts)} texts in one request; the limit is {limits.max_texts} (--max-texts)")
        for i, t in enumerate(texts):
            if len(t) > limits.max_text_chars:
                raise APIError(
                    413, f"texts[{i}] has {len(t)} characters; the limit is {limits.max_text_chars} (--max-text-chars)"
                )
        return sum(len(t) // 4 + 1 for t in texts)

    def split(self, texts: list[str], s: DecodingSettings) -> list[tuple[list[str], int]]:
        """Texts to translate as parts that each fit --max-batch-tokens, counting what a text costs a batch:
        beam x (source + output) tokens, the output at most a x source + b and --max-new-tokens. A text that
        alone does not fit is a 413. Returns [(texts, cost)]."""
        budget = self.batching.max_batch_tokens
        parts: list[tuple[list[str], int]] = []
        for i, text in enumerate(texts):
            n = len(self.ckpt.src_tokenizer.encode(text))
            cost = s.beam_size * (n + min(s.max_len, int(n * s.max_len_a) + s.max_len_b))
            if cost > budget:
                raise APIError(
                    413,
                    f"texts[{i}] at beam {s.beam_size} needs {cost} token slots (beam x (source + output)); the "
                    f"server's batches hold {budget} (--max-batch-tokens)",
                )
            if parts and parts[-1][1] + cost <= budget:
                parts[-1][0].append(text)
                parts[-1] = (parts[-1][0], parts[-1][1] + cost)
            else:
                parts.append(([text], cost))
        return parts

    def fit(self, ids: list[int], max_tokens: Optional[int], n: int = 1, crop: bool = False) -> tuple[list, int]:
        """A prompt's ids and its number of new tokens (None: as many as the context and the server allow),
        checked against --max-new-tokens, the model's context (a prompt cropped to its end if `crop`) and the
        KV budget. Returns (ids, max_tokens)."""
        cap, context = self.limits.max_new_tokens, self.context
        if max_tokens is None:
            max_tokens = min(cap, context - len(ids))
        if max_tokens > cap:
            raise APIError(
                400, f"max_tokens is {max_tokens}; this server allows at most {cap} (--max-new-tokens)", "max_tokens"
            )
        if crop and max_tokens < context:
            ids = ids[-(context - max_tokens) :]
        if max_tokens < 1 or len(ids) + max_tokens > context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(ids) + max(max_tokens, 1)} tokens ({len(ids)} in the prompt, {max_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.",
                "max_tokens",
                "context_length_exceeded",
            )
        if n > self.batching.max_batch:
            raise APIError(
                413, f"n is {n}; the server generates at most {self.batching.max_batch} at once (--max-batch)", "n"
            )
        budget = self.batching.max_kv_tokens
        if n * (len(ids) + max_tokens) > budget:
            raise APIError(
                413,
                f"{n} x ({len(ids)} prompt + {max_tokens} new) tokens do not fit the server's KV cache of "
                f"{budget} tokens (--max-kv-tokens)",
                "max_tokens",
            )
        return ids, max_tokens

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` (all or none: a full queue cancels those already queued and answers 429)."""
        for i, job in enumerate(jobs):
            try:
                self.batcher.submit(job)
            except QueueFull as e:
                for j in jobs[:i]:
                    j.cancelled = True
                raise APIError(429, f"the server is busy: {e}; retry later", None, "rate_limit_exceeded",
                               {"Retry-After": "1"}) from None  # fmt: skip

    async def run(self, request, job: Job):
        """Queue `job` for the worker and wait for its results; a client that goes away cancels it, and so does
        --request-timeout (504)."""
        loop = asyncio.get_running_loop()
        job.loop, job.future = loop, loop.create_future()
        self.submit([job])
        deadline = loop.time() + self.limits.request_timeout
        while True:  # a queued job whose client has gone is never run; a running one stops at its next step
            done, _ = await asyncio.wait({job.future}, timeout=max(0.0, min(0.25, deadline - loop.time())))
            if done:
                return job.future.result()
            if await request.is_disconnected():
                job.cancelled = True
                raise APIError(499, "client closed the request")
            if loop.time() >= deadline:
                job.cancelled = True
                raise APIError(504, f"the request took over {self.limits.request_timeout:g} s (--request-timeout)")

    def stream_response(self, requests: list[Completion], chunks):
        """Queue one job per request, all streaming into one queue; `chunks(events)` turns their events
        (choice, text, finish_reason, tokens) into server-sent events. A client that goes away cancels them."""
        from fastapi.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        events_in: asyncio.Queue = asyncio.Queue()
        jobs = [Job("complete", [], r, loop=loop, future=loop.create_future(), stream=events_in) for r in requests]
        self.submit(jobs)

        async def events():
            ended, timeout = 0, self.limits.request_timeout
            while ended < len(jobs):
                try:
                    event = await asyncio.wait_for(events_in.get(), timeout)
                except asyncio.TimeoutError:
                    yield TimeoutError(f"no progress for {timeout:g} s (--request-timeout)")
                    return
                if event is None:
                    ended += 1
                    continue
                yield event
                if isinstance(event, BaseException):
                    return

        async def body():
            try:
                async for piece in chunks(events()):
                    yield piece
            finally:
                for job in jobs:
                    job.cancelled = True  # the client went away mid-stream (or it ended): stop generating

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def info(self) -> dict:
        """What a client needs to know: the model's name and kind, the routes, the limits; nothing of the host
        (no path, no full configuration)."""
        cfg = self.ckpt.config
        pool = self.batcher.pool if self.batcher is not None else None
        return {
            "model": self.model_id,
            "task": self.ckpt.task,
            "arch": cfg.arch,
            "labels": self.ckpt.meta.get("labels"),
            "context": self.context if "generate" in self.kinds else None,
            "bf16": self.bf16,
            "int8": self.int8,
            "routes": sorted(f"/v1/{k}" for k in self.kinds),
            "limits": self.limits.__dict__,
            "batching": {
                **self.batching.__dict__,
                "batches_run": self.batcher.batches if self.batcher else 0,
                "generation_steps": pool.steps if pool is not None else 0,
                "generating": len(pool.rows) if pool is not None else 0,
            },
        }

    def healthy(self) -> bool:
        return self.batcher is not None and self.batcher.thread.is_alive()


def model_id(path) -> str:
    """The name OpenAI clients call the model by: the checkpoint directory's, with its run's for a run's
    `best`/`last`/`step-N` checkpoint (e.g. "shakespeare/best")."""
    path = Path(str(path))
    if path.name in ("best", "last") or path.name.startswith("step"):
        return f"{path.parent.name}/{path.name}"
    return path.name or "model"


def create_app(
    ckpt: Checkpoint,
    limits: Limits = Limits(),
    batching: Batching = Batching(),
    bf16: bool = False,
    int8: bool = False,
    api_key: Optional[str] = None,
    name: Optional[str] = None,
    docs: bool = False,
    allowed_hosts: Optional[list[str]] = None,
):
    """The ASGI application serving `ckpt` (FastAPI). Its worker starts with the app's lifespan; with `int8`,
    the model multiplies by int8 weights (CPU) while the app runs; with `api_key`, every route but /health and
    the page needs `Authorization: Bearer <api_key>`. `name`: the model's id for OpenAI clients (default:
    `model_id(ckpt.path)`). `docs`: the OpenAPI page at /docs (its scripts come from a CDN) and /openapi.json.
    `allowed_hosts`: the Host header must name one of them (400 otherwise: a web page cannot reach a local
    server through DNS rebinding); None: not checked. If the worker dies, /health answers 503 and
    `app.state.on_worker_death` (default: none) is called."""
    from fastapi import FastAPI

    from .. import __version__

    check_decoding(ckpt.model, bf16, int8)
    svc = _Service(ckpt, limits, batching, bf16, int8, name or model_id(ckpt.path))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner = Runner(ckpt, bf16, int8, batching)
        b = batching
        svc.batcher = Batcher(runner, b.max_batch_tokens, b.max_wait_ms, b.max_batch, runner.pool, b.max_queue)
        svc.batcher.on_death = lambda e: app.state.on_worker_death and app.state.on_worker_death(e)
        yield
        svc.batcher.close()  # SIGTERM/Ctrl-C: uvicorn stops accepting and lets requests finish first
        runner.close()

    hidden = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="transformer", version=__version__, lifespan=lifespan, **hidden)
    app.state.service, app.state.on_worker_death = svc, None
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, timeout=limits.body_timeout)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(SlowRefusals, rate=limits.max_refusals_per_s)  # the last added: sees every refusal
    _add_error_handlers(app)
    models = _request_models(limits)
    _add_text_routes(app, svc, models)
    _add_generate_route(app, svc, models["generate"])
    add_openai_routes(app, svc)
    return app


def _add_error_handlers(app) -> None:
    """Every error a JSON body (see `error_response`): malformed JSON 400, a wrong field 422 naming it (400 on
    the OpenAI routes), a user mistake 422."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        path, errors = request.url.path, exc.errors()
        openai = path.startswith(OPENAI_PATHS)
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(path, 400, "malformed JSON in the request body")
        unknown = [str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden" and len(e["loc"]) == 2]
        if openai and unknown:
            return error_response(path, 400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
        fields = [".".join(str(x) for x in e["loc"][1:]) or "body" for e in errors]
        parts = [f"{f}: {e['msg']}" for f, e in zip(fields, errors)]
        return error_response(path, 400 if openai else 422, "; ".join(parts), fields[0] if fields else None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(request.url.path, exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(request.url.path, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(TransformerError)
    async def user_error(request: Request, exc: TransformerError):
        return error_response(request.url.path, 422, str(exc))


def _add_text_routes(app, svc: _Service, models: dict) -> None:
    """Health, model information, the page, and the routes that take texts and answer at once."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse

    # the request bodies (annotations evaluated here, so FastAPI sees the classes; no postponed annotations)
    TranslateBody, TextsBody, AttentionBody = models["translate"], models["texts"], models["attention"]
    ckpt = svc.ckpt

    @app.get("/health")
    async def health():
        if not svc.healthy():
            return JSONResponse({"status": "error", "detail": "the decoding worker died"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info():
        return svc.info()

    @app.post("/v1/translate")
    async def translate(body: TranslateBody, request: Request):
        svc.require("translate")
        svc.check_texts(body.texts)
        cap = svc.limits.max_new_tokens
        settings = DecodingSettings(body.beam, body.length_penalty, body.max_len_a, body.max_len_b, cap)
        translations = []
        # one part at a time: a large request holds one batch's place in the queue, not all of them, so the
        # requests that come after it are not all served after all of it
        for texts, cost in svc.split(body.texts, settings):
            translations += await svc.run(request, Job("translate", texts, settings, cost))
        return {"translations": translations}

    @app.post("/v1/classify")
    async def classify(body: TextsBody, request: Request):
        svc.require("classify")
        probs = await svc.run(request, Job("classify", list(body.texts), None, svc.check_texts(body.texts)))
        labels = ckpt.meta.get("labels") or [str(i) for i in range(ckpt.config.num_labels)]
        return {
            "predictions": [
                {"label": labels[max(range(len(p)), key=p.__getitem__)], "probabilities": dict(zip(labels, p))}
                for p in probs
            ]
        }

    @app.post("/v1/embed")
    async def embed(body: TextsBody, request: Request):
        svc.require("embed")
        vectors = await svc.run(request, Job("embed", list(body.texts), None, svc.check_texts(body.texts)))
        return {"embeddings": vectors, "dim": ckpt.config.d_model}

    @app.post("/v1/attention")
    async def attention(body: AttentionBody, request: Request):
        svc.require("attention")
        svc.check_texts([body.text])
        if not body.text.strip():
            raise APIError(422, "text: give some text to look at")
        n, cap = len(ckpt.src_tokenizer.encode(body.text)), svc.limits.max_attention_tokens
        if n > cap:  # the answer grows with layers x heads x the square of the length
            raise APIError(413, f"text has {n} tokens; /v1/attention takes at most {cap} (--max-attention-tokens)")
        # its cost, for its place in the queue: the maps' forward pass and a translation, about 3 x n tokens
        return (await svc.run(request, Job("attention", [body.text], tokens=3 * n)))[0]

    @app.get("/", response_class=HTMLResponse)
    async def page():
        if "attention" in svc.kinds:
            return template("serve.html")
        if "generate" in svc.kinds:
            chat = bool((ckpt.meta.get("chat") or {}).get("template"))
            return (
                template("serve-chat.html")
                .replace("__MODEL__", json.dumps(svc.model_id))
                .replace("__CHAT__", json.dumps(chat))
            )
        return template("serve-api.html").replace("__TASK__", ckpt.task)


def _add_generate_route(app, svc: _Service, GenerateBody) -> None:
    """Generation from a language model: the whole text at once, or (stream) as server-sent events; one row of
    the continuous batch, as the OpenAI routes' requests are."""
    from fastapi import Request

    @app.post("/v1/generate")
    async def generate(body: GenerateBody, request: Request):
        svc.require("generate")
        svc.check_texts([body.prompt])
        ids = svc.tokenizer.encode(body.prompt or "\n") or [svc.ckpt.config.bos_id]
        if body.max_new_tokens == 0:
            return {"text": ""}
        ids, n = svc.fit(ids, body.max_new_tokens, crop=True)
        req = Completion(tuple(ids), n, body.temperature, body.top_p, body.top_k, 1, body.seed)
        if not body.stream:
            return {"text": (await svc.run(request, Job("complete", [], req)))[0]["text"]}

        async def chunks(events):
            async for event in events:
                if isinstance(event, BaseException):
                    yield f"data: {json.dumps({'detail': f'generation failed: {event}'})}\n\n"
                    return
                if event[1]:
                    yield f"data: {json.dumps({'text': event[1]})}\n\n"
            yield "data: [DONE]\n\n"

        return svc.stream_response([req], chunks)


def _request_models(limits: Limits) -> dict:
    """The request bodies, their limits checked by pydantic (a violation is a 422 naming the field)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Texts(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[str] = Field(min_length=1, description=f"at most {limits.max_texts} texts")

    class Translate(Texts):
        beam: int = Field(1, ge=1, le=limits.max_beam)
        length_penalty: float = Field(1.0, ge=0.0, le=5.0)
        max_len_a: float = Field(1.5, ge=0.0, le=10.0)
        max_len_b: int = Field(10, ge=0, le=limits.max_new_tokens)

    class Attention(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: str

    class Generate(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str = ""
        max_new_tokens: int = Field(100, ge=0, le=limits.max_new_tokens)
        temperature: float = Field(0.8, ge=0.0, le=10.0)
        top_k: int = Field(0, ge=0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        seed: int = Field(0, ge=-(2**63), le=2**64 - 1)
        stream: bool = False

    return {"texts": Texts, "translate": Translate, "attention": Attention, "generate": Generate}


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    bf16: bool = False,
    limits: Limits = Limits(),
    batching: Batching = Batching(),
    int8: bool = False,
    adapter: Optional[str] = None,
    api_key: Optional[str] = None,
    insecure: bool = False,
    name: Optional[str] = None,
    docs: bool = False,
    allowed_hosts: Optional[list[str]] = None,
) -> None:
    """Load `checkpoint` (with the peft LoRA adapter in `adapter`, unmerged, if given) and serve it until SIGTERM
    or Ctrl-C (which finish the requests in flight first). Only on this machine's loopback unless `api_key` (or
    `insecure`) is given: a server reachable from elsewhere without a key serves anyone. Requests must name a
    host of `allowed_hosts` (default: `default_hosts(host)`). If the decoding worker dies the server stops and
    this raises (exit status 1), for a supervisor to restart it."""
    try:
        import uvicorn
    except ImportError:
        raise TransformerError("serving needs FastAPI and uvicorn: pip install 'transformer[serve]'") from None
    from ..backend import resolve_device
    from ..checkpoint import load_checkpoint

    check_exposure(host, api_key, insecure)
    ckpt = load_checkpoint(checkpoint, device=resolve_device(device))
    if adapter:
        from ..interop.peft import with_adapter

        ckpt = with_adapter(ckpt, adapter, resolve_device(device))
    hosts = allowed_hosts or default_hosts(host)
    app = create_app(ckpt, limits, batching, bf16, int8, api_key, name, docs, hosts)
    log.info("serving %s (%s) on http://%s:%d  (pid %d)", checkpoint, ckpt.task, host, port, os.getpid())
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=30,
        limit_concurrency=batching.max_connections,
        http=header_timeout_protocol(limits.body_timeout),
    )
    server, died = _Server(config), []

    def on_worker_death(error: BaseException) -> None:
        died.append(error)
        server.should_exit = True  # uvicorn's loop looks at it a few times a second

    app.state.on_worker_death = on_worker_death
    server.run()
    if died:
        raise TransformerError(f"the decoding worker died ({died[0]!r}): the server stopped, to be restarted")


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM or Ctrl-C ends it with status 0 once the requests in flight are
        answered (uvicorn itself re-raises the signal after its graceful shutdown, so the process would die of
        it)."""

        @contextlib.contextmanager
        def capture_signals(self):
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    return Server


def _Server(config):
    return _server_class()(config)
