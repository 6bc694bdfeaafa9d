"""python -m tools.server, driven over loopback by the real `openai` client (a test dependency)
and by plain HTTP where the client would hide what is checked (errors, disconnects).

The server runs SmolLM2-135M-Instruct as stored (Q4_1). A token's logits are the same bits in
any pass (alone, after a cached prefix, beside other requests: tests/models/test_batched_logits.py),
so the server's answers and log-probabilities are compared with the model's in this process
exactly.
"""
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install -e '.[test]'")

from models.generation.scoring import log_softmax  # noqa: E402
from models.llama3 import load  # noqa: E402
from tests.functions import CLOCK, WEATHER  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.oracle]

PARALLEL, CONTEXT = 8, 512
QUESTION = "What is the capital of France? Answer in one sentence."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the log in a file, not a pipe: a line per request would fill a pipe nobody reads and stall it
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([sys.executable, "-m", "tools.server", "--port", str(self.port), *args],
                                        stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.process.poll() is None, self.logged()
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not come up")

    def call(self, method, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}

    def open(self, path, body, headers=None):
        """A POST whose response is read as it comes (a stream); close it to go away."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        return urllib.request.urlopen(request, timeout=120)

    def call_text(self, path, headers=None) -> str:
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers or {}), timeout=60) as r:
            return r.read().decode()

    def logged(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def get(self, path, headers=None):
        return self.call("GET", path, headers=headers)[:2]

    def post(self, path, body=None, raw=None, headers=None):
        return self.call("POST", path, body, headers, raw)[:2]

    def rss(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def server(smollm2_path):
    running = Running("--checkpoint", str(smollm2_path), "--parallel", str(PARALLEL),
                      "--context", str(CONTEXT))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(smollm2_path):
    return load(smollm2_path, context=CONTEXT)


def chat(client, content=QUESTION, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kw)


def streamed_chat(client, content=QUESTION, **kw):
    chunks = list(chat(client, content, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


# ---- the answers ---------------------------------------------------------------------------------

def test_greedy_chat_is_the_command_lines_answer(server, client, smollm2_path):
    cli = subprocess.run([sys.executable, "-m", "models.llama3", "--checkpoint", str(smollm2_path),
                          "--prompt", QUESTION, "--temperature", "0", "--max-tokens", "24"],
                         capture_output=True, text=True, check=True)
    reply = chat(client, temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == cli.stdout[:-1]  # the CLI ends with a newline
    assert reply.usage.completion_tokens <= 24 and reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    text, reason = streamed_chat(client, temperature=0, max_tokens=24)
    assert text == reply.choices[0].message.content and reason == reply.choices[0].finish_reason


def test_a_greedy_request_answers_the_same_alone_cached_or_among_others(client):
    """The first time its prompt is prefilled whole; then its prefix is cached; then it comes
    with 7 other requests at once, batched in the same decode steps (8 slots)."""
    prompt = "Penguins live in"
    ask = lambda p=prompt: client.completions.create(model="m", prompt=p, max_tokens=16,  # noqa: E731
                                                     temperature=0).choices[0].text
    first, cached = ask(), ask()
    others = ["Once upon a time", "1, 2, 3,", "The capital of France is", "def f(x):", "Hello, my name is",
              "Water boils at"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, [prompt, *others, prompt]))
    assert first == cached == together[0] == together[-1]
    assert together[1:-1] == [ask(p) for p in others]


def test_completions_stream_and_not(client):
    whole = client.completions.create(model="m", prompt="The capital of France is", max_tokens=10, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 10
    parts = list(client.completions.create(model="m", prompt="The capital of France is", max_tokens=10,
                                           temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].usage.completion_tokens == 10
    texts = [p for p in parts if p.choices]
    assert texts[-1].choices[0].finish_reason == "length"
    assert all(p.choices[0].finish_reason is None for p in texts[:-1])  # one finish, at the end


def test_stop_strings_cut_the_text_streamed_or_not(client):
    free = client.completions.create(model="m", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0).choices[0].text
    stop = free[4:7]  # a piece from inside the greedy text, whatever its tokens
    cut = client.completions.create(model="m", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"
    parts = list(client.completions.create(model="m", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                           stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in parts) == cut.choices[0].text
    assert parts[-1].choices[0].finish_reason == "stop"


def test_a_seed_gives_the_same_text(client):
    texts = [chat(client, "Tell me a story.", temperature=1.0, seed=s, max_tokens=20).choices[0].message.content
             for s in (3, 3, 4, 5)]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1  # the draws do depend on the seed


def test_chat_logprobs_are_the_models(client, model):
    from models.text.chat import chat_tokens
    reply = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 6
    ids = chat_tokens(model.tokenizer, [{"role": "user", "content": QUESTION}])
    generated = list(model.generate(ids, 6, lambda logits, _: int(np.argmax(logits))))
    logp = log_softmax(model.logits(ids + generated[:-1]))[len(ids) - 1:]
    for entry, token, row in zip(entries, generated, logp):
        assert bytes(entry.bytes) == model.tokenizer.token_bytes(token)
        assert entry.logprob == row[token]
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [model.tokenizer.token_bytes(int(i))
                                                                for i in np.argsort(-row)[:3]]
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the likeliest


def test_echo_gives_the_prompts_log_probabilities(client, model):
    prompt = "The capital of France is Paris. The capital of Italy is Rome."
    reply = client.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2)
    lp = reply.choices[0].logprobs
    ids = model.tokenizer.encode(prompt)
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = log_softmax(model.logits(ids))[np.arange(len(ids) - 1), ids[1:]]
    assert lp.token_logprobs[1:len(ids)] == list(want)
    assert reply.choices[0].text.startswith(prompt)
    assert lp.text_offset == sorted(lp.text_offset) and all(len(top) == 2 for top in lp.top_logprobs[1:])
    # token ids in, as lm-eval sends them: the same numbers
    by_ids = client.completions.create(model="m", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
    assert by_ids.choices[0].logprobs.token_logprobs == lp.token_logprobs


def test_several_prompts_are_several_choices(client):
    reply = client.completions.create(model="m", prompt=["Hello", "1, 2,"], max_tokens=3, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1] and reply.usage.completion_tokens == 6
    alone = client.completions.create(model="m", prompt="1, 2,", max_tokens=3, temperature=0)
    assert reply.choices[1].text == alone.choices[0].text


def test_embeddings_are_the_models_hidden_states_pooled(client, model):
    """/v1/embeddings: the mean of an input's final hidden states, scaled to unit length, as the
    model in this process gives them (the same bits: its features do not depend on the batch);
    text or token ids in, float32 as base64 (the openai client's default) or as floats."""
    from models.generation.pooling import pool
    texts = ["The capital of France is Paris.", "Penguins live in Antarctica.", "def f(x):\n    return x"]
    tok = model.tokenizer
    ids = [tok.encode(t, bos=bool(getattr(tok, "add_bos", True))) for t in texts]
    reply = client.embeddings.create(model="m", input=texts)
    assert [d.index for d in reply.data] == [0, 1, 2] and reply.usage.prompt_tokens == sum(map(len, ids))
    for got, want in zip(reply.data, ids):
        want = pool(model.hidden_states(want))
        assert len(got.embedding) == model.config.dim == len(want)
        np.testing.assert_allclose(got.embedding, want, rtol=0, atol=1e-5)
        assert abs(np.linalg.norm(got.embedding) - 1) < 1e-5
    floats = client.embeddings.create(model="m", input=[ids[1], texts[0]], encoding_format="float")
    assert floats.data[0].embedding == reply.data[1].embedding and floats.data[1].embedding == reply.data[0].embedding
    near, far = (float(np.dot(reply.data[0].embedding, e.embedding)) for e in
                 client.embeddings.create(model="m", input=["Paris is the capital of France.", "x = [1, 2, 3]"]).data)
    assert near > far  # a paraphrase is closer than code


def test_models_health_and_tokens(server):
    status, models = server.get("/v1/models")
    assert status == 200 and models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    status, health = server.get("/health")
    assert status == 200 and health["status"] == "ok" and health["slots_idle"] + health["slots_processing"] == PARALLEL
    status, tokens = server.post("/tokenize", {"prompt": "Hello world", "add_special_tokens": False})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) >= 2
    status, text = server.post("/detokenize", {"tokens": tokens["tokens"]})
    assert status == 200 and text["prompt"] == "Hello world"
    status, info = server.get("/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|im_end|>" and "im_start" in info["chat_template"]


# ---- bad requests: a 400 with OpenAI's error object, and the server goes on -------------------------

@pytest.mark.parametrize("path, body, says", [
    ("/v1/chat/completions", b"{not json", "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", "JSON object"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 17}, "n is 17"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [  # a 1x1 PNG
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1Pe"
                                                   "AAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"}}]}]},
     "takes no images"),
    ("/v1/completions", {"prompt": "word " * 600}, "context holds 512"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "hi", "stop": 7}, "stop"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {}, "prompt"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    # what an application sends and this server does not implement is refused, never dropped
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": []}, "list of 1 to 128"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
     "tool_choice needs tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}],
        "tool_choice": "required"}, "Invalid type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}},
     "give tools or a reply's shape"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "xml"}}, "response_format type 'xml'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}}, "Invalid type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "grammar": 'root ::= "a"',
                              "response_format": {"type": "json_object"}}, "give one of response_format and grammar"),
    ("/v1/completions", {"prompt": "hi", "grammar": "root ::= nothing"}, "'nothing' not found"),
    ("/v1/completions", {"prompt": "hi", "grammar": 'root ::= "a"', "ignore_eos": True}, "leave out ignore_eos"),
    ("/v1/completions", {"prompt": "hi", "json_schema": "{"}, "not valid JSON"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prediction": "text"}, "prediction must be"),
    ("/v1/completions", {"prompt": "hi", "prediction": {"type": "content", "content": "x"}},
     "prediction is not supported"),
    ("/v1/completions", {"prompt": "hi", "json_schema": {"type": "object", "properties": {
        f"p{i}": {"type": "string"} for i in range(5000)}}}, "compiles at most 65536"),
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix is not supported"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of must be 1"),
    ("/v1/completions", {"prompt": "hi", "messages": []}, "messages is not supported"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"50000000": 1}}, "logit_bias key"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": -101}}, "[-100, 100]"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": "x"}, "frequency_penalty"),
    ("/v1/embeddings", {"input": []}, "input must be"),
    ("/v1/embeddings", {"input": "hi", "dimensions": 64}, "dimensions is 64"),
    ("/v1/embeddings", {"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "hi", "pooling": "max"}, "pooling is not supported"),
    ("/v1/embeddings", {"input": ["hi"] * 257}, "at most 256"),
    ("/v1/embeddings", {"input": "word " * 600}, "context holds 512"),
])
def test_bad_requests_are_400s(server, path, body, says):
    status, answer = server.post(path, raw=body) if isinstance(body, bytes) else server.post(path, body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert says in answer["error"]["message"]
    assert server.get("/health")[0] == 200


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_gone_mid_stream_frees_its_slot(server, n):
    """One choice, or three streamed together: their slots are free again soon after."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "n": n,
                                                        "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    assert server.get("/health")[1]["slots_processing"] == n
    conn.close()
    assert wait_for_idle(server)


def wait_for_idle(server, seconds=30) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        health = server.get("/health")[1]
        if health["slots_processing"] == 0 and health["waiting"] == 0:
            return True
        time.sleep(0.1)
    return False


# ---- load: bounded, loopback only, ends by itself ---------------------------------------------

def test_load_concurrent_streams_disconnects_then_many_short_requests(server):
    """32 streaming clients at once, a quarter of them going away mid-stream, then 200 short
    requests one after another: no server error, every finished stream well-formed, the slots all
    free at the end and the server's memory steady."""
    import http.client
    outcomes, lock = [], threading.Lock()

    def one(i):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        body = {"messages": [{"role": "user", "content": f"Count to {i + 3}."}], "max_tokens": 12 + i % 5,
                "stream": True, "temperature": 0.7, "seed": i}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        events, leave = [], i % 4 == 0
        if response.status == 200:
            for line in response:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip())
                    if leave and len(events) == 3:
                        break
        conn.close()
        with lock:
            outcomes.append((response.status, leave, events))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(outcomes) == 32 and all(status == 200 for status, _, _ in outcomes)
    for _, left, events in outcomes:
        if left:
            continue
        assert events[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert wait_for_idle(server)

    rss = []
    for i in range(200):
        status, reply = server.post("/v1/completions", {"prompt": f"Number {i}:", "max_tokens": 2})
        assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")
        if i in (50, 199):
            rss.append(server.rss())
    assert rss[1] < rss[0] * 1.05 + (8 << 20), f"RSS grew from {rss[0] >> 20} to {rss[1] >> 20} MiB"
    assert wait_for_idle(server)


# ---- the lm-eval client ----------------------------------------------------------------------

def test_lm_eval_local_completions_scores_as_our_adapter(server, model, tmp_path):
    """lm-eval's `local-completions` model (echo + logprobs, its remote tokenizer through
    /tokenize and /tokenizer_info) gets the log-likelihoods tools.lm_eval gets directly."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a test dependency")
    from tests.integration.test_eval import adapter_for, csqa_rows, write_parquet, CSQA_TRAIN, CSQA_VALIDATION
    from tools.bench_eval import lm_eval_task
    for split, items in (("train", CSQA_TRAIN), ("validation", CSQA_VALIDATION)):
        write_parquet(tmp_path / f"{split}-00000-of-00001.parquet", csqa_rows(items))
    files = {s: str(tmp_path / f"{s}-00000-of-00001.parquet") for s in ("train", "validation")}

    def run(lm):
        return lm_eval.simple_evaluate(model=lm, tasks=[lm_eval_task("commonsense_qa/default.yaml", files)],
                                       num_fewshot=2, log_samples=True, fewshot_random_seed=1234)
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    remote = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="SmolLM2", tokenizer_backend="remote",
                                 tokenized_requests=True, max_retries=1, num_concurrent=1)
    got, want = run(remote), run(adapter_for(model))
    got_ll = [r[0][0] for s in got["samples"]["commonsense_qa"] for r in s["resps"]]
    want_ll = [r[0][0] for s in want["samples"]["commonsense_qa"] for r in s["resps"]]
    assert len(got_ll) == len(want_ll) == 15
    np.testing.assert_allclose(got_ll, want_ll, atol=1e-3)  # as tests/integration/test_eval.py: sums of float32 log-softmaxes
    assert got["results"]["commonsense_qa"]["acc,none"] == want["results"]["commonsense_qa"]["acc,none"]


# ---- the command line and the guards ------------------------------------------------------------

@pytest.mark.parametrize("args, says", [(["--port", "70000"], "65535"), (["--parallel", "0"], "too small"),
                                        (["--checkpoint", "/nonexistent/model.gguf"], "nonexistent"),
                                        (["--lookup", "4", "--draft", "x.gguf"], "--lookup or --draft"),
                                        (["--draft", "/nonexistent/draft.gguf"], "nonexistent")])
def test_bad_options_are_one_line(args, says):
    port = [] if "--port" in args else ["--port", str(free_port())]
    done = subprocess.run([sys.executable, "-m", "tools.server", *port, *args], capture_output=True, text=True,
                          timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and says in lines[-1] and lines[-1].startswith("error:")
    assert "Traceback" not in done.stderr


def test_api_key_and_a_full_queue(smollm2_path):
    running = Running("--checkpoint", str(smollm2_path), "--parallel", "1", "--queue", "1", "--api-key", "s3cret")
    try:
        assert running.post("/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 401
        assert running.get("/health")[0] == 200  # health needs no key, nor does the chat page's text
        with urllib.request.urlopen(running.url + "/", timeout=60) as r:
            assert r.status == 200 and b"composer" in r.read()
        key = {"Authorization": "Bearer s3cret"}
        statuses = []

        def waiting() -> float:
            text = running.call_text("/metrics", key)
            return float(next(line.split()[-1] for line in text.splitlines()
                              if line.startswith("tinytensor_requests_waiting ")))

        # the one slot held by a stream until this test lets it go (not by a reply's length,
        # which a faster engine ends sooner)
        holding = running.open("/v1/completions", {"prompt": "Once", "max_tokens": 4000, "ignore_eos": True,
                                                   "stream": True}, key)
        holding.readline()  # its first chunk: it runs
        queued = threading.Thread(target=lambda: statuses.append(
            running.call("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 2}, key)))
        queued.start()
        deadline = time.time() + 60
        while waiting() < 1 and time.time() < deadline:
            time.sleep(0.05)
        statuses.append(running.call("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 2}, key))
        holding.close()  # the client goes: the server cancels the stream and frees the slot
        queued.join(timeout=120)
        codes = sorted(s for s, _, _ in statuses)
        assert codes == [200, 503], codes
        busy = next((body, headers) for s, body, headers in statuses if s == 503)
        assert busy[1].get("retry-after") == "1" and "busy" in busy[0]["error"]["message"]
    finally:
        running.stop()


# ---- the sampling fields applications send ---------------------------------------------------------

def test_logit_bias_bans_and_forces_tokens(client, model):
    """-100 removes the greedy answer's first token; +100 makes another token the answer."""
    def first(**kw):
        return client.completions.create(model="m", prompt="The capital of France is", max_tokens=1, temperature=0,
                                         **kw).choices[0].text
    answer = first()
    (token,) = model.tokenizer.encode(answer, bos=False)
    assert first(logit_bias={str(token): -100}) != answer
    (forced,) = model.tokenizer.encode(" London", bos=False)
    assert first(logit_bias={str(forced): 100}) == " London"
    assert chat(client, max_tokens=4, temperature=0, logit_bias={str(forced): 100}).choices[0].message.content \
        == " London" * 4


def test_penalties_are_the_samplers(client, model):
    """The server's presence and frequency penalties are the sampler's (whose unit tests measure
    them on logits): the same greedy tokens as the model in this process with make_sampler's;
    and they change the reply."""
    from models.generation.sampling import make_sampler
    prompt = "yes yes yes yes yes yes yes yes"
    ids = model.tokenizer.encode(prompt, bos=bool(getattr(model.tokenizer, "add_bos", True)))  # as the server does
    replies = []
    for penalties in ({}, {"presence_penalty": 1.5, "frequency_penalty": 0.5}, {"frequency_penalty": -2.0}):
        text = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0,
                                         **penalties).choices[0].text
        want = list(model.generate(ids, 12, make_sampler(temperature=0, **penalties), model.tokenizer.stop_ids))
        assert text == model.tokenizer.decode(want), penalties
        replies.append(text)
    assert len(set(replies)) == 3


