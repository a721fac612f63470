"""Primus-exact encoder options: ``qkv_bias="qv"``, ``attn_norm``, ``mlp_norm``, ``abs_pos_embed``, ``rope_theta``.

Each option adds exactly its tensors; with all of them on, our encoder computes what a plain re-statement of
Primus' encoder computes (EVA blocks, timm's neighbour-pair RoPE, weights mapped with the per-head row reordering);
the defaults add nothing; old model files of ``primus_*`` MAEs rebuild as they were saved.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from monai_mae import load_mae_encoder
from monai_mae.model_file import build_network, encoder_settings, read_model, save_model
from monai_mae.networks.attention import RoPEAttention
from monai_mae.networks.blocks import EncoderBlock, build_blocks
from monai_mae.networks.encoder import PRIMUS_EXACT
from monai_mae.networks.factory import unetr_encoder_args
from monai_mae.networks.mae import MAEViT
from monai_mae.networks.mlp import GeluMLP, SwiGLU
from monai_mae.networks.presets import MAE_PRESETS, encoder_preset, get_preset, mae_vit, vitseg_preset
from monai_mae.networks.vitseg import ViTSeg

TINY = dict(hidden_size=36, mlp_dim=48, num_layers=2, num_heads=3)  # head width 12: 3D RoPE rotates every channel
TINY_MAE = dict(**TINY, decoder_hidden_size=24, decoder_mlp_dim=32, decoder_num_layers=1, decoder_num_heads=2)
PRIMUS_BLOCKS = dict(pos_embed_type="rope", mlp_type="swiglu", layer_scale_init=0.1)
#: what the ``primus_*`` presets set before the exact options existed (what their old model files record)
OLD_PRIMUS = dict(qkv_bias=True, rope_theta=100.0, attn_norm=False, mlp_norm=False, abs_pos_embed=False)
NEW_KEYS = ("attn_norm", "mlp_norm", "abs_pos_embed")


def keys(net: torch.nn.Module) -> set[str]:
    return set(net.state_dict())


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter (norms, biases, LayerScale included) random, so each one shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)
    return module


# ------------------------------------------------------------------ each option adds exactly its tensors
@pytest.mark.parametrize(
    "option, added, removed",
    [
        ({"attn_norm": True}, {"attn.norm.weight", "attn.norm.bias"}, set()),
        ({"mlp_norm": True}, {"mlp.norm.weight", "mlp.norm.bias"}, set()),
        ({"qkv_bias": "qv"}, {"attn.q_bias", "attn.v_bias"}, {"attn.qkv.bias"}),
    ],
)
def test_block_option_adds_exactly_its_tensors(option, added, removed):
    base = dict(qkv_bias=True, **PRIMUS_BLOCKS)
    with torch.device("meta"):
        plain = ViTSeg(1, 2, 16, **TINY, **base)
        changed = ViTSeg(1, 2, 16, **TINY, **{**base, **option})
    assert keys(changed) - keys(plain) == {f"blocks.{i}.{n}" for i in range(2) for n in added}
    assert keys(plain) - keys(changed) == {f"blocks.{i}.{n}" for i in range(2) for n in removed}
    shapes = {k: tuple(v.shape) for k, v in changed.state_dict().items()}
    width, mlp = TINY["hidden_size"], TINY["mlp_dim"]
    expected = {
        "attn.norm.weight": (width,),
        "mlp.norm.weight": (mlp,),
        "attn.q_bias": (width,),
        "attn.v_bias": (width,),
    }
    for name in added & set(expected):
        assert shapes[f"blocks.1.{name}"] == expected[name]


def test_mae_decoder_blocks_get_the_block_options_too():
    net = MAEViT(1, 16, 8, **TINY_MAE, **PRIMUS_BLOCKS, cls_token=False, **PRIMUS_EXACT)
    names = keys(net)
    for prefix in ("blocks.1", "decoder_blocks.0"):
        assert {f"{prefix}.attn.norm.weight", f"{prefix}.mlp.norm.weight", f"{prefix}.attn.q_bias"} <= names
        assert f"{prefix}.attn.qkv.bias" not in names
    assert net.decoder_rope is not None and net.decoder_rope.freqs[1].item() == pytest.approx(10000 ** (-1 / 2))


def test_abs_pos_embed_makes_the_rope_table_learnable_and_added():
    torch.manual_seed(0)
    plain = ViTSeg(1, 2, 16, **TINY, **PRIMUS_BLOCKS).eval()
    torch.manual_seed(0)
    table = ViTSeg(1, 2, 16, **TINY, **PRIMUS_BLOCKS, abs_pos_embed=True).eval()
    assert keys(table) == keys(plain)  # same tensor, same name: only its role changes
    fixed, learned = plain.patch_embedding.position_embeddings, table.patch_embedding.position_embeddings
    assert not fixed.requires_grad and fixed.abs().sum().item() == 0.0
    assert learned.requires_grad and learned.shape == (1, 8, 36) and 0.005 < learned.std().item() < 0.05
    x = torch.randn(2, 1, 16, 16, 16)
    table.load_state_dict(plain.state_dict())  # zero table: the same network
    torch.testing.assert_close(table(x), plain(x), rtol=0, atol=0)
    with torch.no_grad():
        table.patch_embedding.position_embeddings.normal_()
    assert (table(x) - plain(x)).abs().max().item() > 1e-3  # the table is added
    # the visible-token path adds the rows of the visible patches (what an MAE encodes)
    patches = torch.randn(2, 8, 512)
    indices = torch.tensor([[0, 3, 5], [1, 2, 7]])
    embed = table.patch_embedding
    torch.testing.assert_close(
        embed(patches.gather(1, indices[..., None].expand(-1, -1, 512)), indices, (2, 2, 2)),
        embed.embed_all(patches, (2, 2, 2)).gather(1, indices[..., None].expand(-1, -1, 36)),
    )
    # another input size: the learnable table is interpolated, RoPE needs none
    assert table(torch.randn(1, 1, 24, 16, 32)).shape == (1, 2, 24, 16, 32)


def test_rope_theta_sets_the_frequencies():
    net = ViTSeg(1, 2, 16, **TINY, **PRIMUS_BLOCKS, rope_theta=10000.0)
    pairs = TINY["hidden_size"] // TINY["num_heads"] // 6
    expected = 10000.0 ** (-torch.arange(pairs, dtype=torch.float32) / pairs)
    torch.testing.assert_close(net.rope.freqs, expected)
    assert net.init_args["rope_theta"] == 10000.0


def test_qv_bias_is_a_zero_key_bias_without_a_parameter():
    torch.manual_seed(0)
    qv = randomize_(RoPEAttention(24, 2, qkv_bias="qv")).eval()
    full = RoPEAttention(24, 2, qkv_bias=True).eval()
    with torch.no_grad():
        full.qkv.weight.copy_(qv.qkv.weight)
        full.qkv.bias.copy_(torch.cat([qv.q_bias, torch.zeros(24), qv.v_bias]))
        full.out_proj.load_state_dict(qv.out_proj.state_dict())
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(qv(x), full(x), rtol=0, atol=0)
    keys_part = qv.project_qkv(x)[..., 24:48]
    torch.testing.assert_close(keys_part, x @ qv.qkv.weight[24:48].T)  # no key bias
    qv(x).square().sum().backward()
    assert qv.q_bias.grad.abs().sum() > 0 and qv.v_bias.grad.abs().sum() > 0
    names = {n for n, _ in qv.named_parameters()}
    assert names == {"qkv.weight", "q_bias", "v_bias", "out_proj.weight", "out_proj.bias"}


@pytest.mark.parametrize("mlp_class", [SwiGLU, GeluMLP])
def test_mlp_norm_normalises_the_hidden_units_before_linear2(mlp_class):
    mlp = randomize_(mlp_class(12, 20, norm=True)).eval()
    seen = {}
    mlp.linear2.register_forward_pre_hook(lambda module, args: seen.update(h=args[0]))
    mlp.norm.register_forward_pre_hook(lambda module, args: seen.update(raw=args[0]))
    mlp(torch.randn(3, 4, 12))
    expected = F.layer_norm(seen["raw"], (20,), mlp.norm.weight, mlp.norm.bias)
    torch.testing.assert_close(seen["h"], expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(qkv_bias="k"), "qkv_bias must be False, True or 'qv'"),
        (dict(qkv_bias=1), "qkv_bias must be False, True or 'qv'"),
        (dict(abs_pos_embed=True), "abs_pos_embed=True .* needs pos_embed_type='rope', got pos_embed_type='sincos'"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViTSeg(1, 2, 16, **TINY, **kwargs)


@pytest.mark.parametrize("option", [dict(qkv_bias="qv"), dict(attn_norm=True), dict(mlp_norm=True)])
def test_options_need_encoder_blocks(option):
    with pytest.raises(ValueError, match="need EncoderBlock"):
        build_blocks(1, 12, 16, 2, monai_blocks=True, **option)
    with pytest.raises(ValueError, match="save_attn needs the default blocks"):
        MAEViT(1, 16, 8, **TINY_MAE, save_attn=True, **option)
    # MAEViT's MONAI blocks give way to EncoderBlock for these options, as for RoPE / SwiGLU
    net = MAEViT(1, 16, 8, **TINY_MAE, **option)
    assert all(isinstance(block, EncoderBlock) for block in (*net.blocks, *net.decoder_blocks))


@pytest.mark.parametrize("option", [dict(qkv_bias="qv"), dict(attn_norm=True), dict(abs_pos_embed=True)])
def test_unetr_refuses_primus_options(option):
    settings = dict(hidden_size=48, mlp_dim=96, num_heads=4, num_layers=12, patch_size=16, **option)
    with pytest.raises(ValueError, match=f"{next(iter(option))}"):
        unetr_encoder_args(settings)


# ------------------------------------------------------------------ defaults change nothing
def test_defaults_add_nothing_and_compute_the_plain_block():
    for network in (ViTSeg(1, 2, 16, **TINY), MAEViT(1, 16, 8, **TINY_MAE), ViTSeg(1, 2, 16, **TINY, **PRIMUS_BLOCKS)):
        names = keys(network)
        assert not any(".attn.norm." in k or ".mlp.norm." in k or k.endswith(("q_bias", "v_bias")) for k in names)
        assert {network.init_args[k] for k in NEW_KEYS} == {False}
    block = randomize_(EncoderBlock(12, 20, 2, qkv_bias=True, mlp_type="swiglu", layer_scale_init=0.5)).double()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    torch.testing.assert_close(block(x), reference_block(x, ours_to_reference(block, 2), 2, None))


def test_the_same_seed_draws_the_same_default_network():
    """The options draw nothing when off: a seed gives the same weights with or without naming them off."""
    torch.manual_seed(3)
    implicit = MAEViT(1, 16, 8, **TINY_MAE, **PRIMUS_BLOCKS, cls_token=False)
    torch.manual_seed(3)
    explicit = MAEViT(1, 16, 8, **TINY_MAE, **PRIMUS_BLOCKS, cls_token=False, **{k: False for k in NEW_KEYS})
    assert keys(implicit) == keys(explicit)
    for name, tensor in implicit.state_dict().items():
        torch.testing.assert_close(explicit.state_dict()[name], tensor, rtol=0, atol=0)


# ------------------------------------------------------------------ Primus' forward, restated plainly
def reference_rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """timm's layout: channels ``2i`` and ``2i + 1`` rotate together by ``angles[..., i]``."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)


