"""The HTTP side of the server: a Starlette app whose handlers check a request
(tools/server/protocol.py), hand its prompt to the engine (models/generation/engine.py, running on its own
thread) and turn the tokens that come back into OpenAI response objects or server-sent events.

Starlette + uvicorn: the standard small ASGI pair (FastAPI is built on them), with streaming
responses that notice a client going away, so a dropped stream frees its slot; a hand-written
HTTP/1.1 server would have to get keep-alive, chunking and disconnects right itself.
"""
import asyncio
import contextlib
import hmac
import json
import sys
import threading
import time
import traceback
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from models.generation import speculative
from models.generation.constraints import Grammar, GrammarError
from models.generation.engine import Busy, Engine, Request
from models.generation.pooling import pool
from models.generation.sampling import make_sampler
from models.generation.stops import StopText
from models.llama3.images import ImageError, image_from_bytes
from models.text.chat import chat_tokens
from models.text.tokenizer import StreamDecoder
from tools.server import metrics, protocol
from tools.server.connections import BodyTimeout, BodyTooLarge, read_body
from tools.server.protocol import BadRequest, error_body
from tools.server.templates import TemplateRenderer



class Server:
    """The model (loaded on a thread while the HTTP side already answers /health with 503), its
    engine, and what the handlers need of them."""

    def __init__(self, load, name: str, parallel: int, queue: int, api_key: str | None = None,
                 body_timeout: float = 30.0, cors: str | None = None, access_log: bool = True,
                 pooling: str = "mean", normalize: bool = True):
        """body_timeout: seconds a client may take to send a request's body (408 after); cors: the
        origin browsers may call from (none by default); access_log: a line per request on stderr;
        pooling and normalize: how /v1/embeddings makes one vector of an input's hidden states
        (models.generation.pooling)."""
        self.name, self.api_key, self.queue, self.body_timeout = name, api_key, queue, body_timeout
        self.pooling, self.normalize = pooling, normalize
        self.cors, self.access_log, self.requests = cors, access_log, metrics.Requests()
        self.model = self.engine = self.defaults = self.failed = None
        self.ready = threading.Event()
        self.render = TemplateRenderer()

        def start():
            try:
                self.model, self.defaults = load()
                tok = self.model.tokenizer
                self.longest_token = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
                if tok.chat_template is not None:
                    self.render.start()
                self.engine = Engine(self.model, parallel, queue, self.defaults.get("proposer"),
                                     self.defaults.get("most", 8), self.defaults.get("images_kept", 4))
                self.engine.warm()  # every batch width captured before the first request
            except Exception as e:  # the server says so on /health and every endpoint
                self.failed = str(e)
                return
            self.ready.set()
            self.engine.serve_forever()
        self.thread = threading.Thread(target=start, name="engine", daemon=True)

    def stop(self):
        if self.engine:
            self.engine.stop()
        self.render.close()


PAGE = Path(__file__).parent / "page"
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
              "chat.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                                           "frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _error(status: int, message: str, kind="invalid_request_error", param=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)


class EngineError(RuntimeError):
    """The engine could not finish a request (it goes on with the others)."""


class Job:
    """One prompt in the engine; its events arrive on this event loop's queue."""

    def __init__(self, server: Server, ids, settings: dict, stop_ids, logprobs=None, echo=False, choice: int = 0,
                 constraint=None, prediction=(), images=()):
        """choice: which of the request's n choices; with a seed, choice 0 draws as a request of
        n = 1 would, the others from the seed and their index. constraint: the reply's grammar
        (models.generation.constraints), one per job. prediction: ids of the expected reply
        (OpenAI's predicted output), drafts for speculative decoding. images: the encoder's input
        (models.llama3.images.Pixels), one per <|image|> token of ids."""
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        max_tokens = settings["max_tokens"] or server.model.context  # the context ends it first
        seed = settings["seed"] if settings["seed"] is None or choice == 0 else [settings["seed"], choice]
        self.request = Request(list(ids), max_tokens,
                               make_sampler(**settings["sampling"], seed=seed, constraint=constraint),
                               lambda kind, payload: loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload)),
                               frozenset() if settings["ignore_eos"] else frozenset(stop_ids), logprobs, echo,
                               speculative.Prediction(prediction) if prediction else None, images=tuple(images))
        server.engine.submit(self.request)  # Busy or ValueError go to the handler

    async def events(self, tokenizer, stops):
        """("prompt", entries), ("text", text, tokens), and last ("done", finish_reason): the text cut
        at the first stop string, held back while it could still become one."""
        decoder, cut, pending = StreamDecoder(tokenizer), StopText(stops), []
        try:
            while True:
                kind, payload = await self.queue.get()
                if kind == "prompt":
                    yield "prompt", payload
                elif kind == "token":
                    pending.append(payload)
                    text, stopped = cut.add(decoder.add(payload.id))
                    if stopped:  # the tokens held with the stop string are not reported
                        self.request.cancel()
                        yield "text", text, []
                        yield "done", "stop"
                        return
                    if text or not cut.held:
                        yield "text", text, pending
                        pending = []
                else:
                    if payload.startswith("error"):
                        raise EngineError(payload)
                    yield "text", cut.flush() + decoder.flush(), pending
                    yield "done", "length" if payload == "length" else "stop"
                    return
        finally:
            self.request.cancel()  # a client gone mid-stream frees the slot at the next step


