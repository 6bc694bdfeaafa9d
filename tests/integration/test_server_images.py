"""Images through the server (Llama 3.2 Vision): OpenAI's image_url content parts with data:
URLs, sent by the real `openai` client to a tiny random Vision checkpoint in the hub's layout,
answered as the model answers the same conversation in this process; what cannot be served is
a 400 saying why."""
import base64
import io

import pytest

openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install -e '.[test]'")

from models.generation.sampling import make_sampler  # noqa: E402
from models.generation.scoring import log_softmax  # noqa: E402
from models.llama3 import load  # noqa: E402
from models.text.chat import chat_tokens  # noqa: E402
from tests.integration.test_server import Running, chat_page  # noqa: E402
from tests.models.test_vision import IMAGE, picture, vision_folder  # noqa: E402, F401: a fixture

pytestmark = [pytest.mark.slow, pytest.mark.oracle]

CONTEXT = 128


def data_url(image, kind="PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def asking(*images, text="What is in the picture?"):
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server(vision_folder):
    folder, _ = vision_folder
    running = Running("--checkpoint", str(folder), "--parallel", "2", "--context", str(CONTEXT))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def metric(server, line_start: str) -> float:
    return float(next(line for line in server.call_text("/metrics").splitlines()
                      if line.startswith(line_start)).split()[-1])


def test_a_chat_about_a_picture_answers_as_the_model_does(server, client, vision_folder):
    """The greedy reply and its log-probabilities are the model's for the same conversation
    (images before the text, as the Instruct format puts them); asked again, the server keeps
    the encoded image and the prompt's cached positions, and answers the same."""
    folder, _ = vision_folder
    photo = picture(50, 90, seed=7)
    model = load(folder, context=CONTEXT)
    tok = model.tokenizer
    ids = chat_tokens(tok, [{"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": "What is in the picture?"}]}])
    assert ids.count(IMAGE) == 1
    rows, greedy = [], make_sampler(temperature=0)
    tokens = list(model.generate(ids, 6, lambda logits, h: rows.append(logits) or greedy(logits, h), tok.stop_ids,
                                 images=[photo]))
    want = [float(log_softmax(row)[t]) for t, row in zip(tokens, rows)]

    for turn in range(2):
        reply = client.chat.completions.create(model="m", messages=asking(data_url(photo)), temperature=0,
                                               max_tokens=6, logprobs=True)
        assert reply.choices[0].message.content == tok.decode(tokens)
        assert [e.logprob for e in reply.choices[0].logprobs.content] == want[:len(reply.choices[0].logprobs.content)]
        assert reply.usage.prompt_tokens == len(ids)
    assert metric(server, 'tinytensor_images_total{source="encoded"}') == 1
    assert metric(server, 'tinytensor_images_total{source="cached"}') == 1
    assert metric(server, 'tinytensor_prompt_tokens_total{source="cached"}') >= len(ids) - 1

    streamed = client.chat.completions.create(model="m", messages=asking(data_url(photo)), temperature=0,
                                              max_tokens=6, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == tok.decode(tokens)


def test_images_that_cannot_be_served_are_400s_naming_why(server, client):
    photo = data_url(picture(28, 28))
    bad = [
        (asking("https://example.com/cat.png"), "never fetches"),
        (asking("data:image/png,rawbytes"), "must be base64"),
        (asking("data:image/png;base64,not base64!"), "not valid base64"),
        (asking("data:image/png;base64," + base64.b64encode(b"GIF89a but not really").decode()),
         "not an image Pillow can read"),
        (asking(*[photo] * 5), "at most 4"),
        ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": photo}}]},
          {"role": "user", "content": "hi"}], "images go in user messages"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": photo, "detail": "low"}}]}],
         "detail 'low'"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "needs image_url"),
    ]
    for messages, says in bad:
        status, body = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 2})
        assert status == 400 and says in body["error"]["message"], (says, body)
    status, body = server.post("/v1/completions", {"prompt": [128000, IMAGE, 9906], "max_tokens": 2})
    assert status == 400 and "image_url parts" in body["error"]["message"]
    status, body = server.post("/v1/chat/completions", {"messages": asking(photo), "max_tokens": 2})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_chat_page_sends_a_picture(server, client, tmp_path):
    """Debian's Chromium, driven by Playwright: pick an image, type a question, see it as a
    thumbnail in the conversation and the API's greedy answer to the same picture and question;
    a second turn carries the picture (encoded once: the server's cache); no script errors."""
    photo = picture(60, 90, seed=11)
    path = tmp_path / "photo.png"
    photo.save(path)
    want = client.chat.completions.create(model="m", messages=asking(data_url(photo), text="Describe it."),
                                          temperature=0, max_tokens=6).choices[0].message.content
    encoded = metric(server, 'tinytensor_images_total{source="encoded"}')
    with chat_page(server) as (page, expect):
        page.click("#settings summary")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "6")
        page.set_input_files("#image", str(path))
        expect(page.locator("#attached img")).to_have_count(1)
        page.fill("#message", "Describe it.")
        page.press("#message", "Enter")
        expect(page.locator("#send")).to_be_enabled(timeout=60_000)
        expect(page.locator(".user img")).to_have_count(1)
        expect(page.locator("#attached img")).to_have_count(0)
        expect(page.locator(".assistant").first).to_have_text(want)

        page.fill("#message", "And its colours?")
        page.click("#send")
        expect(page.locator(".assistant")).to_have_count(2)
        expect(page.locator("#send")).to_be_enabled(timeout=60_000)
        assert "error" not in page.get_attribute(".assistant >> nth=1", "class")
    assert metric(server, 'tinytensor_images_total{source="encoded"}') == encoded  # the API's encoding, kept
