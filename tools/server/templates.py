"""Chat templates rendered in a child process, so that a checkpoint's template cannot stall or
exhaust the server: Jinja runs Python on the thread that calls it, and a template with nested
loops would hold the event loop (and /health, and SIGTERM) for as long as it ran.

The child (`python -m tools.server.templates`, importing only models.text.chat and jinja2) renders one
template at a time with models.text.chat.render_pieces under an address-space bound, reading requests
and writing replies as JSON lines on its stdin and stdout. A render that takes longer than the
time bound is answered with an error and the child killed; a fresh one starts for the next request.
"""
import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

TIMEOUT_S = 5.0          # real templates render in about a millisecond
MEMORY_BYTES = 1 << 30   # the child's address space, Python and Jinja included (~0.1 GB of it)


class TemplateFailure(ValueError):
    """The template could not render these messages; the message says why, on one line."""


class TemplateRenderer:
    """models.text.chat.render_pieces' signature, run in a child process with time and memory bounds.
    Thread-safe: one render at a time."""

    def __init__(self, timeout: float = TIMEOUT_S, memory: int = MEMORY_BYTES):
        self.timeout, self.memory = timeout, memory
        self.lock = threading.Lock()
        self.process = None

    def start(self):
        """Start the child now (it takes ~0.1 s), rather than on the first chat request."""
        with self.lock:
            self._ensure_child()

    def __call__(self, template: str, messages: list[dict], add_generation_prompt: bool = True, **special):
        request = json.dumps({"template": template, "messages": messages,
                              "add_generation_prompt": add_generation_prompt, "special": special})
        with self.lock:
            self._ensure_child()
            try:
                self.process.stdin.write(request + "\n")
                self.process.stdin.flush()
            except OSError:  # it died since the last request
                self._stop_child()
                raise TemplateFailure("the chat template's renderer was not running: try again") from None
            ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
            if not ready:
                self._stop_child()
                raise TemplateFailure(f"the chat template took more than {self.timeout:g} s to render these "
                                      f"messages: it was stopped")
            line = self.process.stdout.readline()
            if not line:
                self._stop_child()
                raise TemplateFailure("the chat template's renderer ended while rendering these messages")
        reply = json.loads(line)
        if "error" in reply:
            raise TemplateFailure(reply["error"])
        return [tuple(piece) for piece in reply["pieces"]], reply["found"]

    def close(self):
        with self.lock:
            self._stop_child()

    def _ensure_child(self):
        if self.process is not None and self.process.poll() is None:
            return
        self._stop_child()
        root = str(Path(__file__).resolve().parents[2])  # where `models` and `tools` are importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([sys.executable, "-m", "tools.server.templates", str(self.memory)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8",
                                        env=env, start_new_session=True)  # Ctrl-C is the server's to handle

    def _stop_child(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                stream.close()
        self.process = None


def serve(memory: int):
    """The child: one JSON request a line in, one JSON reply a line out."""
    import resource

    from models.text.chat import render_pieces
    render_pieces("{{ messages[0]['content'] }}", [{"role": "user", "content": "warm"}])  # imports jinja2 first
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    for line in sys.stdin:
        try:
            r = json.loads(line)
            pieces, found = render_pieces(r["template"], r["messages"], r["add_generation_prompt"], **r["special"])
            reply = {"pieces": pieces, "found": found}
        except ValueError as e:  # models.text.chat's own: one line that says what failed
            reply = {"error": str(e)}
        except MemoryError:
            reply = {"error": f"the chat template needed more than {memory >> 20} MiB to render these messages"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
