"""/metrics in Prometheus' text exposition format: what the server answered (requests by path
and status, and how long they took) and what its engine did (prompt tokens computed and found
in the cache, tokens generated, requests ended, the queue and the slots now). Rates (tokens/s)
are the scraper's: Prometheus derives them from the counters."""
import collections
import threading

PREFIX = "tinytensor_"


class Requests:
    """Counts of answered requests by (path, status) and their total seconds, from any thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count, self.seconds = collections.Counter(), collections.Counter()

    def add(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.count[path, status] += 1
            self.seconds[path, status] += seconds


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(requests: Requests, engine, model_name: str) -> str:
    lines = []

    def family(name, kind, help_text, samples):
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        for labels, value in samples:
            inside = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{PREFIX}{name}{{{inside}}} {value}" if inside else f"{PREFIX}{name} {value}")

    with requests.lock:
        answered = sorted(requests.count.items())
        seconds = dict(requests.seconds)
    family("requests_total", "counter", "HTTP requests answered, by path and status.",
           [({"path": p, "status": s}, n) for (p, s), n in answered])
    family("request_seconds_total", "counter", "Seconds spent answering them, by path and status.",
           [({"path": p, "status": s}, f"{seconds[p, s]:.6f}") for (p, s), _ in answered])
    counts = dict(engine.counts)  # a copy: the engine's thread goes on counting
    family("prompt_tokens_total", "counter", "Prompt tokens, by whether they were computed or found cached.",
           [({"source": "computed"}, counts.get("prompt_tokens_computed", 0)),
            ({"source": "cached"}, counts.get("prompt_tokens_cached", 0))])
    family("generated_tokens_total", "counter", "Tokens generated.", [({}, counts.get("generated_tokens", 0))])
    family("draft_tokens_total", "counter", "Tokens speculative decoding drafted, by whether the model kept them.",
           [({"kept": "yes"}, counts.get("draft_tokens_accepted", 0)),
            ({"kept": "no"}, counts.get("draft_tokens", 0) - counts.get("draft_tokens_accepted", 0))])
    family("images_total", "counter", "Images of chat requests, by whether they were encoded or found encoded.",
           [({"source": "encoded"}, counts.get("images_encoded", 0)),
            ({"source": "cached"}, counts.get("images_cached", 0))])
    family("requests_finished_total", "counter", "Engine requests ended, by reason.",
           [({"reason": k.split(":", 1)[1]}, n) for k, n in sorted(counts.items()) if k.startswith("finished:")])
    family("requests_waiting", "gauge", "Requests waiting for a slot.", [({}, len(engine.waiting))])
    busy = engine.busy_slots()
    family("slots", "gauge", "Sequence slots, by state.",
           [({"state": "processing"}, busy), ({"state": "idle"}, len(engine.slots) - busy)])
    family("model_info", "gauge", "The model served.", [({"model": model_name}, 1)])
    return "\n".join(lines) + "\n"