def reference_block(x: torch.Tensor, p: dict, heads: int, angles: torch.Tensor | None) -> torch.Tensor:
    """A pre-norm EVA block (Primus'), from its definition; ``p`` holds its weights by timm's names."""
    batch, n, width = x.shape
    ln = lambda t, name: F.layer_norm(t, t.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"])  # noqa: E731
    bias = lambda name: p.get(name)  # noqa: E731
    h = ln(x, "norm1")
    q, k, v = (F.linear(h, p[f"attn.{n}_proj.weight"], bias(f"attn.{n}_proj.bias")) for n in "qkv")
    q, k, v = (t.view(batch, n, heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd)
    if angles is not None:
        q, k = reference_rotate(q, angles), reference_rotate(k, angles)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    merged = (weights @ v).transpose(1, 2).reshape(batch, n, width)
    if "attn.norm.weight" in p:
        merged = ln(merged, "attn.norm")
    x = x + p.get("gamma_1", 1.0) * F.linear(merged, p["attn.proj.weight"], p["attn.proj.bias"])
    h = ln(x, "norm2")
    hidden = F.silu(F.linear(h, p["mlp.fc1_g.weight"], p["mlp.fc1_g.bias"])) * F.linear(
        h, p["mlp.fc1_x.weight"], p["mlp.fc1_x.bias"]
    )
    if "mlp.norm.weight" in p:
        hidden = ln(hidden, "mlp.norm")
    return x + p.get("gamma_2", 1.0) * F.linear(hidden, p["mlp.fc2.weight"], p["mlp.fc2.bias"])


def reference_order(head_dim: int) -> torch.Tensor:
    """Our channel for each of timm's channels in a head: timm pairs ``(2i, 2i + 1)`` are our ``(i, R + i)``."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()


def ours_to_reference(block: EncoderBlock, heads: int) -> dict:
    """Our block's weights under timm's names, query and key rows reordered per head (the importer's job)."""
    s = block.state_dict()
    width = s["norm1.weight"].shape[0]
    head_dim = width // heads
    rows = (reference_order(head_dim) + head_dim * torch.arange(heads)[:, None]).flatten()
    w_q, w_k, w_v = s["attn.qkv.weight"].chunk(3)
    p = {k: s[k] for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
    p.update({"attn.q_proj.weight": w_q[rows], "attn.k_proj.weight": w_k[rows], "attn.v_proj.weight": w_v})
    if "attn.q_bias" in s:
        p.update({"attn.q_proj.bias": s["attn.q_bias"][rows], "attn.v_proj.bias": s["attn.v_bias"]})
    elif "attn.qkv.bias" in s:
        b_q, b_k, b_v = s["attn.qkv.bias"].chunk(3)
        p.update({"attn.q_proj.bias": b_q[rows], "attn.k_proj.bias": b_k[rows], "attn.v_proj.bias": b_v})
    p.update({"attn.proj.weight": s["attn.out_proj.weight"], "attn.proj.bias": s["attn.out_proj.bias"]})
    for ours, theirs in (("attn.norm", "attn.norm"), ("mlp.norm", "mlp.norm")):
        if f"{ours}.weight" in s:
            p.update({f"{theirs}.weight": s[f"{ours}.weight"], f"{theirs}.bias": s[f"{ours}.bias"]})
    gate_w, value_w = s["mlp.linear1.weight"].chunk(2)
    gate_b, value_b = s["mlp.linear1.bias"].chunk(2)
    p.update({"mlp.fc1_g.weight": gate_w, "mlp.fc1_g.bias": gate_b, "mlp.fc1_x.weight": value_w})
    p.update({"mlp.fc1_x.bias": value_b, "mlp.fc2.weight": s["mlp.linear2.weight"]})
    p["mlp.fc2.bias"] = s["mlp.linear2.bias"]
    if "ls1.gamma" in s:
        p.update({"gamma_1": s["ls1.gamma"], "gamma_2": s["ls2.gamma"]})
    return p


def reference_angles(grid: tuple[int, ...], head_dim: int, theta: float) -> torch.Tensor:
    """``(N, head_dim // 2)`` rotation angles: per axis (first axis first) ``coordinate * theta ** (-i / pairs)``."""
    pairs = head_dim // (2 * len(grid))
    freqs = theta ** (-torch.arange(pairs, dtype=torch.float64) / pairs)
    coords = torch.stack(torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij"), -1)
    return (coords.reshape(-1, len(grid), 1) * freqs).reshape(-1, len(grid) * pairs)


def test_primus_exact_encoder_computes_primus_forward():
    """Patch projection + absolute table, EVA blocks with neighbour-pair RoPE (base 10000), final norm."""
    heads = TINY["num_heads"]
    net = randomize_(ViTSeg(1, 2, (16, 24, 8), **TINY, **PRIMUS_BLOCKS, **PRIMUS_EXACT)).double().eval()
    x = torch.randn(2, 1, 16, 24, 8, dtype=torch.float64)
    grid = (2, 3, 1)
    conv = net.patch_embedding.patch_embeddings
    tokens = F.conv3d(x, conv.weight, conv.bias, stride=8).flatten(2).transpose(1, 2)  # (B, N, D), row-major grid
    tokens = tokens + net.patch_embedding.position_embeddings
    angles = reference_angles(grid, TINY["hidden_size"] // heads, 10000.0)
    for block in net.blocks:
        tokens = reference_block(tokens, ours_to_reference(block, heads), heads, angles)
    expected = F.layer_norm(tokens, tokens.shape[-1:], net.norm.weight, net.norm.bias)
    torch.testing.assert_close(net.forward_features(x)[0], expected, rtol=1e-10, atol=1e-10)
    # and each option matters: without any one of them the output moves away (far beyond the tolerance above)
    for name, off in (("attn_norm", False), ("mlp_norm", False), ("abs_pos_embed", False), ("rope_theta", 100.0)):
        changed = ViTSeg(1, 2, (16, 24, 8), **TINY, **PRIMUS_BLOCKS, **{**PRIMUS_EXACT, name: off}).double().eval()
        changed.load_state_dict(net.state_dict(), strict=False)
        assert (changed.forward_features(x)[0] - expected).abs().max().item() > 1e-5, name


# ------------------------------------------------------------------ presets are Primus-S/B/M/L
def primus_encoder_parameters(width: int, depth: int, mlp: int, patch: int = 8, channels: int = 1) -> int:
    """Primus' encoder parameters without the position table, counted from its architecture: a conv patch
    embedding with bias; per block two LayerNorms, q/k/v weights with q and v biases, the attention's LayerNorm,
    the output projection, SwiGLU (gate and value layers, LayerNorm, output layer), two LayerScales; a final
    LayerNorm."""
    embed = width * channels * patch**3 + width
    attention = 3 * width * width + 2 * width + 2 * width + width * width + width
    swiglu = 2 * (width * mlp + mlp) + 2 * mlp + mlp * width + width
    block = 2 * width + attention + 2 * width + swiglu + 2 * width
    return embed + depth * block + 2 * width


@pytest.mark.parametrize(
    "name, width, depth, heads, millions",
    [("primus_s", 396, 12, 6, 22.9), ("primus_b", 792, 12, 12, 90.9), ("primus_m", 864, 16, 12, 144.1),
     ("primus_l", 1056, 24, 16, 322.3)],
)  # fmt: skip
def test_presets_have_primus_parameter_counts(name, width, depth, heads, millions):
    with torch.device("meta"):
        seg = vitseg_preset(name, 1, 2, img_size=96)
        mae = mae_vit(name, img_size=96, patch_size=8)
    mlp = width * 8 // 3
    expected = primus_encoder_parameters(width, depth, mlp)
    assert round(expected / 1e6, 1) == millions
    for net in (seg, mae):
        encoder = {k: v for k, v in net.named_parameters() if k.startswith(("patch_embedding.", "blocks.", "norm."))}
        table = encoder.pop("patch_embedding.position_embeddings")
        assert sum(v.numel() for v in encoder.values()) == expected
        assert table.requires_grad and table.shape == (1, 12**3, width)  # Primus' learnable table, 96^3 / 8^3
        assert net.blocks[0].attn.num_heads == heads
    assert encoder_preset(name)["qkv_bias"] == "qv" and get_preset(name)["rope_theta"] == 10000.0


def test_primus_preset_step_on_meta():
    """A full training step of a Primus-exact MAE and ViTSeg on the meta device (no host reads, no memory)."""
    with torch.device("meta"):
        mae = mae_vit("primus_s", img_size=32, patch_size=8, num_layers=2)
        seg = vitseg_preset("primus_s", 1, 3, img_size=32, num_layers=2)
        x = torch.randn(2, 1, 32, 32, 32)
        pred, mask = mae(x)
        (pred.square().mean(-1) * mask).sum().backward()
        seg(x).mean().backward()
    assert pred.shape == (2, 64, 512) and mask.shape == (2, 64)
    for net in (mae, seg):
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
        assert net.blocks[1].attn.q_bias.grad.shape == (396,)


# ------------------------------------------------------------------ model files
def test_options_are_recorded_and_rebuilt(tmp_path):
    net = MAEViT(1, 16, 8, **TINY_MAE, **PRIMUS_BLOCKS, cls_token=False, **PRIMUS_EXACT).eval()
    path = save_model(net, tmp_path / "model.pt")
    assert {k: read_model(path).network[k] for k in PRIMUS_EXACT} == PRIMUS_EXACT
    rebuilt = build_network(path).eval()
    assert keys(rebuilt) == keys(net)
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(rebuilt.forward_encoder(x), net.forward_encoder(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", ["mae", "vitseg"])
def test_old_primus_file_without_the_new_keys_rebuilds_as_before(tmp_path, cls):
    """A ``primus_*`` model file written before the options existed records none of them: it rebuilds without
    them (qkv_bias True, RoPE base 100 as recorded), loads strictly and computes what it computed."""
    if cls == "mae":
        old = mae_vit("primus_s", img_size=16, patch_size=8, num_layers=1, **OLD_PRIMUS).eval()
    else:
        old = vitseg_preset("primus_s", 1, 2, img_size=16, num_layers=1, **OLD_PRIMUS).eval()
    path = save_model(old, tmp_path / "model.pt")
    saved = torch.load(path, weights_only=True)
    for key in NEW_KEYS:  # what a file of the earlier version holds
        del saved["monai_mae"]["network"][key]
    rebuilt = build_network(read_model(saved)).eval()
    assert keys(rebuilt) == keys(old) and "blocks.0.attn.qkv.bias" in keys(rebuilt)
    assert {rebuilt.init_args[k] for k in NEW_KEYS} == {False} and rebuilt.init_args["rope_theta"] == 100.0
    x = torch.randn(1, 1, 16, 16, 16)
    features = lambda net: net.forward_features(x)[0] if cls == "vitseg" else net.forward_encoder(x)  # noqa: E731
    torch.testing.assert_close(features(rebuilt), features(old), rtol=0, atol=0)
    # today's preset of the same name is Primus-exact: the old weights do not fit it
    assert MAE_PRESETS["primus_s"]["attn_norm"] and isinstance(rebuilt.blocks[0].attn.norm, torch.nn.Identity)


def test_a_primus_exact_mae_file_configures_vitseg_with_every_option(tmp_path):
    """encoder_settings carries the Primus-exact options, so the fine-tuning ViTSeg computes what the MAE's encoder
    computes on every token (no class token), with nothing missing."""
    torch.manual_seed(0)
    mae = MAEViT(1, 16, 8, hidden_size=24, mlp_dim=64, num_layers=2, num_heads=2, pos_embed_type="rope",
                 mlp_type="swiglu", layer_scale_init=0.1, cls_token=False, decoder_hidden_size=16, decoder_mlp_dim=32,
                 decoder_num_layers=1, decoder_num_heads=2, **PRIMUS_EXACT)  # fmt: skip
    save_model(mae, tmp_path / "mae.pt")
    settings = encoder_settings(tmp_path / "mae.pt", "vitseg")
    assert {k: settings[k] for k in PRIMUS_EXACT} == PRIMUS_EXACT
    seg = ViTSeg(out_channels=3, img_size=16, **settings).eval()
    report = load_mae_encoder(seg, tmp_path / "mae.pt")
    assert not report.missing
    images = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = mae.eval().forward_encoder(images)  # every token, no class token
        tokens, _ = seg.forward_features(images)
    torch.testing.assert_close(tokens, expected)
