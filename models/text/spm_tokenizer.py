"""SentencePiece vocabularies as GGUF files carry them (`tokenizer.ggml.model = "llama"`: Llama 2,
TinyLlama, Mistral, llama2.c's models), tokenized exactly as llama.cpp does.

The text gets a leading space (the "dummy prefix") at its start and after each special token,
spaces become "▁", and the text starts as one symbol per UTF-8 character. Then, repeatedly, the
adjacent pair whose concatenation is the vocabulary's highest-scoring token is merged (leftmost
first on a tie). A symbol left that is no token is written as its bytes' `<0xXX>` tokens.
"""
import heapq

from models.text.tokenizer import TokenizerError, VocabTokenizer

SPACE = "▁"  # U+2581, SentencePiece's visible space


class SentencePieceTokenizer(VocabTokenizer):
    def __init__(self, tokens: list[str], scores: list[float], token_types: list[int], bos_id: int | None,
                 eos_id: int | None, add_bos: bool = True, add_space_prefix: bool = True,
                 chat_template: str | None = None, stop_ids=()):
        if len(scores) != len(tokens):
            raise TokenizerError(f"{len(tokens)} tokens but {len(scores)} scores")
        super().__init__(tokens, token_types, bos_id, eos_id, add_bos, chat_template, stop_ids)
        self.scores = scores
        self.add_space_prefix = add_space_prefix
        self.byte_ids = [self.ids.get(f"<0x{b:02X}>") for b in range(256)]

    def _encode_text(self, text: str, after_special: bool) -> list[int]:
        if self.add_space_prefix and after_special:
            text = " " + text
        symbols = list(text.replace(" ", SPACE))
        if not symbols:
            return []
        # A doubly linked list of symbols, merged in place: merging j into i empties symbols[j].
        prev = list(range(-1, len(symbols) - 1))
        next_ = [*range(1, len(symbols)), -1]
        queue = []

        def push(left: int, right: int):
            if left != -1 and right != -1:
                token = self.ids.get(symbols[left] + symbols[right])
                if token is not None:
                    heapq.heappush(queue, (-self.scores[token], left, right, len(symbols[left]) + len(symbols[right])))

        for i in range(1, len(symbols)):
            push(i - 1, i)
        while queue:
            _, left, right, size = heapq.heappop(queue)
            if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
                continue  # a stale pair: one side has merged with something else since
            symbols[left] += symbols[right]
            symbols[right] = ""
            next_[left] = next_[right]
            if next_[right] != -1:
                prev[next_[right]] = left
            push(prev[left], left)
            push(left, next_[left])
        ids = []
        for symbol in filter(None, symbols):
            if symbol in self.ids:
                ids.append(self.ids[symbol])
            else:
                ids += [self._byte_token(b) for b in symbol.encode("utf-8")]
        return ids

    def _byte_token(self, byte: int) -> int:
        if self.byte_ids[byte] is None:
            raise TokenizerError(f"the vocabulary has no token for byte 0x{byte:02X} (no <0x{byte:02X}> token)")
        return self.byte_ids[byte]

    def _piece(self, token: int) -> bytes:
        text = self.tokens[token]
        if self.types[token] == self.BYTE:
            return bytes([int(text[3:-1], 16)])
        return text.replace(SPACE, " ").encode("utf-8")

    def decode(self, ids) -> str:
        """Text without the dummy prefix the encoder put in front (as llama.cpp's detokenizer)."""
        text = super().decode(ids)
        return text[1:] if self.add_space_prefix and text.startswith(" ") else text
