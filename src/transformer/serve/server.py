"""`transformer serve CKPT`: an HTTP service over a checkpoint (FastAPI, run by uvicorn), with dynamic batching.

    POST /v1/translate  {"texts": [...], "beam": 5}              -> {"translations": [...]}
    POST /v1/generate   {"prompt": "...", "max_new_tokens": 50, "stream": true}   (server-sent events)
    POST /v1/classify   {"texts": [...]}  -> {"predictions": [{"label", "probabilities"}]}
    POST /v1/embed      {"texts": [...]}  -> {"embeddings": [[...]], "dim": N}
    POST /v1/attention  {"text": "..."}   -> {"translation": "...", "page": "<the attention explorer>"}
    GET  /health, GET /v1/model, GET / (a page to try it), GET /docs (OpenAPI)

Every error is JSON {"detail": "..."}: malformed JSON 400, a wrong or missing field 422 naming it, too many or
too long texts and too large a body 413 with the limit, an unknown route 404. The handlers run the same
library functions as the command line, through one batching worker (`serve/batcher.py`).
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Optional

import torch

from ..backend import check_decoding, decoding
from ..checkpoint import Checkpoint
from ..cpu.linear import packed_weights
from ..errors import TransformerError
from ..generate import DecodingSettings, SamplingSettings
from ..task_registry import routes
from ..templates import template
from .batcher import Batcher, Job

log = logging.getLogger("transformer")


@dataclass
class Limits:
    """What one request may ask for (each a `transformer serve` flag)."""

    max_texts: int = 64  # texts per request
    max_text_chars: int = 2000  # characters per text
    max_body_bytes: int = 1_000_000
    max_beam: int = 16
    max_new_tokens: int = 512


class Runner:
    """Runs one batch of one kind with the model: what the worker thread calls."""

    def __init__(self, ckpt: Checkpoint, bf16: bool = False, int8: bool = False) -> None:
        self.ckpt, self.bf16 = ckpt, bf16
        # The served weights never change: decoding prepares them (packed, transposed, int8) once, not per batch.
        self._prepared = contextlib.ExitStack()
        if int8:
            self._prepared.enter_context(decoding(ckpt.model, int8=True))
        elif hasattr(ckpt.model, "decoder") and hasattr(ckpt.model, "encoder"):
            self._prepared.enter_context(packed_weights(ckpt.model.decoder, ckpt.model.output))

    def close(self) -> None:
        """Drop what was prepared: the model multiplies by its own weights again."""
        self._prepared.close()

    def __call__(self, kind: str, settings, texts: list[str], jobs: list[Job]) -> Optional[list]:
        """`settings`: a `DecodingSettings` (translate), a `SamplingSettings` (generate) or None."""
        ck = self.ckpt
        # bf16 autocast is per thread: entered here, in the worker's, for each batch
        with torch.inference_mode(), decoding(ck.model, bf16=self.bf16):
            if kind == "translate":
                from ..generate import translate_texts

                return translate_texts(
                    ck.model, ck.src_tokenizer, ck.tgt_tokenizer, texts, settings, batch_size=len(texts)
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
            return self._generate(settings, texts[0], jobs[0])

    def _generate(self, settings, prompt: str, job: Job) -> Optional[list]:
        from ..generate import TextStream, sample

        ck = self.ckpt
        s = settings
        tok = ck.tgt_tokenizer
        ids = tok.encode(prompt or "\n") or [ck.config.bos_id]
        device = next(ck.model.parameters()).device
        context = ck.meta.get("run", {}).get("data", {}).get("block_size")
        stream, pieces = TextStream(tok, ids), []
        gen = torch.Generator().manual_seed(s.seed)
        for token in sample(
            ck.model,
            torch.tensor([ids], device=device),
            s.max_new_tokens,
            s.temperature,
            s.top_k,
            s.top_p,
            gen,
            context,
        ):
            if job.cancelled:
                break
            if int(token[0]) in ck.config.eos_ids:  # the model ended its text (or its turn)
                break
            piece = stream.push(int(token[0]))
            pieces.append(piece)
            if job.stream is not None and piece:
                job.emit(piece)
        if job.stream is not None:
            job.emit(None)
            return None
        return ["".join(pieces)]


class _Service:
    """What the route handlers share: the checkpoint, the routes it can serve, the limits and the worker."""

    def __init__(self, ckpt: Checkpoint, limits: Limits, batching: dict, bf16: bool, int8: bool = False) -> None:
        self.ckpt, self.limits, self.batching, self.bf16, self.int8 = ckpt, limits, batching, bf16, int8
        self.kinds = set(routes(ckpt.task))
        self.batcher: Optional[Batcher] = None  # started with the app's lifespan

    def require(self, kind: str) -> None:
        from fastapi import HTTPException

        if kind not in self.kinds:
            raise HTTPException(
                404,
                f"this server holds a '{self.ckpt.task}' checkpoint: /v1/{kind} is not available "
                f"(available: {', '.join('/v1/' + k for k in sorted(self.kinds))})",
            )

    def check_texts(self, texts: list[str]) -> int:
        """Refuses too many or too long texts (413); returns a cheap estimate of the tokens they add to a batch."""
        from fastapi import HTTPException

        limits = self.limits
        if len(texts) > limits.max_texts:
            raise HTTPException(
                413, f"{len(texts)} texts in one request; the limit is {limits.max_texts} (--max-texts)"
            )
        for i, t in enumerate(texts):
            if len(t) > limits.max_text_chars:
                raise HTTPException(
                    413, f"texts[{i}] has {len(t)} characters; the limit is {limits.max_text_chars} (--max-text-chars)"
                )
        return sum(len(t) // 4 + 1 for t in texts)

    async def run(self, request, job: Job):
        """Queue `job` for the worker and wait for its results; a client that goes away cancels it."""
        from fastapi import HTTPException

        loop = asyncio.get_running_loop()
        job.loop, job.future = loop, loop.create_future()
        self.batcher.submit(job)
        while True:  # a queued job whose client has gone is never run
            done, _ = await asyncio.wait({job.future}, timeout=0.25)
            if done:
                return job.future.result()
            if await request.is_disconnected():
                job.cancelled = True
                raise HTTPException(499, "client closed the request")

    def info(self) -> dict:
        ck, cfg = self.ckpt, self.ckpt.config
        return {
            "task": ck.task,
            "checkpoint": str(ck.path),
            "arch": cfg.arch,
            "config": cfg.to_dict(),
            "labels": ck.meta.get("labels"),
            "device": str(next(ck.model.parameters()).device),
            "bf16": self.bf16,
            "int8": self.int8,
            "routes": sorted(f"/v1/{k}" for k in self.kinds),
            "limits": self.limits.__dict__,
            "batching": {**self.batching, "batches_run": self.batcher.batches if self.batcher else 0},
        }


def create_app(
    ckpt: Checkpoint,
    limits: Limits = Limits(),
    max_batch_tokens: int = 4096,
    max_wait_ms: float = 25.0,
    max_batch: int = 64,
    bf16: bool = False,
    int8: bool = False,
):
    """The ASGI application serving `ckpt` (FastAPI). Its batching worker starts with the app's lifespan; with
    `int8`, the model multiplies by int8 weights (CPU) while the app runs."""
    from fastapi import FastAPI

    from .. import __version__

    check_decoding(ckpt.model, bf16, int8)
    svc = _Service(
        ckpt,
        limits,
        {"max_batch_tokens": max_batch_tokens, "max_wait_ms": max_wait_ms, "max_batch": max_batch},
        bf16,
        int8,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner = Runner(ckpt, bf16, int8)
        svc.batcher = Batcher(runner, max_batch_tokens, max_wait_ms, max_batch)
        yield
        svc.batcher.close()  # SIGTERM/Ctrl-C: uvicorn stops accepting and lets requests finish first
        runner.close()

    app = FastAPI(
        title="transformer",
        version=__version__,
        lifespan=lifespan,
        description=f"Serving a '{ckpt.task}' checkpoint: {ckpt.path}",
    )
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
    _add_error_handlers(app)
    models = _request_models(limits)
    _add_text_routes(app, svc, models)
    _add_generate_route(app, svc, models["generate"])
    return app


def _add_error_handlers(app) -> None:
    """Every error a JSON {"detail": ...}: malformed JSON 400, a wrong field 422 naming it, a user mistake 422."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "malformed JSON in the request body"}, status_code=400)
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(TransformerError)
    async def user_error(request: Request, exc: TransformerError):
        return JSONResponse({"detail": str(exc)}, status_code=422)


