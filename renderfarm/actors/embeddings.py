"""The prompt-embedding cache: a prompt's text-encoder outputs, kept so it is encoded once per model and
profile.

`render_batch` (actors/pipelines.py) looks each prompt up here before it runs the text encoders, and stores
what it encodes; the `PipelineCache` owns one cache per worker and drops a pipeline's entries when it
evicts the pipeline.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

# (pipeline key, prompt, negative prompt (empty when CFG is off), classifier-free guidance on, what the applied
# LoRA set does to the text encoders: () for none, see actors/lora_apply.text_encoder_key)
EmbeddingKey = tuple[tuple[str, str | None], str, str, bool, tuple]


class EmbeddingCache:
    """Prompt embeddings by (model and profile, prompt, negative prompt, CFG on, LoRAs on the text encoders),
    least recently used evicted first, bounded by entries and by bytes. Embeddings are kept in host memory (a
    FLUX.1 prompt is 4 MiB of T5 states) so the cache never competes with the denoiser for VRAM."""

    def __init__(self, max_entries: int = 512, max_bytes: int = 512 * 2**20):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("an EmbeddingCache needs room for at least one entry and one byte")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.bytes = 0
        self._entries: OrderedDict[EmbeddingKey, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: EmbeddingKey) -> dict[str, torch.Tensor] | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found[0]

    def put(self, key: EmbeddingKey, tensors: dict[str, torch.Tensor]) -> None:
        stored = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in stored.values())
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                return  # larger than the whole cache: not worth evicting everything for
            self._entries[key] = (stored, size)
            self.bytes += size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped

    def drop(self, pipeline: tuple[str, str | None]) -> int:
        """Forget the embeddings of one loaded pipeline (its model and profile); returns how many."""
        with self._lock:
            keys = [key for key in self._entries if key[0] == pipeline]
            for key in keys:
                self.bytes -= self._entries.pop(key)[1]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses}