def test_hints_are_accepted(client):
    """OpenAI's bookkeeping fields change no token: the same greedy reply with them."""
    plain = chat(client, max_tokens=6, temperature=0).choices[0].message.content
    hinted = chat(client, max_tokens=6, temperature=0, user="u1", metadata={"a": "b"}, store=False).choices[0]
    assert hinted.message.content == plain


def test_n_choices(client):
    """n > 1: n choices, indexed; with a seed the first is the n = 1 answer with that seed and the
    whole reply is the same again; greedy choices are all the greedy one; completions number
    prompt * n + choice."""
    one = chat(client, max_tokens=8, temperature=1.0, seed=11).choices[0].message.content
    three = chat(client, max_tokens=8, temperature=1.0, seed=11, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2] and three.choices[0].message.content == one
    again = chat(client, max_tokens=8, temperature=1.0, seed=11, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in three.choices]
    assert len({c.message.content for c in three.choices}) > 1  # three draws of 8 tokens at temperature 1
    greedy = chat(client, max_tokens=6, temperature=0, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    done = client.completions.create(model="m", prompt=["Once upon a", "The sky is"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert done.choices[0].text == done.choices[1].text and done.choices[2].text == done.choices[3].text
    assert done.usage.completion_tokens == 12


def test_n_choices_stream_interleaved(client):
    """Streamed, n choices arrive interleaved, each chunk indexed; each choice's text is the
    whole reply's choice of the same seed, with one finish each, and one usage chunk last."""
    whole = chat(client, max_tokens=8, temperature=1.0, seed=5, n=3)
    chunks = list(chat(client, max_tokens=8, temperature=1.0, seed=5, n=3, stream=True,
                       stream_options={"include_usage": True}))
    texts, finishes = ["", "", ""], [0, 0, 0]
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] += choice.finish_reason is not None
    assert texts == [c.message.content for c in whole.choices] and finishes == [1, 1, 1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    parts = list(client.completions.create(model="m", prompt=["Once upon a", "The sky is"], max_tokens=3,
                                           temperature=0, n=2, stream=True))
    got = ["", "", "", ""]
    for p in parts:
        got[p.choices[0].index] += p.choices[0].text
    done = client.completions.create(model="m", prompt=["Once upon a", "The sky is"], max_tokens=3, temperature=0, n=2)
    assert got == [c.text for c in done.choices]


# ---- structured output ------------------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                          "languages": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                        "maxItems": 3}},
          "required": ["name", "age", "languages"], "additionalProperties": False}
CITY = {"$defs": {"place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                             "country": {"enum": ["France", "Italy", "Spain", "other"]}},
                            "required": ["city", "country"], "additionalProperties": False}},
        "type": "object", "properties": {"capital": {"$ref": "#/$defs/place"}, "is_large": {"type": "boolean"},
                                         "population_millions": {"anyOf": [{"type": "number", "minimum": 0,
                                                                            "maximum": 100}, {"type": "null"}]}},
        "required": ["capital", "is_large", "population_millions"], "additionalProperties": False}


@pytest.mark.parametrize("schema, question", [
    (PERSON, "Describe a French programmer as JSON."),
    (CITY, "What is the capital of France? Answer in JSON."),
])
def test_json_schema_replies_validate(client, schema, question):
    """response_format json_schema, greedy and sampled, streamed and not: each reply parses and
    is valid for its schema (jsonschema the oracle); streamed and whole replies are the same."""
    jsonschema = pytest.importorskip("jsonschema", reason="the jsonschema oracle is a test dependency")
    shape = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        whole = chat(client, question, max_tokens=160, response_format=shape, **kw).choices[0]
        assert whole.finish_reason == "stop", whole.message.content
        jsonschema.validate(json.loads(whole.message.content), schema)
        text, finish = streamed_chat(client, question, max_tokens=160, response_format=shape, **kw)
        assert (text, finish) == (whole.message.content, "stop")


def test_json_object_and_grammar_replies(client):
    """json_object: any JSON object; llama-server's grammar (GBNF) and json_schema fields, on
    completions too."""
    reply = chat(client, "Reply in JSON with the keys name and age for a 30 year old named Bob.", max_tokens=100,
                 temperature=0, response_format={"type": "json_object"}).choices[0]
    assert reply.finish_reason == "stop" and isinstance(json.loads(reply.message.content), dict)
    yes_no = chat(client, "Is Paris in France?", max_tokens=8, temperature=0,
                  extra_body={"grammar": 'root ::= ("yes" | "no") "."'}).choices[0]
    assert yes_no.message.content in ("yes.", "no.") and yes_no.finish_reason == "stop"
    numbers = client.completions.create(model="m", prompt="Count: one, two,", max_tokens=40, temperature=1.0, seed=2,
                                        n=3, extra_body={"json_schema": {"type": "array", "items": {
                                            "type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4}})
    for c in numbers.choices:
        values = json.loads(c.text)
        assert isinstance(values, list) and len(values) <= 4 and all(0 <= v <= 9 for v in values)


# ---- predicted outputs -------------------------------------------------------------------------------

def test_a_prediction_drafts_the_reply_and_changes_no_token(client):
    """OpenAI's predicted output: drafts checked by speculative decoding (this request decodes
    alone), counted in usage; the reply is the one without a prediction, streamed or not, and a
    wrong prediction only costs rejected drafts."""
    ask = dict(max_tokens=40, temperature=0, messages=[{"role": "user", "content": "Count from 1 to 20, with commas."}])
    plain = client.chat.completions.create(model="m", **ask)
    text = plain.choices[0].message.content
    right = client.chat.completions.create(model="m", prediction={"type": "content", "content": text}, **ask)
    assert right.choices[0].message.content == text
    details = right.usage.completion_tokens_details  # how many are checked depends on this host's pass costs
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens <= 1
    wrong = client.chat.completions.create(model="m", prediction={"type": "content", "content": "Bananas. " * 9}, **ask)
    assert wrong.choices[0].message.content == text
    streamed = client.chat.completions.create(model="m", stream=True, **ask, prediction={
        "type": "content", "content": [{"type": "text", "text": text}]})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text
    assert plain.usage.completion_tokens_details is None  # nothing was drafted


def test_a_speculating_server_gives_the_same_replies(client, smollm2_path):
    """--draft (here SmolLM2 drafting for itself, re-quantised: it agrees) and --lookup: a request
    alone gets the module server's reply and usage counts the drafts; /metrics counts them too."""
    from prometheus_client.parser import text_string_to_metric_families
    want = chat(client, max_tokens=30, temperature=0).choices[0].message.content
    for flag in (["--lookup", "6"], ["--draft", str(smollm2_path), "--dtype", "q8_0"]):
        running = Running("--checkpoint", str(smollm2_path), "--parallel", "2", "--context", str(CONTEXT), *flag)
        try:
            there = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=120)
            got = chat(there, max_tokens=30, temperature=0)
            assert got.choices[0].message.content == want
            if flag[0] == "--draft":  # a draft as big as the model: tried, then left as its cost is learnt
                assert got.usage.completion_tokens_details.accepted_prediction_tokens > 0
            with urllib.request.urlopen(running.url + "/metrics", timeout=60) as r:
                families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
            drafted = {s.labels["kept"]: s.value for s in families["tinytensor_draft_tokens"].samples}
            details = got.usage.completion_tokens_details
            assert drafted == ({"yes": details.accepted_prediction_tokens, "no": details.rejected_prediction_tokens}
                               if details else {"yes": 0, "no": 0})
        finally:
            running.stop()


# ---- tool calls ------------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_tool_call_has_valid_arguments(client, choice):
    """required or a named function: the reply is a call (finish tool_calls) of an offered
    function (the named one) whose arguments are valid for its parameters; streamed, the same
    call arrives as tool_calls deltas."""
    jsonschema = pytest.importorskip("jsonschema", reason="the jsonschema oracle is a test dependency")
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    ask = dict(tools=[WEATHER, CLOCK], tool_choice=choice, parallel_tool_calls=False, max_tokens=80)
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}):
        whole = chat(client, "What's the weather in Paris?", **ask, **kw).choices[0]
        assert whole.finish_reason == "tool_calls" and whole.message.content is None
        (call,) = whole.message.tool_calls
        assert call.type == "function" and call.id and (call.function.name == "get_time" or choice == "required")
        jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])
        chunks = list(chat(client, "What's the weather in Paris?", stream=True, **ask, **kw))
        deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == \
            [(0, call.function.name, call.function.arguments)]


