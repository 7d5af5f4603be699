"""Official checkpoint files → SupirModel, strictly (spec §2).

Two files make a SUPIR install: an SDXL single file (UNet, VAE, both text encoders, LDM/sgm naming)
and a SUPIR file (adaptor, connectors, robust encoder). Loading is planned before any tensor is
read: every model tensor must come from exactly one file key, every file key must be used (or be on
the short list of known leftovers), and every shape must match. A plan that fails raises a
WeightsError naming the file and the first offenders.

Sizes come from the files' tensor shapes, so the tiny fixtures and the real 2.6 B model take the same
path. The LDM → diffusers renames for the UNet, the adaptor and the VAEs come from diffusers' own
single-file converters, run over key *names* (see `_diffusers_rename`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from .checkpoint_files import (  # noqa: F401  (re-exported: the file-level part)
    ADAPTOR,
    CLIP_G,
    CLIP_L,
    CONNECTORS,
    IGNORED_KEYS,
    KIND_NAMES,
    ROBUST_ENCODER,
    SHOWN,
    SLOT_NEEDS,
    UNET,
    VAE,
    TensorSource,
    _brief,
    _expect_kind,
    _fail,
    _open_safetensors,
    _open_torch,
    _sniff,
    identify,
    open_checkpoint,
)
from .errors import WeightsError
from .models.supir import SupirModel, SupirSpec
from .models.text import TextSpec
from .models.unet import UNetSpec
from .models.vae import SDXL_SCALE_FACTOR, VAESpec


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def unet_spec(sdxl: TensorSource, *, head_width: int = 64) -> UNetSpec:
    """UNet sizes from the SDXL file: widths, blocks per level, transformer depths, context and ADM sizes."""
    s = {k[len(UNET) :]: v for k, v in sdxl.shapes.items() if k.startswith(UNET)}
    try:
        blocks = _indices(s, r"input_blocks\.(\d+)\.")
        downsamples = _indices(s, r"input_blocks\.(\d+)\.0\.op\.weight")
        layers = downsamples[0] - 1 if downsamples else len(blocks) - 1
        levels = len(blocks) // (layers + 1)
        channels, depths = [], []
        for level in range(levels):
            first = 1 + level * (layers + 1)
            channels.append(s[f"input_blocks.{first}.0.out_layers.3.weight"][0])
            depths.append(len(_indices(s, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")))
        mid_depth = len(_indices(s, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
        context = next(v[1] for k, v in s.items() if k.endswith("attn2.to_k.weight"))
        adm = s["label_emb.0.0.weight"][1]
        pooled = sdxl.shapes[CLIP_G + "text_projection"][1]
        spec = UNetSpec(
            in_channels=s["input_blocks.0.0.weight"][1],
            out_channels=s["out.2.weight"][0],
            block_channels=tuple(channels),
            layers_per_block=layers,
            transformer_depth=tuple(depths),
            context_dim=context,
            adm_in_channels=adm,
            size_embed_dim=(adm - pooled) // 6,
            head_width=head_width,
        )
    except (KeyError, IndexError, StopIteration) as exc:
        raise _fail(sdxl.path, f"the SDXL UNet is incomplete: no tensor {exc}") from exc
    if mid_depth != depths[-1]:
        raise _fail(sdxl.path, f"middle-block depth {mid_depth} differs from the last level's {depths[-1]}")
    if (adm - pooled) % 6:
        raise _fail(sdxl.path, f"ADM width {adm} is not the pooled width {pooled} plus six equal size embeddings")
    return spec


def vae_spec(sdxl: TensorSource) -> VAESpec:
    s = {k[len(VAE) :]: v for k, v in sdxl.shapes.items() if k.startswith(VAE)}
    try:
        levels = _indices(s, r"encoder\.down\.(\d+)\.")
        return VAESpec(
            block_channels=tuple(s[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels),
            layers_per_block=len(_indices(s, r"encoder\.down\.0\.block\.(\d+)\.")),
            latent_channels=s["decoder.conv_in.weight"][1],
            image_channels=s["encoder.conv_in.weight"][1],
        )
    except KeyError as exc:
        raise _fail(sdxl.path, f"the SDXL VAE is incomplete: no tensor {exc}") from exc


def text_spec(
    sdxl: TensorSource, *, clip_l_head_width: int = 64, clip_g_head_width: int = 64, clip_l_layer: int | None = None
) -> TextSpec:
    s = sdxl.shapes
    try:
        vocab, width_l = s[CLIP_L + "embeddings.token_embedding.weight"]
        width_g, proj = s[CLIP_G + "text_projection"]
        return TextSpec(
            vocab_size=vocab,
            context_length=s[CLIP_L + "embeddings.position_embedding.weight"][0],
            clip_l_width=width_l,
            clip_l_layers=len(_indices(s, re.escape(CLIP_L) + r"encoder\.layers\.(\d+)\.")),
            clip_l_mlp=s[CLIP_L + "encoder.layers.0.mlp.fc1.weight"][0],
            clip_g_width=width_g,
            clip_g_layers=len(_indices(s, re.escape(CLIP_G) + r"transformer\.resblocks\.(\d+)\.")),
            clip_g_mlp=s[CLIP_G + "transformer.resblocks.0.mlp.c_fc.weight"][0],
            clip_g_projection=proj,
            clip_l_head_width=clip_l_head_width,
            clip_g_head_width=clip_g_head_width,
            clip_l_layer=clip_l_layer,
        )
    except KeyError as exc:
        raise _fail(sdxl.path, f"the SDXL text encoders are incomplete: no tensor {exc}") from exc


@dataclass(frozen=True)
class ModelOptions:
    """What the files cannot say: attention head widths, the CLIP-L layer SUPIR reads, the latent scale.

    The defaults are those of SDXL / SUPIR-v0; the conformance fixtures set their own.
    """

    unet_head_width: int = 64
    clip_l_head_width: int = 64
    clip_g_head_width: int = 64
    clip_l_layer: int | None = None  # None = penultimate
    scale_factor: float = SDXL_SCALE_FACTOR


def options_from_config(config: dict[str, Any]) -> ModelOptions:
    """ModelOptions from a conformance fixture's config.json (official yaml names)."""
    model = config["model"]
    clip_l, clip_g = model["text_encoders"]["clip_l"], model["text_encoders"]["clip_g"]
    hf = clip_l["hf_text_config"]
    return ModelOptions(
        unet_head_width=model["network_config"]["params"]["num_head_channels"],
        clip_l_head_width=hf["hidden_size"] // hf["num_attention_heads"],
        clip_g_head_width=clip_g["width"] // clip_g["heads"],
        clip_l_layer=clip_l.get("layer_idx"),
        scale_factor=model["scale_factor"],
    )


