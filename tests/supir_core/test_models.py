"""Connector semantics and the derived connector table, on small random modules."""

from __future__ import annotations

import torch

from supir_core.models.connectors import ZeroCrossAttn, ZeroSFT
from supir_core.models.unet import UNetSpec

SDXL = UNetSpec(4, 4, (320, 640, 1280), 2, (0, 2, 10), 2048, 2816, 256)


def test_zero_sft_at_scale_zero_is_the_plain_skip_concat() -> None:
    torch.manual_seed(0)
    sft = ZeroSFT(32, 32, 64)
    c, skip, hidden = torch.randn(1, 32, 8, 8), torch.randn(1, 32, 8, 8), torch.randn(1, 64, 8, 8)
    assert torch.equal(sft(c, skip, hidden, scale=0.0), torch.cat([hidden, skip], dim=1))
    middle = ZeroSFT(32, 32, 0)
    assert torch.equal(middle(c, skip, None, scale=0.0), skip)


def test_zero_sft_at_scale_one_is_the_modulated_normalised_concat() -> None:
    torch.manual_seed(0)
    sft = ZeroSFT(32, 32, 64)
    for conv in (sft.zero_mul, sft.zero_add, sft.zero_conv):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    c, skip, hidden = torch.randn(1, 32, 8, 8), torch.randn(1, 32, 8, 8), torch.randn(1, 64, 8, 8)
    expected = sft.param_free_norm(torch.cat([hidden, skip], dim=1))  # zero convs: GN of the raw concat
    torch.testing.assert_close(sft(c, skip, hidden, scale=1.0), expected)


def test_zero_cross_attn_is_residual() -> None:
    torch.manual_seed(0)
    xattn = ZeroCrossAttn(context_dim=64, query_dim=128)
    x, c = torch.randn(2, 128, 4, 4), torch.randn(2, 64, 4, 4)
    assert torch.equal(xattn(c, x, scale=0.0), x)
    assert not torch.allclose(xattn(c, x, scale=1.0), x)
    assert xattn.attn.heads == 2


def test_connector_table_matches_the_official_one() -> None:
    table = [(s.kind, s.control_channels, s.channels, s.concat_channels) for s in SDXL.connector_specs()]
    sft, xattn = "sft", "cross_attn"
    assert table == [
        (sft, 320, 320, 320), (sft, 320, 320, 320), (sft, 320, 320, 640), (xattn, 320, 640, 0),
        (sft, 320, 320, 640), (sft, 640, 640, 640), (sft, 640, 640, 1280), (xattn, 640, 1280, 0),
        (sft, 640, 640, 1280), (sft, 1280, 1280, 1280), (sft, 1280, 1280, 1280), (sft, 1280, 1280, 0),
    ]  # fmt: skip


def test_adaptor_features_have_the_skip_shapes(tiny_model) -> None:
    spec = tiny_model.spec.unet
    x = torch.randn(1, 4, 8, 8)
    feats = tiny_model.adaptor(
        x, torch.tensor([10]), torch.zeros(1, 77, spec.context_dim), torch.zeros(1, spec.adm_in_channels), x
    )
    assert [f.shape[1] for f in feats] == [*spec.skip_channels(), spec.block_channels[-1]]
    assert [f.shape[-1] for f in feats] == [8, 8, 8, 4, 4, 4, 2, 2, 2, 2]


def test_control_scale_zero_is_plain_sdxl(tiny_model) -> None:
    """At α = 0 the connectors vanish: the result equals diffusers' own UNet forward."""
    spec = tiny_model.spec.unet
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([321])
    context, vector = torch.randn(1, 77, spec.context_dim), torch.randn(1, spec.adm_in_channels)
    with torch.no_grad():
        ours = tiny_model.eps(x, t, context, vector, torch.randn(1, 4, 8, 8), control_scale=0.0)
        base = tiny_model.unet.base
        add = base.add_embedding
        # diffusers rebuilds the ADM vector from text_embeds + time_ids; feed it ours through a hook instead
        handle = add.register_forward_hook(lambda m, i, o: add.linear_2(add.act(add.linear_1(vector))))
        pooled = vector[:, : spec.adm_in_channels - 6 * spec.size_embed_dim]
        try:
            theirs = base(
                x,
                t,
                encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.zeros(1, 6)},
            ).sample
        finally:
            handle.remove()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_other_sizes_build_and_run_on_non_square_latents() -> None:
    """Nothing is tied to set A's sizes: another width, depth, head width and VAE run end to end."""
    from supir_core.models.supir import SupirModel, SupirSpec
    from supir_core.models.text import TextSpec
    from supir_core.models.vae import VAESpec

    unet = UNetSpec(4, 4, (64, 96, 128), 2, (0, 1, 3), 48, 16 + 6 * 4, 4, head_width=16)
    text = TextSpec(49408, 77, 16, 2, 32, 32, 2, 64, 16, clip_l_head_width=8, clip_g_head_width=16)
    torch.manual_seed(0)
    model = SupirModel(SupirSpec(unet, VAESpec((32, 64), 1), text)).eval()
    assert len(model.unet.project_modules) == 12
    with torch.no_grad():
        cond = model.text(["a photo", ""])
        assert cond.crossattn.shape == (2, 77, 48) and cond.vector.shape == (2, 40)
        image = torch.rand(2, 3, 64, 96) * 2 - 1
        latent = model.vae.encode_lq(image)
        assert latent.shape == (2, 4, 32, 48)  # two VAE levels: one halving
        x = torch.randn(2, 4, 8, 12)
        eps = model.eps(x, torch.tensor([5, 900]), cond.crossattn, cond.vector, torch.randn(2, 4, 8, 12), 0.7)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
