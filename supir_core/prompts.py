"""Prompt text → SDXL conditioning on the sampling device, remembered across jobs.

Every job encodes the negative prompt and most encode the default positive one, so the CLIP encoders only run for
text they have not seen lately. With `offload`, they wait in CPU memory between those runs (1.6 GB of device
memory at full size), and visit the device for one encoding at a time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .models.text import TextConditioner

Embedding = tuple[torch.Tensor, torch.Tensor]  # (crossattn [1, 77, C], vector [1, ADM])


class PromptEmbeddings:
    def __init__(self, text: TextConditioner, device: torch.device, *, size: int = 64, offload: bool = False) -> None:
        self.text = text
        self.device = device
        self.size = size
        self.offload = offload
        self.encoded = 0  # encoder runs (cache misses), for tests and metrics
        self._cache: OrderedDict[str, Embedding] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, prompt: str) -> Embedding:
        with self._lock:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                return self._cache[prompt]
            embedding = self._encode(prompt)
            if self.size > 0:
                self._cache[prompt] = embedding
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
            return embedding

    def _encode(self, prompt: str) -> Embedding:
        self.encoded += 1
        if self.offload:
            self.text.to(self.device)
        try:
            with torch.no_grad():
                t = self.text([prompt])
            # the tensors are shared by every job that hits the cache: nothing downstream may write into them
            return t.crossattn.to(self.device), t.vector.to(self.device)
        finally:
            if self.offload:
                self.text.to("cpu")
