"""Captions of the stage-1 image as the text prompt: LLaVA on transformers (spec §5), and prompt composition.

Any callable `image -> str` is a captioner; `LlavaCaptioner` is the one SUPIR uses. It loads from a local
Hugging Face directory (or a hub id when online), once, and can free its memory between jobs, or keep it in CPU
memory and bring it to the device only to caption (`offload`).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from PIL import Image

from .errors import WeightsError
from .params import DEFAULT_QUESTION

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class Captioner(Protocol):
    def __call__(self, image: Image.Image, question: str | None = None) -> str: ...


@dataclass(frozen=True)
class CaptionSettings:
    """Generation as the official LLaVA agent runs it (temperature 0.2, top-p 0.7, up to 512 tokens)."""

    temperature: float = 0.2
    top_p: float = 0.7
    max_new_tokens: int = 512
    pad_to_square: bool = False  # the official preprocessing centre-crops, losing the sides of wide images
    seed: int = 0


class LlavaCaptioner:
    """LLaVA-1.5 (Hugging Face format, e.g. llava-hf/llava-1.5-7b-hf) describing an image in one paragraph."""

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        quantization: Literal["8bit", "4bit"] | None = None,
        keep_loaded: bool = True,
        offload: bool = False,
        settings: CaptionSettings | None = None,
    ) -> None:
        if quantization and not str(device).startswith("cuda"):
            raise WeightsError(f"LLaVA {quantization} quantization (bitsandbytes) needs a CUDA device, not {device!r}")
        if quantization and offload:
            raise WeightsError("a bitsandbytes-quantized LLaVA cannot move between devices: offload or quantization")
        self.source = str(model)
        self.device = device
        self.dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
        self.quantization = quantization
        self.keep_loaded = keep_loaded
        self.offload = offload  # wait in CPU memory between captions, visit the device to caption
        self.settings = settings or CaptionSettings()
        self._model: Any = None
        self._processor: Any = None
        self._lock = threading.RLock()
        self._visits = 0

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        local = Path(self.source).is_dir()
        if not local and not _looks_like_hub_id(self.source):
            raise WeightsError(f"{self.source}: no such LLaVA directory (nor a hub id like llava-hf/llava-1.5-7b-hf)")
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.quantization:
            from transformers import BitsAndBytesConfig

            bits = {"8bit": {"load_in_8bit": True}, "4bit": {"load_in_4bit": True}}[self.quantization]
            kwargs.update(quantization_config=BitsAndBytesConfig(**bits), device_map={"": self.device})
        try:
            self._processor = AutoProcessor.from_pretrained(self.source)
            model = LlavaForConditionalGeneration.from_pretrained(self.source, **kwargs)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{self.source}: cannot load LLaVA ({str(exc).splitlines()[0][:200]})") from exc
        home = "cpu" if self.offload else self.device
        self._model = (model if self.quantization else model.to(home)).eval()

    def unload(self) -> None:
        """Free the model's memory (the next caption loads it again)."""
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextmanager
    def on_device(self) -> Iterator[None]:
        """Loaded and on the device for the whole block (several captions: one trip for an offloaded model)."""
        with self._lock:
            if self._model is None:
                self.load()
            self._visits += 1
            if self.offload and self._visits == 1:
                self._model.to(self.device)
            try:
                yield
            finally:
                self._visits -= 1
                if self._visits == 0:
                    if not self.keep_loaded:
                        self.unload()
                    elif self.offload:
                        self._model.to("cpu")

    def __call__(self, image: Image.Image, question: str | None = None) -> str:
        with self.on_device():
            return self._caption(image, question or DEFAULT_QUESTION)

    def _caption(self, image: Image.Image, question: str) -> str:
        s = self.settings
        prompt = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
        inputs = self._processor(images=image.convert("RGB"), text=prompt, return_tensors="pt", do_pad=s.pad_to_square)
        inputs = {k: v.to(self._model.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        torch.manual_seed(s.seed)  # sampling at temperature 0.2: the same image gives the same caption
        sampling = (
            {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
            if s.temperature > 0
            else {"do_sample": False}
        )
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=s.max_new_tokens, num_beams=1, **sampling)
        text = self._processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        return " ".join(text.replace("</s>", " ").split())


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/"))


# ---------------------------------------------------------------------------------------------
# Prompt composition


def _join(parts: list[str]) -> str:
    """Parts joined by ", ", or by a space after a part that already ends a sentence."""
    text = ""
    for part in (p for p in parts if p):
        text = part if not text else f"{text} {part}" if text.endswith((".", "!", "?")) else f"{text}, {part}"
    return text


def compose_positive(caption: str, user: str, quality: str, count_tokens: Any, limit: int = 75) -> str:
    """caption, user text, quality prompt — all within CLIP's 75 text tokens where they can be.

    The official code joins caption and quality prompt with no separator and lets the 77-token cut drop
    the quality prompt whenever a caption is long. Here the caption is shortened, word by word from its
    end, until everything fits; the user's text and the quality prompt are kept whole (if those two alone
    are too long, CLIP's cut takes the end of the quality prompt, as it would anyway).
    """
    caption, user, quality = caption.strip(), user.strip(), quality.strip()
    words = caption.split()
    while words and count_tokens(_join([" ".join(words), user, quality])) > limit:
        words.pop()
    return _join([" ".join(words).rstrip(",;:"), user, quality])
