"""Llama 3.1 / 3.2, written against the tinytensor Tensor API only.

    tokens -> embedding -> n_layers x [x + attention(rms_norm(x)); x + mlp(rms_norm(x))]
           -> rms_norm -> output head -> logits

Weights use Meta's names and layout (`layers.0.attention.wq.weight`, rows = output features);
the loaders in models/formats/ bring every on-disk format to that form (models/formats/loading.py
builds this model from a path or a size).
`python -m models.llama3 --help` runs the command line (models/generation/cli.py, through __main__.py).
"""
from dataclasses import dataclass

import numpy as np

from models.generation import speculative
from models.generation.sequence_cache import CachedSequence
from models.llama3.config import LlamaConfig, rope_frequencies
from tinytensor import Tensor, dtypes, nn
from tinytensor.distributed import SINGLE, Group


@dataclass
class KVCache:
    """One preallocated buffer per layer for keys and one for values, [kv_heads, length, head_dim];
    a step writes its positions in place and attention reads the prefix up to them."""
    keys: list[Tensor]
    values: list[Tensor]

    @classmethod
    def allocate(cls, config: LlamaConfig, length: int, skip=frozenset(), kv_heads: int | None = None) -> "KVCache":
        """Buffers for every layer but those in skip (None there: layers without self-attention),
        for kv_heads heads (a process's share under tensor parallelism; all of them by default)."""
        shape = (kv_heads or config.n_kv_heads, length, config.head_dim)
        fresh = lambda i: None if i in skip else Tensor.zeros(shape).contiguous()  # noqa: E731
        keys, values = [fresh(i) for i in range(config.n_layers)], [fresh(i) for i in range(config.n_layers)]
        made = [t for t in keys + values if t is not None]
        made[0].realize(*made[1:])
        return cls(keys, values)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]  # (layer 0 always self-attends)


