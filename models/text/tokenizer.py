"""Tokenizers, exact against their references.

- Llama3Tokenizer: tiktoken with Meta's `tokenizer.model` ranks, split pattern and 256 special
  tokens, cutting very long inputs the way Meta's reference does.
- BPETokenizer: GPT-2 style byte-level BPE from GGUF metadata (vocab + merges + the
  pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`), as SmolLM2 uses.

Both give token bytes, so StreamDecoder can print text as it is made without ever splitting a
UTF-8 character.
"""
import base64
import codecs
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import regex

from tinytensor.errors import UserError
from tinytensor.state import files

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>", "<|image|>"]
LLAMA3_N_SPECIAL = 256
TIKTOKEN_MAX_CHARS = 400_000      # tiktoken's limit per call, as Meta cuts inputs
MAX_RUN_CHARS = 25_000            # longest run of only-space or only-non-space characters per call


class TokenizerError(UserError):
    pass


class Llama3Tokenizer:
    def __init__(self, path: Path, image_token_id: int | None = None):
        """image_token_id: where a Llama 3.2 Vision model reads <|image|> (Hugging Face's 128256,
        one past the special tokens; Meta's tokenizer.model names it at 128011)."""
        import tiktoken

        path = Path(path)
        try:
            ranks = {base64.b64decode(tok, validate=True): int(rank) for tok, rank in
                     (line.split() for line in files.read_text(path).splitlines() if line)}
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: not a Llama 3 tokenizer.model ({e})") from None
        if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
            raise TokenizerError(f"{path}: not a Llama 3 tokenizer.model (its ranks are not 0..n-1 over at "
                                 f"least the 256 bytes)")
        missing = next((b for b in range(256) if bytes([b]) not in ranks), None)
        if missing is not None:  # tiktoken would panic on the first text with that byte
            raise TokenizerError(f"{path}: not a Llama 3 tokenizer.model (no token for the byte 0x{missing:02X}, "
                                 f"which every byte-level vocabulary has)")
        names = LLAMA3_SPECIAL + [f"<|reserved_special_token_{2 + i}|>"
                                  for i in range(LLAMA3_N_SPECIAL - len(LLAMA3_SPECIAL))]
        self.ranks = ranks  # token bytes -> rank (= id)
        self.special = {name: len(ranks) + i for i, name in enumerate(names)}
        if image_token_id is not None:
            self.special["<|reserved_special_token_image_meta|>"] = self.special.pop("<|image|>")
            self.special["<|image|>"] = image_token_id
        self.model = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special)
        self._special_pattern = regex.compile("|".join(map(regex.escape, sorted(self.special, key=len, reverse=True))))
        self.bos_id, self.eos_id = self.special["<|begin_of_text|>"], self.special["<|end_of_text|>"]
        self.stop_ids = {self.eos_id, self.special["<|eom_id|>"], self.special["<|eot_id|>"]}
        self.vocab_size = len(ranks) + len(names)
        self.chat_template = None  # set by the loader from tokenizer_config.json when there is one
        self.instruct = False      # Meta Instruct checkpoints: chat in Meta's format (models/text/chat.py)

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special=False) -> list[int]:
        """allow_special: special-token text is its token (True), plain text (False), or its token
        only where allow_special(start, end) says so (chat: only the template's own text)."""
        ids = [self.bos_id] if bos else []
        if allow_special is False:
            return ids + self._encode_plain(text) + ([self.eos_id] if eos else [])
        pos = 0
        for m in self._special_pattern.finditer(text):
            if allow_special is True or allow_special(m.start(), m.end()):
                ids += self._encode_plain(text[pos:m.start()]) + [self.special[m.group()]]
                pos = m.end()
        return ids + self._encode_plain(text[pos:]) + ([self.eos_id] if eos else [])

    def _encode_plain(self, text: str) -> list[int]:
        ids = []
        for i in range(0, len(text), TIKTOKEN_MAX_CHARS):
            for part in _split_long_runs(text[i:i + TIKTOKEN_MAX_CHARS], MAX_RUN_CHARS):
                ids += self.model.encode(part, allowed_special=set(), disallowed_special=())
        return ids

    def decode(self, ids) -> str:
        return self.model.decode(list(ids))

    def token_bytes(self, token: int) -> bytes:
        return self.model.decode_single_token_bytes(token)