def load_model_options(path: str | Path) -> ModelOptions:
    """ModelOptions from JSON: either its own fields or a conformance fixture's config.json."""
    try:
        data = json.loads(Path(path).read_text())
        return options_from_config(data) if "model" in data else ModelOptions(**data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _fail(path, f"not a model options file ({exc})") from exc


def spec_from_checkpoint(sdxl: TensorSource, options: ModelOptions = ModelOptions()) -> SupirSpec:
    return SupirSpec(
        unet=unet_spec(sdxl, head_width=options.unet_head_width),
        vae=vae_spec(sdxl),
        text=text_spec(
            sdxl,
            clip_l_head_width=options.clip_l_head_width,
            clip_g_head_width=options.clip_g_head_width,
            clip_l_layer=options.clip_l_layer,
        ),
        scale_factor=options.scale_factor,
    )


# --------------------------------------------------------------------------------------------
# Key maps: model tensor name → (file key, transform)

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Entry:
    target: str  # name inside the component module
    source: str  # key in the file
    transform: Transform | None = None


class _KeyName(str):
    """A file key standing in for its tensor. diffusers' LDM converters only move values (and reshape
    1×1-conv attention weights, which they skip for a 0-d "tensor"), so running them over names
    yields their rename table without touching any data."""

    shape: tuple[int, ...] = ()
    ndim = 0


def _diffusers_rename(
    convert: Callable[..., dict[str, Any]], keys: Mapping[str, str], config: dict[str, Any]
) -> list[Entry]:
    """keys: the name the converter expects → the real file key."""
    renamed = convert({_KeyName(k): _KeyName(v) for k, v in keys.items()}, config)
    return [Entry(target, str(source)) for target, source in renamed.items() if source is not None]


def _unet_entries(keys: Iterable[str], prefix: str, layers_per_block: int) -> list[Entry]:
    names = {UNET + k[len(prefix) :]: k for k in keys}
    config = {"layers_per_block": layers_per_block, "addition_embed_type": "text_time"}
    # imported here: diffusers' single-file module takes seconds to import, and only loading needs it (not
    # `supir weights verify`, which identifies a file by its key names)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return _diffusers_rename(convert_ldm_unet_checkpoint, names, config)


def _vae_entries(keys: Iterable[str], prefix: str, levels: int, as_prefix: str = VAE) -> list[Entry]:
    names = {as_prefix + k[len(prefix) :]: k for k in keys}
    config = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return _diffusers_rename(convert_ldm_vae_checkpoint, names, config)


def _chunk(index: int) -> Transform:
    return lambda t: t.chunk(3, dim=0)[index]


_OPEN_CLIP_RENAMES = [
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    (r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    (r"transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)", r"text_model.encoder.layers.\1.layer_norm1.\2"),
    (r"transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)", r"text_model.encoder.layers.\1.layer_norm2.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"text_model.encoder.layers.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"text_model.encoder.layers.\1.mlp.fc2.\2"),
    (
        r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)",
        r"text_model.encoder.layers.\1.self_attn.out_proj.\2",
    ),
]


def _open_clip_entries(keys: Iterable[str], prefix: str) -> list[Entry]:
    """OpenCLIP text tower → transformers CLIPTextModelWithProjection (fused qkv split, projection transposed)."""
    entries = []
    for key in keys:
        name = key[len(prefix) :]
        if name == "text_projection":  # used as x @ P: a Linear holds Pᵀ
            entries.append(Entry("text_projection.weight", key, lambda t: t.T))
            continue
        if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", name):
            layer, kind = m.groups()
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                entries.append(Entry(f"text_model.encoder.layers.{layer}.self_attn.{proj}.{kind}", key, _chunk(i)))
            continue
        for pattern, target in _OPEN_CLIP_RENAMES:
            if re.fullmatch(pattern, name):
                entries.append(Entry(re.sub(pattern, target, name), key))
                break
    return entries


def _strip_entries(keys: Iterable[str], prefix: str) -> list[Entry]:
    return [Entry(k[len(prefix) :], k) for k in keys]


# --------------------------------------------------------------------------------------------
# The plan


@dataclass
class Component:
    name: str
    module: nn.Module
    source: TensorSource
    entries: list[Entry]


@dataclass
class LoadPlan:
    components: list[Component]
    sources: list[TensorSource]
    missing: list[str] = field(default_factory=list)  # model tensors no file key fills
    unused: list[str] = field(default_factory=list)  # file keys nothing reads (known leftovers excluded)
    mismatched: list[str] = field(default_factory=list)  # shape disagreements
    ignored: list[str] = field(default_factory=list)  # known leftovers present in the files
    used: set[str] = field(default_factory=set)  # file keys that fill a model tensor

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unused or self.mismatched)

    def raise_if_broken(self) -> None:
        if self.ok:
            return
        problems = []
        for label, items in (
            ("wrong shapes", self.mismatched),
            ("keys nothing reads", self.unused),
            ("model tensors no file fills", self.missing),
        ):
            if items:
                shown = ", ".join(items[:SHOWN]) + (f" … (+{len(items) - SHOWN} more)" if len(items) > SHOWN else "")
                problems.append(f"{len(items)} {label}: {shown}")
        files = " + ".join(s.path for s in self.sources)
        raise WeightsError(f"{files}: the checkpoint does not fit the model; " + "; ".join(problems))


