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


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation mean, LLaVA-1.5's vision tower


class Captioner(Protocol):
    def __call__(self, image: Image.Image, question: str | None = None) -> str: ...


@dataclass(frozen=True)
class CaptionSettings:
    """Generation as the official LLaVA agent runs it (temperature 0.2, top-p 0.7, up to 512 tokens)."""

    temperature: float = 0.2
    top_p: float = 0.7
    max_new_tokens: int = 512
    # LLaVA-1.5's "pad" aspect mode: the image is centred on a square of the processor's mean colour before
    # the processor resizes and crops it, so the sides of a wide (or tall) image are kept. Off: the processor
    # alone, whose centre crop loses them (what llava-hf's processors do, and their `do_pad` option does
    # nothing for the CLIPImageProcessor those repos ship).
    pad_to_square: bool = False
    seed: int = 0  # sampling is seeded locally: the process-wide random generators are left as they were


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

    def resident_bytes(self) -> int:
        """Device memory this captioner holds between captions: all of it when it stays loaded on the device
        (loaded at start), none when it is offloaded or unloaded after each use."""
        if self._model is None or not self.keep_loaded or self.offload:
            return 0
        from .memory import module_bytes

        return module_bytes(self._model)

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
            if self.offload and self._visits == 0:
                try:
                    self._model.to(self.device)
                except BaseException as exc:
                    # A move that fails half-way (out of memory) leaves some layers on the device: bring them all
                    # home, or every later caption fails with a device mismatch.
                    from .memory import release_after_failure

                    self._model.to("cpu")
                    release_after_failure(exc)
                    raise
            self._visits += 1  # counted only once the model is on the device: a failed visit leaves no trace
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

    def prepare(self, image: Image.Image, question: str | None = None) -> dict[str, torch.Tensor]:
        """The processor's inputs (on the CPU) for one image and question; call inside `on_device()`."""
        if self._processor is None:
            raise RuntimeError("the LLaVA processor is not loaded: prepare inside on_device()")
        image = image.convert("RGB")
        if self.settings.pad_to_square:
            image = expand_to_square(image, mean_colour(self._processor))
        prompt = f"{SYSTEM} USER: <image>\n{question or DEFAULT_QUESTION} ASSISTANT:"
        return dict(self._processor(images=image, text=prompt, return_tensors="pt"))

    def _caption(self, image: Image.Image, question: str) -> str:
        s = self.settings
        device = self._model.device
        inputs = {k: v.to(device) for k, v in self.prepare(image, question).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        sampling = (
            {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
            if s.temperature > 0
            else {"do_sample": False}
        )
        # sampling at temperature 0.2: the same image gives the same caption
        with torch.inference_mode(), _local_seed(s.seed, device):
            out = self._model.generate(**inputs, max_new_tokens=s.max_new_tokens, num_beams=1, **sampling)
        text = self._processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        return " ".join(text.replace("</s>", " ").split())


def mean_colour(processor: Any) -> tuple[int, int, int]:
    """The processor's normalisation mean as 8-bit RGB (LLaVA-1.5's padding colour: normalises to 0)."""
    mean = getattr(getattr(processor, "image_processor", None), "image_mean", None) or CLIP_MEAN
    if isinstance(mean, (int, float)):
        mean = (mean,) * 3
    r, g, b = (int(m * 255) for m in mean)  # truncated, as LLaVA-1.5's expand2square does
    return r, g, b


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square canvas of `fill`, its side the image's longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@contextmanager
def _local_seed(seed: int, device: torch.device) -> Iterator[None]:
    """Seeded generators for the block (CPU, and the CUDA device when `device` is one), restored afterwards.

    `torch.manual_seed` would reset every generator of the process (the server's other models included);
    here only the generators the captioner samples from are seeded, and their states come back after.
    transformers' `generate` takes no `torch.Generator`, hence the fork.
    """
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


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


def compose_prompt(caption: str, user: str, quality: str, style: str, count_tokens: Any) -> str:
    """The positive prompt of a run (spec §3.7). official (the default): caption and user text joined by a space,
    then the quality prompt with no separator, as the official `batchify_sample` joins caption and `p_p`; CLIP's
    77-token cut then drops whatever of the quality prompt a long caption pushes out. fit: compose_positive."""
    if style == "official":  # the caption as it came (the official code strips nothing); a user's text after it
        text = " ".join(t for t in (caption.strip(), user.strip()) if t) if user.strip() else caption
        return text + quality
    if style == "fit":
        return compose_positive(caption, user, quality, count_tokens)
    raise ValueError(f"prompt_style={style!r}: official or fit")