def submitted(make_job, asked: list) -> list[Job]:
    """A job per (ids, choice) (make_job(i, ids, choice), i its place in asked), all or none: on Busy the ones queued already would run for nobody."""
    jobs = []
    try:
        for i, (ids, choice) in enumerate(asked):
            jobs.append(make_job(i, ids, choice))
    except Busy:
        for job in jobs:
            job.request.cancel()
        raise
    return jobs


def make_app(server: Server) -> Starlette:
    async def body_of(request: HTTPRequest) -> dict:
        try:
            body = json.loads(await read_body(request, server.body_timeout))
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise BadRequest("the body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def guarded(handler, needs_model=True, public=False):
        """public: answered without the API key (/health, the chat page's static files)."""
        async def run(request: HTTPRequest):
            if server.api_key is not None and not public:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                    return _error(401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error")
            if needs_model and not server.ready.is_set():
                message = f"the model failed to load: {server.failed}" if server.failed else "the model is loading"
                return _error(503, message, "server_error", headers={"Retry-After": "5"})
            try:
                return await handler(request)
            except BadRequest as e:
                return _error(400, str(e), param=e.param)
            except BodyTooLarge as e:
                return _error(413, str(e))
            except BodyTimeout as e:
                return _error(408, str(e), headers={"Connection": "close"})
            except ClientDisconnect:
                return _error(400, "the client closed the connection before sending its whole body")
            except EngineError as e:
                return _error(500, str(e), "server_error")
            except Busy as e:
                return _error(503, f"the server is busy ({e}): try again shortly", "server_error",
                              headers={"Retry-After": "1"})
            except Exception as e:  # noqa: BLE001: a bug of ours: the log gets the traceback, the client one line
                traceback.print_exc(file=sys.stderr)
                return _error(500, f"internal error ({type(e).__name__}): the server's log has the details",
                              "server_error")
        return run

    def check_fits(texts: list[str], field: str):
        protocol.check_fits(texts, field, server.model.context, server.longest_token)

    def check_prompt(ids: list[int], field: str = "prompt", images: int = 0) -> list[int]:
        """Token ids the model takes, with an <|image|> token for each of the images (a Vision model)."""
        try:
            ids = server.model.check_ids(ids).tolist()
        except (ValueError, TypeError) as e:
            raise BadRequest(str(e), field) from None
        image_token = getattr(server.model, "image_token_id", None)
        if image_token is not None and ids.count(image_token) != images:
            if not images:
                raise BadRequest(f"the {field} holds the <|image|> token (id {image_token}) but no image: images go "
                                 f"in chat messages, as image_url parts", field)
            raise BadRequest(f"the chat template wrote {ids.count(image_token)} <|image|> token(s) for {images} "
                             f"image(s): this checkpoint's template does not place images", field)
        return ids

    def pictures(blobs: list[bytes]) -> list:
        """Image files' bytes as the encoder's input (on a thread: decoding, resizing, hashing)."""
        if getattr(server.model, "image_token_id", None) is None:
            raise BadRequest(f"{server.name} takes no images (it is not a Llama 3.2 Vision model): send text only",
                             "messages")
        try:
            out = [server.model.pixels(image_from_bytes(b, f"image {k + 1}")) for k, b in enumerate(blobs)]
        except ImageError as e:
            raise BadRequest(str(e), "messages") from None
        for px in out:
            px.digest  # noqa: B018: hashed here, not on the engine's thread
        return out

    def settings(body: dict, fields: set) -> dict:
        """The request's settings, checked (on a thread: a schema or grammar compiles here)."""
        protocol.refuse_unknown(body, fields)
        s = protocol.common(body)
        s["sampling"] = protocol.sampling(body, server.defaults["sampling"], server.model.n_token_ids)
        return s

    async def constraints(s: dict, count: int) -> list:
        """A constraint per choice when the request gives the reply a shape, else Nones (on a
        thread: a vocabulary's first grammar takes a few tenths of a second to prepare)."""
        if s["grammar"] is None:
            return [None] * count
        stop_ids = frozenset() if s["ignore_eos"] else server.defaults["stop_ids"]
        try:
            return await asyncio.to_thread(lambda: [s["grammar"].start(server.model.tokenizer, stop_ids)
                                                    for _ in range(count)])
        except GrammarError as e:
            raise BadRequest(str(e), "ignore_eos" if s["ignore_eos"] else None) from None

    async def collected(job: Job, chunks, request: HTTPRequest) -> list[dict]:
        """A reply's chunks, gathered for a non-streaming answer; a client gone away cancels it."""
        async def watch():
            while not await request.is_disconnected():
                await asyncio.sleep(0.5)
            job.request.cancel()
        watcher = asyncio.create_task(watch())
        try:
            return [chunk async for chunk in chunks]
        finally:
            watcher.cancel()

    # ---- /v1/completions ------------------------------------------------------------------------
    async def completions(request: HTTPRequest):
        body = await body_of(request)
        s, tok = await asyncio.to_thread(settings, body, protocol.COMPLETION_FIELDS), server.model.tokenizer
        k, echo = protocol.logprobs_wanted(body, chat=False), protocol.flag(body, "echo")
        # tokenized on a thread, off the event loop
        prompts = await asyncio.to_thread(protocol.completion_prompts, body, tok, server.model.context,
                                          server.longest_token)
        prompts = [check_prompt(p) for p in prompts]
        if len(prompts) * s["n"] > server.queue:  # they would never all fit in the queue: 503 forever
            raise BadRequest(f"{len(prompts)} prompts x n = {s['n']} choices in one request, but the queue holds "
                             f"{server.queue}: send at most {server.queue} (the server's --queue)", "prompt")
        stop_ids = server.defaults["stop_ids"]
        head = {"id": protocol.new_id("cmpl"), "object": "text_completion", "created": protocol.now(),
                "model": server.name}
        # choice index: prompt * n + choice, as OpenAI numbers them
        asked = [(ids, choice) for ids in prompts for choice in range(s["n"])]
        shapes = await constraints(s, len(asked))
        jobs = submitted(lambda i, ids, choice: Job(server, ids, s, stop_ids, k, echo, choice, shapes[i]), asked)
        if s["stream"]:
            return event_stream(interleaved(jobs, [_completion_chunks(job, tok, s, head, ids, k)
                                                   for job, (ids, _) in zip(jobs, asked)], sum(map(len, prompts))))
        whole = {**s, "include_usage": False}
        replies = await asyncio.gather(*(collected(job, _completion_chunks(job, tok, whole, head, ids, k), request)
                                         for job, (ids, _) in zip(jobs, asked)))
        choices = [{**_merged_completion(chunks, k), "index": i} for i, chunks in enumerate(replies)]
        generated = sum(j.request.generated for j in jobs)
        return JSONResponse({**head, "choices": choices,
                             "usage": protocol.usage(sum(map(len, prompts)), generated,
                                                     [j.request for j in jobs])})

    # ---- /v1/chat/completions -------------------------------------------------------------------
    async def chat(request: HTTPRequest):
        body = await body_of(request)
        s, tok = await asyncio.to_thread(settings, body, protocol.CHAT_FIELDS), server.model.tokenizer
        k = protocol.logprobs_wanted(body, chat=True)
        messages, blobs = protocol.chat_messages(body)
        images = await asyncio.to_thread(pictures, blobs) if blobs else []
        tools = protocol.chat_tools(body, messages, tok)
        messages = tools.messages(messages) if tools else messages
        if tools and tools.schema() is not None:
            if s["grammar"] is not None:
                raise BadRequest("give tools or a reply's shape (response_format, json_schema, grammar), not both "
                                 "(tool_choice none leaves the tools out)", "tools")
            try:
                s["grammar"] = await asyncio.to_thread(Grammar.json_schema, tools.schema())
            except GrammarError as e:
                raise BadRequest(f"the tools' parameters: {e}", "tools") from None
        check_fits(protocol.message_texts(messages, tools), "messages")
        try:  # on a thread: the template renders in a child process, bounded in time and memory
            ids = await asyncio.to_thread(chat_tokens, tok, messages, server.render,
                                          tools.template_tools() if tools else None)
        except ValueError as e:  # the template refused or failed, or a message forges a control token
            raise BadRequest(f"the chat template could not render these messages: {e}", "messages") from None
        ids = check_prompt(ids, "messages", len(images))
        head = {"id": protocol.new_id("chatcmpl"), "created": protocol.now(), "model": server.name}
        if s["n"] > server.queue:
            raise BadRequest(f"n = {s['n']} choices, but the queue holds {server.queue} (the server's --queue)", "n")
        shapes = await constraints(s, s["n"])
        prediction = await asyncio.to_thread(protocol.prediction, body, tok, server.model.context,
                                             server.longest_token)
        jobs = submitted(lambda i, ids, choice: Job(server, ids, s, server.defaults["stop_ids"], k, choice=choice,
                                                    constraint=shapes[i], prediction=prediction, images=images),
                         [(ids, choice) for choice in range(s["n"])])
        if s["stream"]:
            return event_stream(interleaved(jobs, [_chat_chunks(job, tok, s, head, len(ids), k, tools)
                                                   for job in jobs], len(ids)))
        whole = {**s, "include_usage": False}
        replies = await asyncio.gather(*(collected(job, _chat_chunks(job, tok, whole, head, len(ids), k, tools),
                                                   request) for job in jobs))
        choices = []
        for i, chunks in enumerate(replies):
            deltas = [c["choices"][0]["delta"] for c in chunks]
            entries = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
            calls = [call for d in deltas for call in d.get("tool_calls", [])]
            message = {"role": "assistant", "content": "".join(d.get("content", "") for d in deltas) or
                       (None if calls else "")}
            if calls:
                message["tool_calls"] = [{key: c[key] for key in ("id", "type", "function")} for c in calls]
            choices.append({"index": i, "message": message,
                            "logprobs": {"content": entries} if k is not None else None,
                            "finish_reason": chunks[-1]["choices"][0]["finish_reason"]})
        return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                             "usage": protocol.usage(len(ids), sum(j.request.generated for j in jobs),
                                                     [j.request for j in jobs])})

    # ---- the rest -------------------------------------------------------------------------------
    def model_entry() -> dict:
        return {"id": server.name, "object": "model", "created": 0, "owned_by": "tinytensor",
                "meta": {"context": server.model.context}}

    async def models(request: HTTPRequest):
        return JSONResponse({"object": "list", "data": [model_entry()]})

    async def model(request: HTTPRequest):  # what client.models.retrieve(id) reads
        name = request.path_params["model"]
        if name != server.name:
            return _error(404, f"no model {name!r} here: this server serves {server.name!r}", param="model")
        return JSONResponse(model_entry())

    async def metrics_text(request: HTTPRequest):
        return PlainTextResponse(metrics.exposition(server.requests, server.engine, server.name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def health(request: HTTPRequest):
        if server.failed:
            return JSONResponse({"status": "error", "error": server.failed}, status_code=503)
        if not server.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        busy = server.engine.busy_slots()
        return JSONResponse({"status": "ok", "slots_idle": len(server.engine.slots) - busy,
                             "slots_processing": busy, "waiting": len(server.engine.waiting)})

    async def embeddings(request: HTTPRequest):
        body = await body_of(request)
        protocol.refuse_unknown(body, protocol.EMBEDDING_FIELDS)
        model = server.model
        fmt = protocol.embedding_format(body, model.config.dim)
        inputs = [check_prompt(ids, "input") for ids in await asyncio.to_thread(
            protocol.token_lists, body.get("input"), "input", model.tokenizer, model.context, server.longest_token,
            protocol.MAX_INPUTS)]
        vectors = await asyncio.wrap_future(server.engine.call(
            lambda: [pool(model.hidden_states(ids), server.pooling, server.normalize) for ids in inputs]))
        return JSONResponse(protocol.embeddings_response(vectors, fmt, server.name, sum(map(len, inputs))))

    async def page_file(request: HTTPRequest):
        """The chat page (tools/server/page/): its three files, by name only. The page calls this
        server's API and nothing else (its Content-Security-Policy says so)."""
        name = request.path_params.get("name", "index.html")
        if name not in PAGE_FILES:
            return _error(404, f"GET {request.url.path}: Not Found")
        return Response((PAGE / name).read_bytes(), media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    async def tokenize(request: HTTPRequest):  # vLLM's and llama-server's field names both
        body = await body_of(request)
        text = body.get("prompt", body.get("content"))
        if not isinstance(text, str):
            raise BadRequest("give the text as prompt (or content)", "prompt")
        special = body.get("add_special_tokens", body.get("add_special", True))
        if not isinstance(special, bool):
            raise BadRequest("add_special_tokens must be true or false", "add_special_tokens")
        check_fits([text], "prompt")
        tok = server.model.tokenizer
        ids = await asyncio.to_thread(tok.encode, text, bos=special and bool(getattr(tok, "add_bos", True)),
                                      allow_special=True)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": server.model.context})

    async def detokenize(request: HTTPRequest):
        body = await body_of(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(protocol.is_id(i) and 0 <= i < server.model.n_token_ids
                                                for i in ids):
            raise BadRequest(f"tokens must be a list of token ids in [0, {server.model.n_token_ids})", "tokens")
        text = server.model.tokenizer.decode(ids)
        return JSONResponse({"prompt": text, "content": text})

    async def tokenizer_info(request: HTTPRequest):  # what lm-eval's remote tokenizer reads
        tok = server.model.tokenizer
        name = lambda i: tok.decode([i]) if i is not None else None  # noqa: E731
        return JSONResponse({"bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "pad_token": None,
                             "chat_template": tok.chat_template, "add_bos_token": bool(getattr(tok, "add_bos", True)),
                             "model_max_length": server.model.context})

    routes = [Route("/v1/completions", guarded(completions), methods=["POST"]),
              Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
              Route("/v1/embeddings", guarded(embeddings), methods=["POST"]),
              Route("/v1/models", guarded(models), methods=["GET"]),
              Route("/v1/models/{model:path}", guarded(model), methods=["GET"]),
              Route("/metrics", guarded(metrics_text), methods=["GET"]),
              Route("/health", guarded(health, needs_model=False, public=True), methods=["GET"]),
              Route("/", guarded(page_file, needs_model=False, public=True), methods=["GET"]),
              Route("/page/{name}", guarded(page_file, needs_model=False, public=True), methods=["GET"]),
              Route("/tokenize", guarded(tokenize), methods=["POST"]),
              Route("/detokenize", guarded(detokenize), methods=["POST"]),
              Route("/tokenizer_info", guarded(tokenizer_info), methods=["GET"])]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.thread.start()
        yield
        server.stop()

    async def http_error(request: HTTPRequest, e: HTTPException):  # 404, 405: OpenAI's error object too
        return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}", headers=e.headers)
    middleware = [Middleware(Accounted, server=server)]
    if server.cors:
        middleware.append(Middleware(CORSMiddleware, allow_origins=[server.cors], allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error},
                     middleware=middleware)


class Accounted:
    """Every HTTP request, whatever answers it (a handler, a 404, a CORS preflight): counted for
    /metrics by path and status, and one access-log line on stderr when the end of its response
    has gone out."""
    KNOWN = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/tokenize", "/detokenize",
             "/tokenizer_info", "/metrics", "/", "/v1/embeddings"}

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sent)
        finally:
            seconds, path = time.perf_counter() - start, scope["path"]
            # other paths count together: a scanner's names are no labels
            label = path if path in self.KNOWN else "/v1/models/{id}" if path.startswith("/v1/models/") \
                else "/page/{name}" if path.startswith("/page/") else "other"
            self.server.requests.add(label, status[0], seconds)
            if self.server.access_log:
                client = scope["client"][0] if scope.get("client") else "-"
                print(f"[tools.server] {client} {scope['method']} {path} {status[0]} {seconds * 1000:.0f} ms",
                      file=sys.stderr, flush=True)


def event_stream(chunks) -> StreamingResponse:
    """Chunks as server-sent events, ending with [DONE]. The status went out with the first
    event, so a failure after it is told in the stream: an error event (what the openai client
    raises as an APIError), and no [DONE]."""
    def error_event(message: str) -> str:
        return f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"

    async def stream():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except EngineError as e:
            yield error_event(str(e))
            return
        except Exception as e:  # noqa: BLE001: a bug of ours: the log gets the traceback, the stream one line
            traceback.print_exc(file=sys.stderr)
            yield error_event(f"internal error ({type(e).__name__})")
            return
        yield "data: [DONE]\n\n"
    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def interleaved(jobs: list, streams: list, prompt_tokens: int):
    """The chunks of several choices' streams (n > 1, or several prompts), each as it comes,
    choice i's numbered i; their usage chunks (include_usage) become one, last: the request's
    prompt tokens (each prompt once) and every choice's completion tokens. A failure in one
    ends them all, as does the client going away: every choice's request is cancelled."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield chunk
        return
    queue, usages = asyncio.Queue(), []

    async def pump(i, stream):
        try:
            async for chunk in stream:
                await queue.put((i, chunk, None))
        except Exception as e:  # noqa: BLE001: handed to the consumer, which raises it
            await queue.put((i, None, e))
        await queue.put((i, None, None))
    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                left -= 1
            elif "usage" in chunk and not chunk["choices"]:
                usages.append(chunk)
            else:
                yield {**chunk, "choices": [{**c, "index": i} for c in chunk["choices"]]}
        if usages:
            generated = sum(u["usage"]["completion_tokens"] for u in usages)
            yield {**usages[0], "usage": protocol.usage(prompt_tokens, generated, [j.request for j in jobs])}
    finally:
        for job in jobs:
            job.request.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _merged_completion(chunks: list[dict], k) -> dict:
    """One choice of a whole completion from the chunks a stream of it sends."""
    parts = [c["choices"][0] for c in chunks]
    logprobs = None
    if k is not None:
        logprobs = {name: [v for p in parts if p["logprobs"] for v in p["logprobs"][name]]
                    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    return {"text": "".join(p["text"] for p in parts), "logprobs": logprobs, "finish_reason": parts[-1]["finish_reason"]}


async def _completion_chunks(job, tok, s, head, ids, k):
    """The chunks of a completion: the echoed prompt (when asked), the text, the finish."""
    def chunk(text, logprobs=None, reason=None):
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
    echoed, offset = 0, 0  # prompt tokens sent; characters sent (text_offset runs on across chunks)
    prompt_text = StreamDecoder(tok)  # a character split between two prefill chunks stays whole

    def logprobs_of(entries):
        nonlocal offset
        if k is None:
            return None
        lp = protocol.CompletionLogprobs(tok, offset)
        for token_id, p, top in entries:
            lp.add(token_id, p, top)
        offset = lp.offset
        return lp.value
    async for event in job.events(tok, s["stop"]):
        if event[0] == "prompt":
            part = ids[echoed:echoed + len(event[1])]
            echoed += len(part)
            text = "".join(prompt_text.add(i) for i in part) + (prompt_text.flush() if echoed == len(ids) else "")
            yield chunk(text, logprobs_of([(i, p, top) for i, (p, top) in zip(part, event[1])]))
        elif event[0] == "text" and (event[1] or event[2]):
            yield chunk(event[1], logprobs_of([(t.id, t.logprob, t.top) for t in event[2]]))
        elif event[0] == "done":
            yield chunk("", None, event[1])
    if s["include_usage"]:
        yield {**head, "choices": [], "usage": protocol.usage(len(ids), job.request.generated, [job.request])}


async def _chat_chunks(job, tok, s, head, n_prompt, k, tools=None):
    """The chunks of a chat reply: the role, the text, the finish. With tools, text that may
    still become a call is held back; at the end a call is sent as tool_calls deltas (finish
    "tool_calls"), anything else as content."""
    def chunk(delta, logprobs=None, reason=None):
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
    yield chunk({"role": "assistant", "content": ""})
    holding, held, held_entries = tools is not None, "", []
    async for event in job.events(tok, s["stop"]):
        if event[0] == "text" and (event[1] or event[2]):
            entries = [protocol.chat_logprob(tok, t) for t in event[2]] if k is not None else None
            if holding:
                held, held_entries = held + event[1], held_entries + (entries or [])
                if tools.may_be_call(held):
                    continue
                holding, event, entries = False, ("text", held), held_entries
            yield chunk({"content": event[1]}, {"content": entries} if k is not None else None)
        elif event[0] == "done":
            reason, logprobs = event[1], {"content": held_entries} if k is not None else None
            if holding:
                content, calls = tools.read(held)
                if calls:
                    yield chunk({"tool_calls": [{"index": i, "id": protocol.new_id("call"), "type": "function",
                                                 "function": call} for i, call in enumerate(calls)]}, logprobs)
                    reason = "tool_calls"
                elif content:
                    yield chunk({"content": content}, logprobs)
            yield chunk({}, None, reason)
    if s["include_usage"]:
        yield {**head, "object": "chat.completion.chunk", "choices": [],
               "usage": protocol.usage(n_prompt, job.request.generated, [job.request])}