def _component_keys(source: TensorSource, prefix: str, exclude: tuple[str, ...] = ()) -> list[str]:
    return [k for k in source.keys() if k.startswith(prefix) and not k.startswith(exclude) and k not in IGNORED_KEYS]


def _components(model: SupirModel, sdxl: TensorSource, supir: TensorSource) -> list[Component]:
    spec = model.spec
    unet_keys = _component_keys(sdxl, UNET, exclude=(CONNECTORS,))
    adaptor_keys = _component_keys(supir, ADAPTOR)
    hint = [k for k in adaptor_keys if k.startswith(ADAPTOR + "input_hint_block.0.")]
    hint_entries = [Entry("hint_conv." + k.rsplit(".", 1)[1], k) for k in hint]
    vae_levels = len(spec.vae.block_channels)
    robust = [
        Entry(e.target[len("encoder.") :], e.source)
        for e in _vae_entries(
            _component_keys(supir, ROBUST_ENCODER), ROBUST_ENCODER, vae_levels, as_prefix=VAE + "encoder."
        )
        if e.target.startswith("encoder.")
    ]
    return [
        Component("unet.base", model.unet.base, sdxl, _unet_entries(unet_keys, UNET, spec.unet.layers_per_block)),
        Component(
            "unet.project_modules",
            model.unet.project_modules,
            supir,
            _strip_entries(_component_keys(supir, CONNECTORS), CONNECTORS),
        ),
        Component(
            "adaptor",
            model.adaptor,
            supir,
            _unet_entries([k for k in adaptor_keys if k not in hint], ADAPTOR, spec.unet.layers_per_block)
            + hint_entries,
        ),
        Component(
            "vae.autoencoder",
            model.vae.autoencoder,
            sdxl,
            _vae_entries(_component_keys(sdxl, VAE, exclude=(ROBUST_ENCODER,)), VAE, vae_levels),
        ),
        Component("vae.robust_encoder", model.vae.robust_encoder, supir, robust),
        Component("text.clip_l", model.text.clip_l, sdxl, _strip_entries(_component_keys(sdxl, CLIP_L), CLIP_L)),
        Component("text.clip_g", model.text.clip_g, sdxl, _open_clip_entries(_component_keys(sdxl, CLIP_G), CLIP_G)),
    ]