class Llama:
    def __init__(self, config: LlamaConfig, weights: dict[str, Tensor], tokenizer=None, context: int = 8192,
                 group: Group = SINGLE):
        """group: the processes the weights are split over (models/formats/tensor_parallel.py); weights
        then holds this process's shards, and it computes its share of the heads."""
        self.config, self.weights, self.tokenizer, self.group = config, weights, tokenizer, group
        self.heads, self.kv_heads = config.n_heads // group.size, config.n_kv_heads // group.size
        self.context = min(config.max_context, context)  # positions this instance can hold
        self.n_token_ids = config.vocab_size  # ids the embedding has rows for
        angles = np.outer(np.arange(self.context, dtype=np.float64),
                          np.array(rope_frequencies(config), dtype=np.float32))
        self.rope_cos = Tensor(np.cos(angles).astype(np.float32))  # [positions, head_dim / 2]
        self.rope_sin = Tensor(np.sin(angles).astype(np.float32))

    def w(self, name: str) -> Tensor:
        return self.weights[name]

    # ---- the blocks, bottom up ----------------------------------------------------------------
    def attention(self, i: int, x: Tensor, start: Tensor, positions: Tensor, cache) -> Tensor:
        c, p = self.config, f"layers.{i}.attention."
        seq = x.shape[0]
        q = nn.linear(x, self.w(p + "wq.weight")).reshape(seq, self.heads, c.head_dim)
        k = nn.linear(x, self.w(p + "wk.weight")).reshape(seq, self.kv_heads, c.head_dim)
        v = nn.linear(x, self.w(p + "wv.weight")).reshape(seq, self.kv_heads, c.head_dim)
        cos = self.rope_cos[positions].reshape(seq, 1, c.head_dim // 2)
        sin = self.rope_sin[positions].reshape(seq, 1, c.head_dim // 2)
        q, k = nn.rotary_embedding(q, cos, sin), nn.rotary_embedding(k, cos, sin)
        if isinstance(cache, KVCache):
            out = self.attend(i, q, k, v, start, positions, cache)
        else:  # segments (one, n): the next n rows are the next tokens of the sequence `one` holds
            parts, a = [], 0
            for j, (one, n) in enumerate(cache):
                parts.append(self.attend(i, q[a:a + n], k[a:a + n], v[a:a + n], start[j:j + 1], positions[a:a + n], one))
                a += n
            out = parts[0].cat(*parts[1:]) if len(parts) > 1 else parts[0]
        return nn.linear(out.reshape(seq, self.heads * c.head_dim), self.w(p + "wo.weight")).allreduce(self.group)

    def attend(self, i: int, q: Tensor, k: Tensor, v: Tensor, start: Tensor, positions: Tensor,
               cache: KVCache) -> Tensor:
        """One sequence's attention [seq, heads, head_dim]: write this step's keys and values
        from `start` on, then attend over the whole preallocated cache with the positions not
        yet written masked out."""
        seq = q.shape[0]
        cache.keys[i].assign_at(start, k.transpose(0, 1), axis=1)
        cache.values[i].assign_at(start, v.transpose(0, 1), axis=1)
        visible = Tensor.arange(cache.length).reshape(1, cache.length) <= positions.reshape(seq, 1)
        out = nn.scaled_dot_product_attention(q.transpose(0, 1), cache.keys[i], cache.values[i], attn_mask=visible)
        return out.transpose(0, 1)

    def mlp(self, i: int, x: Tensor) -> Tensor:
        p = f"layers.{i}.feed_forward."
        gate = nn.linear(x, self.w(p + "w1.weight")).silu()
        return nn.linear(gate * nn.linear(x, self.w(p + "w3.weight")), self.w(p + "w2.weight")).allreduce(self.group)

    def block(self, i: int, x: Tensor, start: Tensor, positions: Tensor, cache) -> Tensor:
        eps = self.config.norm_eps
        h = nn.rms_norm(x, self.w(f"layers.{i}.attention_norm.weight"), eps)
        x = x + self.attention(i, h, start, positions, cache)
        return x + self.mlp(i, nn.rms_norm(x, self.w(f"layers.{i}.ffn_norm.weight"), eps))

    def forward(self, tokens: Tensor, start, cache: KVCache, rows=None) -> Tensor:
        """Logits [len(tokens), vocab] for tokens at positions start.. , given the cache filled
        for the positions before start; with rows (a slice, or an int tensor of indices into
        tokens) only those rows' logits, sparing the output head the rest. `start` and rows may
        be tensors: then the graph depends on neither (see jit)."""
        start = start if isinstance(start, Tensor) else Tensor([start])
        return self.run(tokens, start, start + Tensor.arange(tokens.shape[0]), cache, rows)

    def forward_batch(self, tokens: Tensor, positions: Tensor, writes: Tensor, caches: list[KVCache]) -> Tensor:
        """Logits [B, vocab] of one step of B sequences at once (continuous batching): row b is
        the next token of the sequence in caches[b], at position positions[b], its keys and
        values written at writes[b] (its position; a row with no sequence writes past the
        context, where no position looks). Every weight is read once for the B rows."""
        return self.run(tokens, writes, positions, [(cache, 1) for cache in caches])

    def forward_chunks(self, tokens: Tensor, positions: Tensor, starts: Tensor, caches: list[KVCache],
                       lengths: tuple[int, ...], rows: Tensor) -> Tensor:
        """Logits of `rows` (indices into tokens) of prompt chunks of several sequences in one
        pass: tokens holds lengths[j] tokens of the sequence caches[j] holds, one sequence after
        the other, written from starts[j] on (positions: each row's). Every weight is read once
        for all of them; each row's values are the bits its own sequence's pass gives it."""
        return self.run(tokens, starts, positions, list(zip(caches, lengths)), rows)

    def run(self, tokens: Tensor, start: Tensor, positions: Tensor, cache, rows=None) -> Tensor:
        # a tied head split over processes is its own shard of the embedding's rows (load)
        tied = self.config.tied_embeddings and self.group.size == 1
        head = self.w("tok_embeddings.weight" if tied else "output.weight")
        logits = nn.linear(self.features(tokens, start, positions, cache, rows), head)
        return logits.allgather(self.group, axis=-1)

    def features(self, tokens: Tensor, start: Tensor, positions: Tensor, cache, rows=None) -> Tensor:
        """The final hidden states, RMS-normalised: what the head reads, [len(tokens) or rows, dim]."""
        x = nn.embedding(tokens, self.w("tok_embeddings.weight")).cast(dtypes.float32)  # activations are f32
        for i in range(self.config.n_layers):
            x = self.block(i, x, start, positions, cache)
        if rows is not None:
            x = x[rows]
        return nn.rms_norm(x, self.w("norm.weight"), self.config.norm_eps)

    # ---- the Python API -------------------------------------------------------------------------
    def new_cache(self, length: int, ids=None, images=()) -> KVCache:
        """A cache for `length` positions of the prompt `ids` (models with images override it)."""
        if images:
            raise ValueError(f"{self.config.name} is a text model: images need a Llama 3.2 Vision checkpoint")
        return KVCache.allocate(self.config, length, kv_heads=self.kv_heads)

    def logits(self, ids: list[int], images=()) -> np.ndarray:
        """Logits [len(ids), vocab] of one fresh sequence, in one batched pass (a prefill);
        images (paths or PIL images) for a vision model, one per <|image|> token in ids."""
        ids = self.check_ids(ids)
        cache = self.new_cache(len(ids), ids, images)
        return self.forward(Tensor(ids), 0, cache).numpy()

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        """The final hidden states [len(ids), dim] of one fresh sequence, after the last RMSNorm
        (the features the head reads; /v1/embeddings pools them)."""
        ids = self.check_ids(ids)
        cache = self.new_cache(len(ids), ids)
        start = Tensor([0])
        return self.features(Tensor(ids), start, start + Tensor.arange(len(ids)), cache).numpy()

    def generate(self, ids: list[int], max_tokens: int, sampler, stop_ids=(), on_prefill=None, images=(),
                 proposer=None, most: int = 8, stats=None):
        """Yield new token ids: the prompt in one pass, then one token per step with the cache.
        sampler: (logits, history) -> id, e.g. models.generation.sampling.make_sampler(temperature=0);
        images as for `logits`. proposer: speculative decoding (models.generation.speculative:
        PromptLookup or DraftModel), up to `most` drafted tokens checked per pass, the same tokens
        as without it; stats: a speculative.Stats to count them in."""
        ids = self.check_ids(ids)
        if type(max_tokens) is not int or max_tokens < 1:
            raise ValueError(f"max_tokens is {max_tokens!r}: give a whole number >= 1")
        if not callable(sampler):
            raise TypeError(f"sampler must be a function (logits, history) -> id, got {type(sampler).__name__}")
        length = min(len(ids) + max_tokens, self.context)
        cache = self.new_cache(length, ids, list(images))  # images are read and encoded now, not lazily
        sequence = CachedSequence(self, length, cache)
        if proposer is not None:
            return speculative.generate(sequence, ids.tolist(), max_tokens, sampler, stop_ids, proposer, most, stats,
                                        on_prefill)
        return sequence.generate(ids.tolist(), max_tokens, sampler, stop_ids, on_prefill)

    def check_ids(self, ids) -> np.ndarray:
        """Token ids as given to the API: whole numbers in [0, vocab), at least one, fitting the context."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise TypeError(f"token ids must be a list of ints, got {type(ids).__name__}: encode text with "
                            f"model.tokenizer.encode first")
        if len(ids) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        wrong = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
        if wrong:
            raise TypeError(f"token ids must be ints, got {wrong[0]!r}")
        outside = [int(i) for i in ids if not 0 <= i < self.n_token_ids]
        if outside:
            raise ValueError(f"token id {outside[0]} is outside the vocabulary [0, {self.n_token_ids})")
        if len(ids) > self.context:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds "
                             f"{self.context}: shorten it or use --context")
        return np.asarray(ids, dtype=np.int64)
