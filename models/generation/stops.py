"""Stop strings: generated text cut at the first of them, for the CLI's --stop and the
server's `stop` alike."""


class StopText:
    """Cuts generated text at the first stop string, streaming-safe: text that could still turn
    into a stop string is held back until it cannot."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""

    def add(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was found: then generation ends)."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(self.held)) + 1)
                    if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