def _fitted(entry: Entry, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Apply the entry's transform; 1×1-conv attention weights become Linear weights by dropping unit dims."""
    if entry.transform is not None:
        tensor = entry.transform(tensor)
    if (
        tensor.shape != shape
        and tensor.numel() == shape.numel()
        and [d for d in tensor.shape if d != 1] == [d for d in shape if d != 1]
    ):
        tensor = tensor.reshape(shape)
    return tensor


def plan_loading(model: SupirModel, sdxl: TensorSource, supir: TensorSource) -> LoadPlan:
    """Match every model tensor to a file key and check shapes, reading no tensor data."""
    plan = LoadPlan(_components(model, sdxl, supir), [sdxl, supir])
    for comp in plan.components:
        expected = comp.module.state_dict(keep_vars=True)
        filled = set()
        for entry in comp.entries:
            if entry.target not in expected:
                continue  # reported below as an unused file key
            filled.add(entry.target)
            plan.used.add(entry.source)
            want = expected[entry.target].shape
            have = comp.source.shapes[entry.source]
            if _fitted(entry, torch.empty(have, device="meta"), want).shape != want:
                plan.mismatched.append(f"{entry.source} {tuple(have)} → {comp.name}.{entry.target} {tuple(want)}")
        plan.missing += [f"{comp.name}.{name}" for name in expected if name not in filled]
    for source in plan.sources:
        for key in source.keys():
            if key in IGNORED_KEYS:
                plan.ignored.append(key)
            elif key not in plan.used:
                plan.unused.append(key)
    return plan


def build_empty(spec: SupirSpec) -> SupirModel:
    """The model with parameters on the meta device (no memory); buffers stay real."""
    with init_empty_weights():
        return SupirModel(spec)


def load_supir(
    sdxl_path: str | Path,
    supir_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    options: ModelOptions = ModelOptions(),
) -> SupirModel:
    """Build SUPIR from an SDXL single file and a SUPIR file, strictly, one tensor at a time.

    Parameters start on the meta device and each is replaced by its file tensor cast to dtype on
    device, so at most one component's converted tensors exist beside the memory-mapped files.
    """
    sdxl = open_checkpoint(sdxl_path)
    _expect_kind(sdxl, "sdxl")
    supir = open_checkpoint(supir_path)
    _expect_kind(supir, "supir")
    model = build_empty(spec_from_checkpoint(sdxl, options))
    plan = plan_loading(model, sdxl, supir)
    plan.raise_if_broken()
    for comp in plan.components:
        _load_component(comp, device, dtype)
    model.to(device)  # buffers built on the CPU
    return model.eval().requires_grad_(False)


def _load_component(comp: Component, device: str | torch.device, dtype: torch.dtype) -> None:
    """Fill one component's module from its file, strictly, one tensor at a time (cast to dtype on device)."""
    expected = comp.module.state_dict(keep_vars=True)
    state = {}
    for entry in comp.entries:
        tensor = _fitted(entry, comp.source.load(entry.source), expected[entry.target].shape)
        state[entry.target] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    comp.module.load_state_dict(state, strict=True, assign=True)


def check_manifest(manifest_path: str | Path, options: ModelOptions = ModelOptions()) -> dict[str, Any]:
    """Map every key of a manifest of the real files ({"keys": {name: shape}}) onto the full-size model, on meta."""
    path = Path(manifest_path)
    try:
        keys: dict[str, list[int]] = json.loads(path.read_text())["keys"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _fail(path, f"not a key manifest ({exc})") from exc
    supir_prefixes = (ADAPTOR, CONNECTORS, ROBUST_ENCODER)
    sdxl = TensorSource.from_shapes(
        f"{path}[sdxl]", {k: v for k, v in keys.items() if not k.startswith(supir_prefixes)}
    )
    supir = TensorSource.from_shapes(f"{path}[supir]", {k: v for k, v in keys.items() if k.startswith(supir_prefixes)})
    plan = plan_loading(build_empty(spec_from_checkpoint(sdxl, options)), sdxl, supir)
    return {
        "expected": len(keys),
        "loaded": len(plan.used),  # file keys that fill a model tensor
        "ignored": plan.ignored,  # file keys deliberately skipped (IGNORED_KEYS); not counted in "loaded"
        "missing": plan.missing,
        "unused": plan.unused,
        "mismatched": plan.mismatched,
    }


# --------------------------------------------------------------------------------------------
# Variants: another SUPIR file over an SDXL base already in memory


def load_supir_variant(
    base: SupirModel,
    sdxl_path: str | Path,
    supir_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SupirModel:
    """SUPIR from `supir_path` whose SDXL-sourced modules (UNet base, VAE autoencoder, text encoders) are `base`'s
    own objects, so the SDXL weights stay in memory once; only the SUPIR file's tensors are read.

    The plan is load_supir's, made on an empty model of base's spec, so a broken or wrong-kind SUPIR file fails
    with the same WeightsError. `base` is load_supir's model of the same SDXL file, on `device`; speed settings
    (speed.optimize) go on after every variant is loaded.
    """
    sdxl = open_checkpoint(sdxl_path)
    _expect_kind(sdxl, "sdxl")
    supir = open_checkpoint(supir_path)
    _expect_kind(supir, "supir")
    model = build_empty(base.spec)
    plan = plan_loading(model, sdxl, supir)  # every module still on meta: the checks of a load from scratch
    plan.raise_if_broken()
    for comp in plan.components:
        if comp.source is sdxl:
            model.set_submodule(comp.name, base.get_submodule(comp.name))
            continue
        _load_component(comp, device, dtype)
    model.to(device)  # buffers built on the CPU; the shared modules are there already
    return model.eval().requires_grad_(False)