def _add_text_routes(app, svc: _Service, models: dict) -> None:
    """Health, model information, the page, and the routes that take texts and answer at once."""
    from fastapi import HTTPException, Request
    from fastapi.responses import HTMLResponse

    # the request bodies (annotations evaluated here, so FastAPI sees the classes; no postponed annotations)
    TranslateBody, TextsBody, AttentionBody = models["translate"], models["texts"], models["attention"]
    ckpt = svc.ckpt

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info():
        return svc.info()

    @app.post("/v1/translate")
    async def translate(body: TranslateBody, request: Request):
        svc.require("translate")
        tokens = svc.check_texts(body.texts)
        settings = DecodingSettings(body.beam, body.length_penalty, body.max_len_a, body.max_len_b)
        return {"translations": await svc.run(request, Job("translate", list(body.texts), settings, tokens))}

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
            raise HTTPException(422, "text: give some text to look at")
        return (await svc.run(request, Job("attention", [body.text])))[0]

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (
            template("serve.html")
            if "attention" in svc.kinds
            else template("serve-api.html").replace("__TASK__", ckpt.task)
        )


def _add_generate_route(app, svc: _Service, GenerateBody) -> None:
    """Generation from a language model: the whole text at once, or (stream) as server-sent events."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    @app.post("/v1/generate")
    async def generate(body: GenerateBody, request: Request):
        svc.require("generate")
        svc.check_texts([body.prompt])
        settings = SamplingSettings(body.max_new_tokens, body.temperature, body.top_k, body.top_p, body.seed)
        job = Job("generate", [body.prompt], settings)
        if not body.stream:
            return {"text": (await svc.run(request, job))[0]}
        loop = asyncio.get_running_loop()
        job.loop, job.future, job.stream = loop, loop.create_future(), asyncio.Queue()
        svc.batcher.submit(job)

        async def events():
            try:
                while True:
                    piece = await job.stream.get()
                    if piece is None:
                        break
                    yield f"data: {json.dumps({'text': piece})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # the client went away mid-stream: stop generating

        return StreamingResponse(events(), media_type="text/event-stream")


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
        seed: int = 0
        stream: bool = False

    return {"texts": Texts, "translate": Translate, "attention": Attention, "generate": Generate}


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413, whether or not it says its length."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send) -> None:
        body = json.dumps({"detail": f"request body over {self.limit} bytes (--max-body-bytes)"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    bf16: bool = False,
    limits: Limits = Limits(),
    max_batch_tokens: int = 4096,
    max_wait_ms: float = 25.0,
    max_batch: int = 64,
    int8: bool = False,
    adapter: Optional[str] = None,
) -> None:
    """Load `checkpoint` (with the peft LoRA adapter in `adapter`, unmerged, if given) and serve it until SIGTERM
    or Ctrl-C (which finish the requests in flight first)."""
    try:
        import uvicorn
    except ImportError:
        raise TransformerError("serving needs FastAPI and uvicorn: pip install 'transformer[serve]'") from None
    from ..backend import resolve_device
    from ..checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint, device=resolve_device(device))
    if adapter:
        from ..interop.peft import with_adapter

        ckpt = with_adapter(ckpt, adapter, resolve_device(device))
    app = create_app(ckpt, limits, max_batch_tokens, max_wait_ms, max_batch, bf16, int8)
    log.info("serving %s (%s) on http://%s:%d  (pid %d)", checkpoint, ckpt.task, host, port, os.getpid())
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30))
    server.run()


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