def _split_long_runs(text: str, limit: int):
    """Cut text where a run of only whitespace or only non-whitespace grows past `limit`
    characters: tiktoken's regex is quadratic on such runs. Meta's reference does the same."""
    start, run, in_space = 0, 0, None
    for i, ch in enumerate(text):
        space = ch.isspace()
        run = run + 1 if space == in_space else 1
        in_space = space
        if run > limit:
            yield text[start:i]
            start, run = i, 1
    yield text[start:]


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, so every byte is a visible symbol."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp prepares text for byte-level BPE under one `tokenizer.ggml.pre` name:
    regexes applied in turn, whether a piece that is already a token skips merging (Llama 3's
    `ignore_merges`), and whether a BOS is added when the file does not say."""
    patterns: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_GPT2 = PreTokenizer((GPT2_PATTERN,))
_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", GPT2_PATTERN))
_LLAMA3 = PreTokenizer((LLAMA3_PATTERN,), ignore_merges=True, add_bos=True)
_LLAMA3_MERGING = PreTokenizer((LLAMA3_PATTERN,))  # llama.cpp's smaug/dbrx: Llama 3's split, merges always run

# Every name llama.cpp's converter writes for a split we implement, as llama.cpp's own loader
# (llama-vocab.cpp) groups them. A name missing here is refused rather than guessed.
PRE_TOKENIZERS = {
    "default": _GPT2,
    **dict.fromkeys(["gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling",
                     "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "gigachat", "a.x-4.0", "mellum",
                     "modern-bert"], _GPT2),
    **dict.fromkeys(["smollm", "starcoder", "refact", "codeshell", "minerva-7b", "exaone"], _DIGITS_THEN_GPT2),
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
                    _LLAMA3),
    **dict.fromkeys(["smaug-bpe", "dbrx"], _LLAMA3_MERGING),
}


class VocabTokenizer:
    """What the tokenizers of a GGUF vocabulary share: token texts and types, special tokens
    matched whole when allowed, BOS/EOS, stop tokens and the chat template. Subclasses turn a
    run of ordinary text into ids (`_encode_text`) and a token into its bytes (`_piece`)."""
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # GGUF token types

    def __init__(self, tokens: list[str], token_types: list[int], bos_id: int | None, eos_id: int | None,
                 add_bos: bool, chat_template: str | None = None, stop_ids=()):
        self.tokens, self.types = tokens, token_types
        self.ids = {t: i for i, t in enumerate(tokens)}  # a repeated text maps to its last id, as in llama.cpp
        # Special tokens are split out of the text longest first, as llama.cpp does; user-defined
        # ones always, control and unknown ones only when special tokens are allowed.
        matched = sorted((i for i, k in enumerate(token_types) if k in (self.CONTROL, self.USER_DEFINED, self.UNKNOWN)),
                         key=lambda i: -len(tokens[i]))
        self.special = {tokens[i]: i for i in matched}
        self._always_split = [(tokens[i], i) for i in matched if token_types[i] == self.USER_DEFINED]
        self._user_defined = {i for _, i in self._always_split}
        self._split_if_allowed = [(tokens[i], i) for i in matched]
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.stop_ids = {eos_id, *stop_ids} - {None}
        self.chat_template = chat_template
        self.vocab_size = len(tokens)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False, allow_special=False) -> list[int]:
        """allow_special: control-token text is its token (True), plain text (False), or its token
        only where allow_special(start, end) says so (chat: only the template's own text).
        User-defined tokens are always matched, as llama.cpp matches them."""
        ids = [self.bos_id] if (self.add_bos if bos is None else bos) and self.bos_id is not None else []
        after_special = True
        where = None
        if callable(allow_special):
            where = lambda start, end, token: token in self._user_defined or allow_special(start, end)  # noqa: E731
        for fragment in _partition(text, self._split_if_allowed if allow_special else self._always_split, where):
            if isinstance(fragment, int):
                ids.append(fragment)
                after_special = True
            else:
                ids += self._encode_text(fragment, after_special)
                after_special = False
        return ids + ([self.eos_id] if eos and self.eos_id is not None else [])

    def token_bytes(self, token: int) -> bytes:
        if self.types[token] in (self.CONTROL, self.USER_DEFINED, self.UNKNOWN):
            return self.tokens[token].encode("utf-8")
        return self._piece(token)

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def _encode_text(self, text: str, after_special: bool) -> list[int]:
        raise NotImplementedError

    def _piece(self, token: int) -> bytes:
        raise NotImplementedError


class BPETokenizer(VocabTokenizer):
    """Byte-level BPE (GPT-2's scheme) as llama.cpp runs it: bytes mapped to printable
    characters, the pre-tokenizer's split, then the merges in rank order within each piece."""

    def __init__(self, tokens: list[str], merges: list[str], token_types: list[int], pre: str,
                 bos_id: int | None, eos_id: int | None, add_bos: bool | None = None,
                 chat_template: str | None = None, stop_ids=(), ignore_merges: bool | None = None):
        """pre: llama.cpp's pre-tokenizer name. add_bos and ignore_merges: None takes what
        llama.cpp takes for that name (a tokenizer.json states ignore_merges itself)."""
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"pre-tokenizer {pre!r} is not supported; known: {', '.join(PRE_TOKENIZERS)}")
        self.pre_name, pre_tokenizer = pre, PRE_TOKENIZERS[pre]
        super().__init__(tokens, token_types, bos_id, eos_id, pre_tokenizer.add_bos if add_bos is None else add_bos,
                         chat_template, stop_ids)
        self.patterns = [regex.compile(p) for p in pre_tokenizer.patterns]
        self.ignore_merges = pre_tokenizer.ignore_merges if ignore_merges is None else ignore_merges
        self.merges = merges
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self._to_unicode = byte_to_unicode()
        self._to_byte = {c: b for b, c in self._to_unicode.items()}
        self._cache: dict[str, list[int]] = {}

    def _encode_text(self, text: str, after_special: bool) -> list[int]:
        pieces = [text]
        for pattern in self.patterns:
            pieces = [p for piece in pieces for p in _split_keeping_all(pattern, piece)]
        return [i for piece in pieces for i in self._bpe(piece)]

    def _bpe(self, piece: str) -> list[int]:
        if piece in self._cache:
            return self._cache[piece]
        word = "".join(self._to_unicode[b] for b in piece.encode("utf-8"))
        if self.ignore_merges and word in self.ids:
            self._cache[piece] = [self.ids[word]]
            return self._cache[piece]
        # A byte with no token of its own (SmolLM2 lacks 21 of them) is dropped before merging,
        # as the reference BPE does when the vocabulary has no unknown token: its neighbours
        # may then merge with each other.
        symbols = [c for c in word if c in self.ids]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        # a merge whose result is no token (a damaged vocabulary) falls back to the symbol's
        # bytes, as llama.cpp does
        ids = [i for symbol in symbols for i in ([self.ids[symbol]] if symbol in self.ids else
                                                 [self.ids[c] for c in symbol if c in self.ids])]
        self._cache[piece] = ids
        return ids

    def _piece(self, token: int) -> bytes:
        return bytes(self._to_byte[c] for c in self.tokens[token])


def _split_keeping_all(pattern, text: str) -> list[str]:
    """Split text into the pattern's matches and the text between them, losing nothing."""
    out, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        if m.end() > m.start():
            out.append(m.group())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def _partition(text: str, specials: list[tuple[str, int]], allowed=None) -> list[str | int]:
    """Text cut into runs of text and special-token ids: each special token in turn (longest
    first) is cut out of the runs left by the ones before, as llama.cpp's tokenizer does.
    allowed(start, end, token): whether the token text found at text[start:end] is cut out."""
    fragments: list[tuple[int, str] | int] = [(0, text)] if text else []
    for special, token in specials:
        cut = []
        for fragment in fragments:
            if isinstance(fragment, int) or special not in fragment[1]:
                cut.append(fragment)
                continue
            offset, run = fragment
            start = search = 0
            while (i := run.find(special, search)) >= 0:
                if allowed is not None and not allowed(offset + i, offset + i + len(special), token):
                    search = i + 1
                    continue
                cut += [(offset + start, run[start:i]), token]
                start = search = i + len(special)
            cut.append((offset + start, run[start:]))
        fragments = [f for f in cut if isinstance(f, int) or f[1]]
    return [f if isinstance(f, int) else f[1] for f in fragments]


class StreamDecoder:
    """Token ids in, text out, holding back the bytes of a character not yet complete."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