def test_a_tool_result_goes_back_and_none_leaves_tools_out(client):
    """The call and the tool's result in the conversation are accepted (the next reply is a
    call or text); tool_choice none answers in text, as without tools."""
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    ask = dict(model="m", tools=[WEATHER], parallel_tool_calls=False, max_tokens=40, temperature=0)
    call = client.chat.completions.create(messages=question, tool_choice="required", **ask).choices[0].message
    after = question + [call.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": '{"celsius": 21}'}]
    reply = client.chat.completions.create(messages=after, **ask).choices[0]
    assert reply.finish_reason in ("tool_calls", "stop", "length")
    assert (reply.message.tool_calls is not None) == (reply.finish_reason == "tool_calls")
    plain = client.chat.completions.create(messages=question, tool_choice="none", **ask).choices[0].message
    assert plain.tool_calls is None
    assert plain.content == chat(client, "What's the weather in Paris?", max_tokens=40, temperature=0
                                 ).choices[0].message.content


# ---- what operators and browsers use --------------------------------------------------------------

def test_a_model_is_retrieved_by_its_id(client):
    (entry,) = client.models.list().data
    assert client.models.retrieve(entry.id).id == entry.id
    with pytest.raises(openai.NotFoundError, match="no model 'nope' here"):
        client.models.retrieve("nope")


def test_metrics_parse_and_count(server, client):
    from prometheus_client.parser import text_string_to_metric_families
    chat(client, max_tokens=3, temperature=0)
    chat(client, max_tokens=3, temperature=0)  # the same prompt again: its prefix is cached
    status, _ = server.get("/no/such/path")
    assert status == 404
    with urllib.request.urlopen(server.url + "/metrics", timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["tinytensor_requests_total", (("path", "/v1/chat/completions"), ("status", "200"))] >= 2
    assert samples["tinytensor_requests_total", (("path", "other"), ("status", "404"))] >= 1
    assert samples["tinytensor_generated_tokens_total", ()] >= 6
    assert samples["tinytensor_prompt_tokens_total", (("source", "cached"),)] > 0
    assert samples["tinytensor_slots", (("state", "idle"),)] + samples["tinytensor_slots", (("state", "processing"),)] \
        == PARALLEL
    assert "/v1/chat/completions 200" in server.logged() and "GET /no/such/path 404" in server.logged()


def test_cors_is_off_by_default_and_answers_its_origin(server, smollm2_path):
    def preflight(running):
        request = urllib.request.Request(running.url + "/v1/chat/completions", method="OPTIONS", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.headers.get("access-control-allow-origin")
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("access-control-allow-origin")
    assert preflight(server) == (405, None)
    running = Running("--checkpoint", str(smollm2_path), "--parallel", "1", "--context", "256", "--cors",
                      "http://app.example")
    try:
        assert preflight(running) == (200, "http://app.example")
    finally:
        running.stop()


# ---- the chat page -----------------------------------------------------------------------------------

def fetched(url: str):
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_the_chat_page_is_served_with_its_policy(server):
    """/ and its script and style, each with its type and a policy that lets the page reach this
    server only; any other name under /page/ is a 404 (no path reaches the server's files)."""
    status, headers, html = fetched(server.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    for part in (b'id="conversation"', b'id="composer"', b'id="stop"', b'id="stats"', b'id="temperature"',
                 b'src="/page/chat.js"', b'href="/page/chat.css"'):
        assert part in html
    status, headers, script = fetched(server.url + "/page/chat.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert b"/v1/chat/completions" in script and b"innerHTML" not in script  # model text goes in as text
    assert fetched(server.url + "/page/chat.css")[0] == 200
    for name in ("/page/app.py", "/page/..%2Fapp.py", "/page/%2E%2E%2F__init__.py", "/page/"):
        assert fetched(server.url + name)[0] == 404, name


@contextlib.contextmanager
def chat_page(server):
    """The server's chat page open in Debian's Chromium, driven by Playwright: (page, expect);
    no script error by the end."""
    import shutil
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium to drive: apt-get install chromium (Debian's package)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright drives the browser: pip install -e '.[test]'")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page, errors = browser.new_page(), []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(server.url + "/")
            yield page, sync_api.expect
            assert errors == []
        finally:
            browser.close()


def test_the_chat_page_in_a_browser(server, client):
    """Debian's Chromium, driven by Playwright: type a message, see the streamed answer (the API's
    greedy answer) and the stats line; a second turn carries the first; Stop ends a reply and frees
    its slot; no script errors."""
    want = chat(client, QUESTION, max_tokens=24, temperature=0).choices[0].message.content
    story = "Write a long story about a dragon."  # with this seed, 400 tokens long: time to press Stop
    assert chat(client, story, max_tokens=400, temperature=1.0, seed=1).choices[0].finish_reason == "length"
    with chat_page(server) as (page, expect):
        expect(page.locator("#model")).not_to_have_text("…")
        page.click("#settings summary")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "24")
        page.fill("#message", QUESTION)
        page.press("#message", "Enter")
        expect(page.locator("#stats")).to_contain_text("tok/s", timeout=60_000)
        expect(page.locator(".assistant").first).to_have_text(want)
        assert "prompt" in page.text_content("#stats") and page.input_value("#message") == ""

        page.fill("#message", "And of Italy?")
        page.click("#send")
        expect(page.locator(".assistant")).to_have_count(2)
        expect(page.locator("#send")).to_be_enabled(timeout=60_000)
        assert page.locator(".user").count() == 2 and page.text_content(".assistant >> nth=1")

        page.click("#new-chat")
        expect(page.locator(".message")).to_have_count(0)
        page.fill("#temperature", "1")
        page.fill("#seed", "1")
        page.fill("#max_tokens", "400")
        page.fill("#message", story)
        page.click("#send")
        expect(page.locator(".assistant")).not_to_have_text("", timeout=60_000)
        page.click("#stop")
        expect(page.locator(".assistant")).to_have_class("message assistant stopped")
        expect(page.locator("#stats")).to_contain_text("stopped")
        assert wait_for_idle(server)
