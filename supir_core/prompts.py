"""Prompt text → SDXL conditioning on the sampling device, remembered across jobs.

Every job encodes the negative prompt and most encode the default positive one, so the CLIP encoders only run for
text they have not seen lately. With `offload`, they wait in CPU memory between those runs (1.6 GB of device
memory at full size), and visit the device for one encoding at a time, or for a whole `on_device()` block (a tiled
job's per-tile prompts: one round trip for all of them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

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
        self._blocks = 0  # open on_device() blocks: offloaded encoders stay on the device until the last ends
        self._on_device = not offload

    @contextmanager
    def on_device(self) -> Iterator[None]:
        """Offloaded encoders that a prompt in the block brings to the device stay there until the block ends (one
        round trip for many prompts; none when every prompt is cached). Nested blocks end with the outermost."""
        with self._lock:
            self._blocks += 1
        try:
            yield
        finally:
            with self._lock:
                self._blocks -= 1
                if self._blocks == 0:
                    self._go_home()

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
        self._visit()
        try:
            with torch.no_grad():
                t = self.text([prompt])
            # the tensors are shared by every job that hits the cache: nothing downstream may write into them
            return t.crossattn.to(self.device), t.vector.to(self.device)
        finally:
            if self._blocks == 0:
                self._go_home()

    def _visit(self) -> None:
        if self._on_device:
            return
        try:
            self.text.to(self.device)
        except BaseException:
            self.text.to("cpu")  # a move that fails half-way (out of memory) leaves nothing on the device
            raise
        self._on_device = True

    def _go_home(self) -> None:
        if self.offload and self._on_device:
            self.text.to("cpu")
            self._on_device = False
