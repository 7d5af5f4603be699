"""SDXL's text conditioning: CLIP ViT-L + OpenCLIP bigG on the same CLIP BPE, and the size vector (spec §1.9).

The BPE vocabulary ships inside the package (assets/, MIT, from OpenAI's CLIP), so nothing is fetched.
"""

from __future__ import annotations

import gzip
import html
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import ftfy
import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CONTEXT_LENGTH = 77
BOS_ID = 49406
EOS_ID = 49407
CLIP_G_PAD_ID = 0  # open_clip pads with zeros; CLIP-L (transformers) pads with the end token
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# SDXL's size conditioning, which SUPIR fixes at 1024/0/1024 whatever the image size (spec §1.9).
SDXL_SIZE_CONDITIONING = ((1024, 1024), (0, 0), (1024, 1024))


def _byte_alphabet() -> list[str]:
    """The 256 symbols of byte-level BPE in vocabulary order: printable bytes as themselves, then chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of CLIP's tokenizer, built from the BPE file: bytes, bytes + '</w>', merges, specials."""
    raw = resources.files("supir_core.assets").joinpath(VOCAB_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    n_merges = 49408 - 256 * 2 - 2
    merges = [tuple(line.split()) for line in lines[1 : n_merges + 1]]
    alphabet = _byte_alphabet()
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [(a, b) for a, b in merges]


class ClipTokenizer:
    """CLIP BPE tokenizer with both encoders' conventions: 77 ids, start/end tokens, pad id per encoder."""

    def __init__(self) -> None:
        vocab, merges = clip_vocabulary()
        self._tok = CLIPTokenizer(vocab=vocab, merges=merges)

    @staticmethod
    def _clean(text: str, unescape_html: bool) -> str:
        # Both reference tokenizers run ftfy and collapse whitespace; open_clip also undoes HTML escapes.
        text = ftfy.fix_text(text)
        if unescape_html:
            text = html.unescape(html.unescape(text))
        return re.sub(r"\s+", " ", text).strip().lower()

    def count(self, text: str) -> int:
        """Text tokens of one prompt, start and end tokens not counted (CLIP keeps at most 75)."""
        return len(self._tok(self._clean(text, False), add_special_tokens=False)["input_ids"])

    def __call__(self, texts: list[str], pad_id: int = EOS_ID, unescape_html: bool = False) -> torch.Tensor:
        """Token ids [B, 77]: start, text (cut to 75 tokens), end, then pad_id."""
        rows = []
        for text in texts:
            body = self._tok(self._clean(text, unescape_html), add_special_tokens=False)["input_ids"]
            ids = [BOS_ID, *body[: CONTEXT_LENGTH - 2], EOS_ID]
            rows.append(ids + [pad_id] * (CONTEXT_LENGTH - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


@dataclass(frozen=True)
class TextSpec:
    """Sizes of the two text encoders, read from tensor shapes (plus head widths and the CLIP-L layer)."""

    vocab_size: int
    context_length: int
    clip_l_width: int
    clip_l_layers: int
    clip_l_mlp: int
    clip_g_width: int
    clip_g_layers: int
    clip_g_mlp: int
    clip_g_projection: int
    clip_l_head_width: int = 64
    clip_g_head_width: int = 64
    clip_l_layer: int | None = None  # hidden-state index SUPIR reads; None = penultimate

    def _config(self, width: int, layers: int, mlp: int, head_width: int, act: str, proj: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=width,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=max(width // head_width, 1),
            max_position_embeddings=self.context_length,
            hidden_act=act,
            layer_norm_eps=1e-5,
            projection_dim=proj,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=1,
        )

    def build_clip_l(self) -> CLIPTextModel:
        cfg = self._config(
            self.clip_l_width,
            self.clip_l_layers,
            self.clip_l_mlp,
            self.clip_l_head_width,
            "quick_gelu",
            self.clip_l_width,
        )
        return CLIPTextModel(cfg)

    def build_clip_g(self) -> CLIPTextModelWithProjection:
        cfg = self._config(
            self.clip_g_width,
            self.clip_g_layers,
            self.clip_g_mlp,
            self.clip_g_head_width,
            "gelu",
            self.clip_g_projection,
        )
        return CLIPTextModelWithProjection(cfg)


def size_embedding(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Each number of values [B, k] → a dim-wide [cos | sin] sinusoid (period 10000), concatenated: [B, k·dim]."""
    flat = get_timestep_embedding(values.flatten().float(), dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    return flat.reshape(values.shape[0], -1)


def size_vector(batch: int, dim: int, sizes: tuple[tuple[int, int], ...] = SDXL_SIZE_CONDITIONING) -> torch.Tensor:
    """The size part of the ADM vector: original size, crop top-left, target size → [B, 6·dim]."""
    values = torch.tensor([v for pair in sizes for v in pair], dtype=torch.float32)
    return size_embedding(values.expand(batch, -1), dim)


@dataclass
class TextConditioning:
    """Cross-attention tokens [B, 77, H_L + W] and the ADM vector [B, P + 6·D] for one side of CFG."""

    crossattn: torch.Tensor
    vector: torch.Tensor
    pooled: torch.Tensor
    tokens_clip_l: torch.Tensor
    tokens_clip_g: torch.Tensor


class TextConditioner(nn.Module):
    """Prompt strings → SDXL conditioning, exactly as SUPIR feeds its UNet and adaptor."""

    def __init__(self, spec: TextSpec, size_embed_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.size_embed_dim = size_embed_dim
        self.clip_l = spec.build_clip_l()
        self.clip_g = spec.build_clip_g()
        self.tokenizer = ClipTokenizer()

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(texts, pad_id=EOS_ID), self.tokenizer(texts, pad_id=CLIP_G_PAD_ID, unescape_html=True)

    def encode_tokens(self, ids_l: torch.Tensor, ids_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(crossattn, pooled): CLIP-L penultimate hidden ‖ bigG penultimate hidden; bigG pooled projection."""
        device = self.clip_l.embeddings.token_embedding.weight.device
        out_l = self.clip_l(input_ids=ids_l.to(device), output_hidden_states=True)
        layer = self.spec.clip_l_layer if self.spec.clip_l_layer is not None else self.spec.clip_l_layers - 1
        out_g = self.clip_g(input_ids=ids_g.to(device), output_hidden_states=True)
        crossattn = torch.cat([out_l.hidden_states[layer], out_g.hidden_states[-2]], dim=-1)
        return crossattn.float(), out_g.text_embeds.float()

    def forward(self, texts: list[str]) -> TextConditioning:
        ids_l, ids_g = self.tokenize(texts)
        crossattn, pooled = self.encode_tokens(ids_l, ids_g)
        sizes = size_vector(len(texts), self.size_embed_dim).to(pooled.device)
        vector = torch.cat([pooled, sizes], dim=-1)
        return TextConditioning(crossattn, vector, pooled, ids_l, ids_g)
