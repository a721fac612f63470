"""Tests of the transformer block options (``monai_mae.networks.blocks``) and of ``MAEViT`` built with them."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock, SABlock, TransformerBlock
from monai.networks.layers import DropPath

from monai_mae.networks.attention import RoPEAttention
from monai_mae.networks.blocks import EncoderBlock, LayerScale, build_blocks, run_blocks
from monai_mae.networks.mae import MAEViT
from monai_mae.networks.mlp import MLP_TYPES, GeluMLP, SwiGLU
from monai_mae.networks.rope import AxialRoPE, apply_rope, apply_rope_qkv, grid_coordinates


# ------------------------------------------------------------------------------------------ helpers
def logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(B, H, M, hd) x (B, H, M, hd) -> (B, H, M, M)`` attention logits in float64."""
    return q.double() @ k.double().transpose(-1, -2)


def drop_probs(blocks: nn.ModuleList) -> list[float]:
    return [blk.drop_path.drop_prob if isinstance(blk.drop_path, DropPath) else 0.0 for blk in blocks]


def randomize_(module: nn.Module, std: float = 0.2) -> nn.Module:
    """Add noise to every parameter (LayerNorm weights and biases too), so no default value hides a bug."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * std)
    return module


# ------------------------------------------------------------------------------- grid_coordinates
def test_grid_coordinates_row_major_3d():
    coords = grid_coordinates((2, 3, 4))
    expected = torch.tensor(list(itertools.product(range(2), range(3), range(4))), dtype=torch.float32)
    assert coords.shape == (1, 24, 3)
    assert coords.dtype == torch.float32
    assert torch.equal(coords[0], expected)
    assert coords[0, :5].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0]]
    assert coords[0, -1].tolist() == [1, 2, 3]


def test_grid_coordinates_given_indices():
    indices = torch.tensor([[0, 5, 23], [13, 1, 12]])
    coords = grid_coordinates((2, 3, 4), indices)
    assert coords.shape == (2, 3, 3)
    expected = [
        [[0, 0, 0], [0, 1, 1], [1, 2, 3]],
        [[1, 0, 1], [0, 0, 1], [1, 0, 0]],
    ]
    assert coords.tolist() == expected
    # the same as gathering from the full table
    full = grid_coordinates((2, 3, 4))[0]
    assert torch.equal(coords, full[indices])


def test_grid_coordinates_2d():
    coords = grid_coordinates((3, 2))
    assert coords.shape == (1, 6, 2)
    assert coords[0].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]
    assert grid_coordinates((3, 2), torch.tensor([[5, 2]])).tolist() == [[[2, 1], [1, 0]]]


# -------------------------------------------------------------------------------------- AxialRoPE
@pytest.mark.parametrize(
    "head_dim, dims, rotated",
    [(12, 3, 6), (6, 3, 3), (8, 3, 3), (10, 3, 3), (16, 3, 6), (8, 2, 4), (6, 2, 2), (4, 2, 2), (16, 2, 8)],
)
def test_rope_shapes(head_dim, dims, rotated):
    rope = AxialRoPE(head_dim, dims)
    assert rope.rotated_pairs == rotated
    coords = grid_coordinates((2,) * dims).expand(3, -1, -1)
    cos, sin = rope(coords)
    assert cos.shape == sin.shape == (3, 1, 2**dims, rotated)
    cos, sin = rope(coords, prefix_tokens=1)
    assert cos.shape == sin.shape == (3, 1, 2**dims + 1, rotated)
    assert "freqs" not in rope.state_dict()  # rebuilt, never saved


def test_rope_frequencies():
    rope = AxialRoPE(12, 3, theta=100.0)  # 2 pairs per axis
    assert torch.allclose(rope.freqs, torch.tensor([1.0, 0.1]))
    # channels of the angle: axis-major, pairs within an axis
    cos, sin = rope(torch.tensor([[[1.0, 2.0, 3.0]]]))
    angles = torch.tensor([1.0, 0.1, 2.0, 0.2, 3.0, 0.3])
    assert torch.allclose(cos[0, 0, 0], angles.cos()) and torch.allclose(sin[0, 0, 0], angles.sin())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_dim=16, spatial_dims=1), "spatial_dims must be 2 or 3, got 1"),
        (dict(head_dim=16, spatial_dims=4), "spatial_dims must be 2 or 3, got 4"),
        (dict(head_dim=5, spatial_dims=3), r"head_dim >= 2 \* spatial_dims = 6, got head_dim=5"),
        (dict(head_dim=3, spatial_dims=2), r"head_dim >= 2 \* spatial_dims = 4, got head_dim=3"),
        (dict(head_dim=12, spatial_dims=3, theta=1.0), "rope_theta must be > 1, got 1.0"),
        (dict(head_dim=12, spatial_dims=3, theta=-5.0), "rope_theta must be > 1, got -5.0"),
    ],
)
def test_rope_invalid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AxialRoPE(**kwargs)


@pytest.mark.parametrize(
    "dims, head_dim, shift",
    [(2, 8, (3, -2)), (2, 12, (7, 5)), (3, 12, (1, 2, 3)), (3, 6, (-4, 0, 9)), (3, 18, (5, 5, -5))],
)
def test_rope_logits_depend_on_coordinate_difference_only(dims, head_dim, shift):
    torch.manual_seed(dims * 100 + head_dim)
    rope = AxialRoPE(head_dim, dims, theta=10.0)
    q, k = torch.randn(2, 3, 10, head_dim), torch.randn(2, 3, 10, head_dim)
    coords = torch.randint(0, 6, (2, 10, dims)).float()
    shifted = coords + torch.tensor(shift, dtype=torch.float32)
    here, there = rope(coords), rope(shifted)
    before = logits(apply_rope(q, here), apply_rope(k, here))
    after = logits(apply_rope(q, there), apply_rope(k, there))
    assert torch.allclose(before, after, atol=1e-4)
    # ... while the logits do depend on the positions (the rotation is not trivial)
    moved = rope(coords.flip(1))
    assert not torch.allclose(before, logits(apply_rope(q, moved), apply_rope(k, moved)), atol=1e-2)
    # rotation keeps each vector's norm
    assert torch.allclose(apply_rope(q, here).norm(dim=-1), q.norm(dim=-1), atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_rope_logit_is_function_of_offset(dims):
    """A single q/k pair: the logit for positions (a, b) equals the one for (a + s, b + s), for many s."""
    torch.manual_seed(dims)
    rope = AxialRoPE(4 * dims, dims)
    q, k = torch.randn(1, 1, 1, 4 * dims), torch.randn(1, 1, 1, 4 * dims)
    offset = torch.tensor([[[2.0, -1.0, 3.0][:dims]]])
    values = []
    for start in ([0, 0, 0], [5, 1, 2], [-3, 7, 11], [20, 20, 20]):
        a = torch.tensor([[start[:dims]]], dtype=torch.float32)
        qa = apply_rope(q, rope(a))
        kb = apply_rope(k, rope(a + offset))
        values.append(float((qa * kb).sum()))
    assert values == pytest.approx([values[0]] * len(values), abs=1e-4)


@pytest.mark.parametrize("prefix", [1, 2])
def test_rope_prefix_tokens_not_rotated(prefix):
    rope = AxialRoPE(12, 3)
    coords = grid_coordinates((2, 2, 3))
    cos, sin = rope(coords, prefix_tokens=prefix)
    assert torch.equal(cos[:, :, :prefix], torch.ones_like(cos[:, :, :prefix]))
    assert torch.equal(sin[:, :, :prefix], torch.zeros_like(sin[:, :, :prefix]))
    # the other tokens get the same values as without a prefix
    cos0, sin0 = rope(coords)
    assert torch.equal(cos[:, :, prefix:], cos0) and torch.equal(sin[:, :, prefix:], sin0)
    x = torch.randn(2, 4, prefix + 12, 12)
    rotated = apply_rope(x, (cos, sin))
    assert torch.equal(rotated[:, :, :prefix], x[:, :, :prefix])
    assert not torch.allclose(rotated[:, :, prefix + 1 :], x[:, :, prefix + 1 :])


@pytest.mark.parametrize(
    "head_dim, dims, passed", [(8, 3, 2), (10, 3, 4), (16, 3, 4), (6, 2, 2), (10, 2, 2), (7, 3, 1)]
)
def test_rope_leftover_channels_pass_unchanged(head_dim, dims, passed):
    rope = AxialRoPE(head_dim, dims)
    assert head_dim - 2 * rope.rotated_pairs == passed
    x = torch.randn(2, 3, 2**dims, head_dim)
    coords = grid_coordinates((2,) * dims) + 1.0  # no zero angle anywhere
    out = apply_rope(x, rope(coords.expand(2, -1, -1)))
    assert out.shape == x.shape
    assert torch.equal(out[..., -passed:], x[..., -passed:])
    assert not torch.allclose(out[..., : 2 * rope.rotated_pairs], x[..., : 2 * rope.rotated_pairs])


def test_apply_rope_pairs_channel_j_with_r_plus_j():
    r = 3
    cos, sin = torch.full((1, 1, 1, r), 0.0), torch.full((1, 1, 1, r), 1.0)  # rotation by 90 degrees
    x = torch.arange(1.0, 7.0).view(1, 1, 1, 6)  # (x1 | x2) = (1 2 3 | 4 5 6)
    out = apply_rope(x, (cos, sin))
    assert out.flatten().tolist() == [-4.0, -5.0, -6.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_apply_rope_keeps_dtype_and_zero_angle_is_identity(dtype):
    rope = AxialRoPE(12, 3)
    x = torch.randn(1, 2, 8, 12).to(dtype)
    out = apply_rope(x, rope(torch.zeros(1, 8, 3)))
    assert out.dtype == dtype
    assert torch.equal(out, x)


# ------------------------------------------------------------------ straightforward references
# The blocks are written for speed (rotation into SDPA's layout, fused SDPA, split SwiGLU products);
# these are the plain formulas they must match, values and gradients, with the same weights.
def reference_rope(x: torch.Tensor, rope) -> torch.Tensor:
    cos, sin = rope
    r = cos.shape[-1]
    x1, x2, rest = x[..., :r], x[..., r : 2 * r], x[..., 2 * r :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def reference_attention(attn: RoPEAttention, x: torch.Tensor, rope=None) -> torch.Tensor:
    """Explicit softmax attention with ``attn``'s weights: ``(B, M, D)`` -> ``(B, M, D)``."""
    batch, n_tokens, width = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(batch, n_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    if rope is not None:
        q, k = reference_rope(q, rope), reference_rope(k, rope)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(dim=-1)
    return attn.out_proj((weights @ v).transpose(1, 2).reshape(batch, n_tokens, width))


def reference_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    hidden = mlp.linear1(x)
    if isinstance(mlp, SwiGLU):
        gate, value = hidden.chunk(2, dim=-1)
        return mlp.linear2(F.silu(gate) * value)
    return mlp.linear2(F.gelu(hidden))


def reference_block(block: EncoderBlock, x: torch.Tensor, rope=None) -> torch.Tensor:
    """``x + ls1 * attn(norm1(x))``, then ``+ ls2 * mlp(norm2(.))`` (no LayerScale: factor 1)."""
    g1 = block.ls1.gamma if isinstance(block.ls1, LayerScale) else 1.0
    g2 = block.ls2.gamma if isinstance(block.ls2, LayerScale) else 1.0
    h = x + g1 * reference_attention(block.attn, block.norm1(x), rope)
    return h + g2 * reference_mlp(block.mlp, block.norm2(h))


def values_and_grads(fn, inputs: list[torch.Tensor], module: nn.Module | None = None, seed: int = 0):
    """``fn()`` and the gradients of a fixed random projection of it w.r.t. ``inputs`` and ``module``'s parameters."""
    out = fn()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    grads = torch.autograd.grad((out * weights).sum(), [*inputs, *params])
    return out, grads


def assert_same(ours, ref, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Values and gradients agree; ``atol`` applies to each tensor scaled to a largest entry of at most 1
    (the gradients of the randomized weights reach tens, where float32 rounding alone exceeds 1e-5)."""
    (out, grads), (ref_out, ref_grads) = ours, ref
    assert len(grads) == len(ref_grads)
    for value, ref_value in zip([out, *grads], [ref_out, *ref_grads]):
        scale = max(1.0, ref_value.abs().max().item())
        torch.testing.assert_close(value, ref_value, atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize(
    "head_dim, dims, prefix", [(12, 3, 0), (10, 3, 1), (16, 3, 0), (8, 2, 2), (10, 2, 0), (7, 3, 1)]
)
def test_apply_rope_matches_reference_values_and_gradients(head_dim, dims, prefix):
    torch.manual_seed(head_dim + dims)
    rope = AxialRoPE(head_dim, dims, theta=10.0)(torch.randint(0, 7, (2, 9, dims)).float(), prefix_tokens=prefix)
    x = torch.randn(2, 3, 9 + prefix, head_dim, requires_grad=True)
    ours = values_and_grads(lambda: apply_rope(x, rope), [x])
    assert_same(ours, values_and_grads(lambda: reference_rope(x, rope), [x]), atol=1e-6)
    assert apply_rope(x, rope).is_contiguous()
    # strided input (a view), as inside attention
    base = torch.randn(2, 9 + prefix, 3, head_dim * 2, requires_grad=True)
    view = base[..., :head_dim].transpose(1, 2)
    ours = values_and_grads(lambda: apply_rope(view, rope), [base])
    assert_same(ours, values_and_grads(lambda: reference_rope(view, rope), [base]), atol=1e-6)


def test_apply_rope_gradcheck():
    rope = AxialRoPE(10, 3)(torch.randint(0, 5, (1, 4, 3)).float(), prefix_tokens=1)
    rope = tuple(t.double() for t in rope)
    x = torch.randn(1, 2, 5, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, rope), (x,))
    qkv = torch.randn(1, 5, 3, 2, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope_qkv(t, rope), (qkv,))


@pytest.mark.slow  # inductor runs the C++ compiler in subprocesses
def test_torch_compile_rope_training_step_matches_eager(cxx_compiler):
    torch._dynamo.reset()
    torch.manual_seed(16)
    net = MAEViT(1, 16, 8, hidden_size=24, mlp_dim=32, num_layers=1, num_heads=2, decoder_hidden_size=24,
                 decoder_mlp_dim=32, decoder_num_layers=1, decoder_num_heads=2, pos_embed_type="rope",
                 mlp_type="swiglu", layer_scale_init=0.1)  # fmt: skip
    x = torch.rand(2, 1, 16, 16, 16)
    mask = torch.zeros(2, 8)
    mask[:, :6] = 1.0

    def grads(model):
        net.zero_grad()
        pred, _ = model(x, mask=mask)
        ((pred - 0.5).square() * mask[..., None]).mean().backward()
        return [p.grad.clone() for p in net.parameters() if p.grad is not None]

    try:
        eager = grads(net)
        compiled = grads(torch.compile(net))
    finally:
        torch._dynamo.reset()
    assert len(eager) == len(compiled)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("head_dim, prefix", [(12, 0), (10, 1), (6, 0)])
def test_apply_rope_qkv_equals_rope_on_queries_and_keys(head_dim, prefix):
    torch.manual_seed(head_dim)
    batch, tokens, heads = 2, 6 + prefix, 3
    rope = AxialRoPE(head_dim, 3)(torch.randint(0, 4, (batch, 6, 3)).float(), prefix_tokens=prefix)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, requires_grad=True)
    out = apply_rope_qkv(qkv, rope)
    assert out.shape == (3, batch, heads, tokens, head_dim) and out.is_contiguous()

    def reference():
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return torch.stack([reference_rope(q, rope), reference_rope(k, rope), v])

    ours = values_and_grads(lambda: apply_rope_qkv(qkv, rope), [qkv])
    assert_same(ours, values_and_grads(reference, [qkv]), atol=1e-6)
    assert torch.equal(out[2], qkv.permute(2, 0, 3, 1, 4)[2])  # values pass unchanged
    # a token-major view of a wider projection (how attention calls it)
    wide = torch.randn(batch, tokens, 3 * heads * head_dim + 5, requires_grad=True)
    view = wide[..., 5:].view(batch, tokens, 3, heads, head_dim)
    assert torch.equal(apply_rope_qkv(view, rope), apply_rope_qkv(view.contiguous(), rope))
    grad = torch.autograd.grad(apply_rope_qkv(view, rope).square().sum(), wide)[0]
    assert torch.equal(grad[..., :5], torch.zeros_like(grad[..., :5]))
    ref_grad = torch.autograd.grad(apply_rope_qkv(view.contiguous(), rope).square().sum(), wide)[0]
    assert torch.equal(grad, ref_grad)


@pytest.mark.parametrize("qkv", [False, True])
def test_apply_rope_bfloat16_in_float32(qkv):
    torch.manual_seed(11)
    rope = AxialRoPE(12, 3)(torch.randint(0, 8, (1, 5, 3)).float())
    shape = (1, 5, 3, 2, 12) if qkv else (1, 2, 5, 12)
    x = torch.randn(shape)
    fn = apply_rope_qkv if qkv else apply_rope
    low = x.bfloat16().requires_grad_()
    out = fn(low, rope)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fn(low.detach().float(), rope).bfloat16())  # rotated in float32, rounded once
    out.float().sum().backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()


@pytest.mark.parametrize(
    "use_rope, prefix, qkv_bias", [(False, 0, True), (True, 0, True), (True, 1, False), (False, 1, False)]
)
def test_rope_attention_matches_reference(use_rope, prefix, qkv_bias):
    torch.manual_seed(12 + prefix)
    attn = randomize_(RoPEAttention(36, 3, qkv_bias=qkv_bias)).eval()
    rope = AxialRoPE(12, 3)(grid_coordinates((2, 2, 3)), prefix_tokens=prefix) if use_rope else None
    x = torch.randn(2, 12 + prefix, 36, requires_grad=True)
    ours = values_and_grads(lambda: attn(x, rope), [x], attn)
    assert_same(ours, values_and_grads(lambda: reference_attention(attn, x, rope), [x], attn))


@pytest.mark.parametrize("mlp_class", [SwiGLU, GeluMLP])
def test_mlp_matches_reference_values_and_gradients(mlp_class):
    torch.manual_seed(13)
    mlp = randomize_(mlp_class(16, 24)).eval()
    x = torch.randn(2, 5, 16, requires_grad=True)
    assert_same(values_and_grads(lambda: mlp(x), [x], mlp), values_and_grads(lambda: reference_mlp(mlp, x), [x], mlp))


@pytest.mark.parametrize(
    "options, use_rope",
    [(dict(), False), (dict(mlp_type="swiglu", layer_scale_init=0.1), True), (dict(layer_scale_init=0.5), True),
     (dict(mlp_type="swiglu"), False)],
)  # fmt: skip
def test_encoder_block_matches_reference(options, use_rope):
    torch.manual_seed(14)
    block = randomize_(EncoderBlock(36, 48, 3, qkv_bias=True, **options)).eval()
    rope = AxialRoPE(12, 3)(grid_coordinates((2, 2, 4))) if use_rope else None
    x = torch.randn(2, 16, 36, requires_grad=True)
    ours = values_and_grads(lambda: block(x, rope), [x], block)
    # the reference in float64 (the exact values, up to float32 rounding of ours)
    block64, x64 = copy.deepcopy(block).double(), x.detach().double().requires_grad_()
    rope64 = tuple(t.double() for t in rope) if use_rope else None
    out64, grads64 = values_and_grads(lambda: reference_block(block64, x64, rope64), [x64], block64)
    assert_same(ours, (out64.float(), [g.float() for g in grads64]))


# ---------------------------------------------------------------------------------- RoPEAttention
def test_rope_attention_matches_monai_sablock():
    torch.manual_seed(3)
    monai_attn = randomize_(SABlock(24, 4, qkv_bias=True)).eval()
    ours = RoPEAttention(24, 4, qkv_bias=True).eval()
    ours.load_state_dict(monai_attn.state_dict())
    x = torch.randn(2, 7, 24)
    assert torch.allclose(ours(x), monai_attn(x), atol=1e-6)


def test_rope_attention_invalid_heads():
    with pytest.raises(ValueError, match="hidden_size=20 must be divisible by num_heads=3"):
        RoPEAttention(20, 3)


@pytest.mark.parametrize("dims", [2, 3])
def test_rope_attention_translation_invariant_and_permutation_equivariant(dims):
    torch.manual_seed(4)
    attn = RoPEAttention(24, 2, qkv_bias=True).eval()
    rope = AxialRoPE(12, dims)
    x = torch.randn(1, 8, 24)
    coords = grid_coordinates((2, 2, 2) if dims == 3 else (2, 4))  # 8 tokens
    out = attn(x, rope(coords))
    assert out.shape == (1, 8, 24)
    # the whole grid moved: same output
    assert torch.allclose(attn(x, rope(coords + 3.0)), out, atol=1e-5)
    # tokens permuted together with their coordinates: output permuted alike
    perm = torch.randperm(8)
    assert torch.allclose(attn(x[:, perm], rope(coords[:, perm])), out[:, perm], atol=1e-5)
    # positions matter: another position of the same contents gives another output
    assert not torch.allclose(attn(x[:, perm], rope(coords)), out[:, perm], atol=1e-3)


# ---------------------------------------------------------------------------------- MLPs, LayerScale
def test_gelu_mlp_matches_monai_mlpblock():
    monai_mlp = randomize_(MLPBlock(16, 40, 0.0)).eval()
    ours = GeluMLP(16, 40).eval()
    ours.load_state_dict(monai_mlp.state_dict())
    x = torch.randn(2, 5, 16)
    assert torch.allclose(ours(x), monai_mlp(x), atol=1e-6)


def test_swiglu_value_and_shapes():
    mlp = SwiGLU(16, 24).eval()
    assert mlp.linear1.weight.shape == (48, 16)
    assert mlp.linear2.weight.shape == (16, 24)
    x = torch.randn(2, 5, 16)
    hidden = x @ mlp.linear1.weight.T + mlp.linear1.bias
    gate, value = hidden[..., :24], hidden[..., 24:]
    expected = (gate * torch.sigmoid(gate) * value) @ mlp.linear2.weight.T + mlp.linear2.bias
    out = mlp(x)
    assert out.shape == (2, 5, 16)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("init", [1e-5, 0.1, 1.0, 2])
def test_layer_scale(init):
    scale = LayerScale(8, init)
    assert scale.gamma.shape == (8,)
    assert torch.equal(scale.gamma.detach(), torch.full((8,), float(init)))
    x = torch.randn(3, 4, 8)
    assert torch.allclose(scale(x), x * init)
    with torch.no_grad():
        scale.gamma.copy_(torch.arange(8.0))
    assert torch.equal(scale(x), x * torch.arange(8.0))


# ---------------------------------------------------------------------------------- EncoderBlock
@pytest.mark.parametrize(
    "hidden, mlp, heads, qkv_bias",
    [(16, 32, 4, True), (16, 32, 4, False), (24, 48, 2, True), (48, 64, 3, False), (32, 16, 1, True)],
)
def test_encoder_block_equals_monai_transformer_block(hidden, mlp, heads, qkv_bias):
    torch.manual_seed(hidden + heads)
    monai_block = randomize_(TransformerBlock(hidden, mlp, heads, 0.0, qkv_bias)).eval()
    ours = EncoderBlock(hidden, mlp, heads, 0.0, qkv_bias).eval()
    result = ours.load_state_dict(monai_block.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == ["norm_cross_attn.bias", "norm_cross_attn.weight"]
    x = torch.randn(2, 9, hidden)
    assert torch.allclose(ours(x), monai_block(x), atol=1e-5)
    # same parameter names (all of MONAI's but the cross-attention norm)
    monai_keys = {k for k in monai_block.state_dict() if not k.startswith("norm_cross_attn.")}
    assert set(ours.state_dict()) == monai_keys


def test_encoder_block_option_keys_and_shapes():
    block = EncoderBlock(16, 24, 4, mlp_type="swiglu", layer_scale_init=0.1, drop_path=0.2)
    state = block.state_dict()
    assert state["ls1.gamma"].shape == state["ls2.gamma"].shape == (16,)
    assert torch.equal(state["ls1.gamma"], torch.full((16,), 0.1))
    assert state["mlp.linear1.weight"].shape == (48, 16)
    assert state["mlp.linear2.weight"].shape == (16, 24)
    assert isinstance(block.drop_path, DropPath) and block.drop_path.drop_prob == 0.2
    plain = EncoderBlock(16, 24, 4)
    assert isinstance(plain.ls1, nn.Identity) and isinstance(plain.drop_path, nn.Identity)
    assert set(state) - set(plain.state_dict()) == {"ls1.gamma", "ls2.gamma"}
    assert block(torch.randn(2, 5, 16)).shape == (2, 5, 16)


def test_encoder_block_tiny_layer_scale_is_near_identity():
    block = EncoderBlock(16, 32, 4, layer_scale_init=1e-6).eval()
    x = torch.randn(2, 5, 16)
    assert torch.allclose(block(x), x, atol=1e-4)
    assert not torch.equal(block(x), x)


def test_encoder_block_value_by_hand():
    """The block is ``x + ls1(attn(norm1(x), rope))``, then ``+ ls2(mlp(norm2(.)))``."""
    torch.manual_seed(5)
    block = randomize_(EncoderBlock(24, 32, 2, qkv_bias=True, mlp_type="swiglu", layer_scale_init=0.5)).eval()
    rope = AxialRoPE(12, 3)(grid_coordinates((2, 2, 2)))
    x = torch.randn(1, 8, 24)
    h = x + block.ls1.gamma * block.attn(block.norm1(x), rope)
    expected = h + block.ls2.gamma * block.mlp(block.norm2(h))
    assert torch.allclose(block(x, rope), expected, atol=1e-6)
    # without rope the attention is position-blind: permuting tokens permutes outputs
    perm = torch.randperm(8)
    assert torch.allclose(block(x[:, perm]), block(x)[:, perm], atol=1e-5)


def test_encoder_block_drop_path_train_vs_eval():
    torch.manual_seed(6)
    block = EncoderBlock(16, 32, 4, drop_path=0.5)
    x = torch.randn(64, 3, 16)
    block.eval()
    assert torch.equal(block(x), block(x))
    block.train()
    a, b = block(x), block(x)
    assert not torch.allclose(a, b)
    # some samples drop both branches (output = input exactly); in eval mode none does
    assert (a == x).flatten(1).all(dim=1).any()
    block.eval()
    assert not (block(x) == x).flatten(1).all(dim=1).any()


# ---------------------------------------------------------------------------------- build / run
@pytest.mark.parametrize(
    "layers, rate, expected",
    [
        (4, 0.3, [0.0, 0.1, 0.2, 0.3]),
        (3, 0.2, [0.0, 0.1, 0.2]),
        (2, 0.5, [0.0, 0.5]),
        (1, 0.4, [0.0]),
        (3, 0.0, [0.0] * 3),
    ],
)
def test_build_blocks_drop_path_linear(layers, rate, expected):
    blocks = build_blocks(layers, 16, 32, 4, drop_path_rate=rate)
    assert len(blocks) == layers
    assert all(isinstance(b, EncoderBlock) for b in blocks)
    assert drop_probs(blocks) == pytest.approx(expected)
    if rate == 0:
        assert all(isinstance(b.drop_path, nn.Identity) for b in blocks)


def test_build_blocks_monai():
    blocks = build_blocks(2, 16, 32, 4, qkv_bias=True, monai_blocks=True)
    assert all(isinstance(b, TransformerBlock) for b in blocks)
    assert blocks[0].attn.qkv.bias is not None
    assert MLP_TYPES == ("gelu", "swiglu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mlp_type="relu"), "'relu' is not a valid value"),
        (dict(layer_scale_init=0.0), "layer_scale_init must be None or a positive number, got 0.0"),
        (dict(layer_scale_init=-0.1), "layer_scale_init must be None or a positive number, got -0.1"),
        (dict(layer_scale_init="0.1"), "layer_scale_init must be None or a positive number, got '0.1'"),
        (dict(drop_path_rate=-0.1), r"drop_path_rate must be in \[0, 1\), got -0.1"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
        (dict(monai_blocks=True, mlp_type="swiglu"), "need EncoderBlock, not MONAI's TransformerBlock"),
        (dict(monai_blocks=True, layer_scale_init=0.1), "need EncoderBlock, not MONAI's TransformerBlock"),
        (dict(monai_blocks=True, drop_path_rate=0.1), "need EncoderBlock, not MONAI's TransformerBlock"),
    ],
)
def test_build_blocks_invalid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_blocks(2, 16, 32, 4, **kwargs)


@pytest.mark.parametrize("use_rope", [False, True])
def test_run_blocks_sequential_and_checkpointing(use_rope):
    torch.manual_seed(7)
    blocks = build_blocks(2, 24, 32, 2, qkv_bias=True, mlp_type="swiglu", layer_scale_init=0.5)
    randomize_(blocks)
    rope = AxialRoPE(12, 3)(grid_coordinates((2, 2, 2))) if use_rope else None
    x = torch.randn(2, 8, 24, requires_grad=True)
    expected = x
    for block in blocks:
        expected = block(expected, rope)
    plain = run_blocks(blocks, x, rope)
    assert torch.equal(plain, expected)
    grads_plain = torch.autograd.grad(plain.square().sum(), [x, *blocks.parameters()])
    checkpointed = run_blocks(blocks, x, rope, checkpointing=True)
    assert torch.allclose(checkpointed, plain, atol=1e-6)
    grads_ckpt = torch.autograd.grad(checkpointed.square().sum(), [x, *blocks.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_plain, grads_ckpt))


def test_run_blocks_monai_blocks_without_rope():
    blocks = build_blocks(2, 16, 32, 4, monai_blocks=True).eval()
    x = torch.randn(1, 4, 16)
    assert torch.equal(run_blocks(blocks, x), blocks[1](blocks[0](x)))


# ------------------------------------------------------------------------------- MAEViT options
SMALL = dict(hidden_size=24, mlp_dim=32, num_layers=2, num_heads=2, decoder_hidden_size=16, decoder_mlp_dim=24,
             decoder_num_layers=1, decoder_num_heads=2)  # fmt: skip
OPTIONS = {
    "rope": dict(pos_embed_type="rope"),
    "swiglu": dict(mlp_type="swiglu"),
    "layerscale": dict(layer_scale_init=0.1),
    "droppath": dict(drop_path_rate=0.2),
    "no_cls": dict(cls_token=False),
    "all": dict(pos_embed_type="rope", mlp_type="swiglu", layer_scale_init=0.1, drop_path_rate=0.1, cls_token=False),
}
GEOMETRY = {
    3: dict(in_channels=1, img_size=(16, 16, 16), patch_size=(8, 8, 4), spatial_dims=3),
    2: dict(in_channels=2, img_size=(32, 16), patch_size=8, spatial_dims=2),
}


def small_mae(dims: int, **kw) -> MAEViT:
    return MAEViT(**{**GEOMETRY[dims], **SMALL, **kw})


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_mae_option_forward_backward(option, dims):
    torch.manual_seed(8)
    net = small_mae(dims, **OPTIONS[option])
    geo = GEOMETRY[dims]
    x = torch.randn(2, geo["in_channels"], *geo["img_size"])
    n_tokens = math.prod(net.grid_size)
    assert n_tokens == (16 if dims == 3 else 8)
    pred, mask = net(x)
    assert pred.shape == (2, n_tokens, math.prod(net.patch_size) * geo["in_channels"])
    assert mask.shape == (2, n_tokens)
    n_masked = n_tokens - int(n_tokens * 0.25)
    assert mask.sum(dim=1).tolist() == [n_masked, n_masked]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    pred.square().mean().backward()
    trainable = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    assert trainable
    for name, param in trainable:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for _, p in trainable if _.startswith("blocks."))


@pytest.mark.parametrize("dims", [2, 3])
def test_mae_option_block_types(dims):
    default = small_mae(dims)
    assert all(isinstance(b, TransformerBlock) for b in [*default.blocks, *default.decoder_blocks])
    assert default.rope is None and default.decoder_rope is None
    for option, kwargs in OPTIONS.items():
        net = small_mae(dims, **kwargs)
        expected = TransformerBlock if option == "no_cls" else EncoderBlock
        assert all(isinstance(b, expected) for b in [*net.blocks, *net.decoder_blocks]), option


def test_mae_option_state_dict_keys():
    hidden, mlp, dec_hidden, dec_mlp = (
        SMALL["hidden_size"],
        SMALL["mlp_dim"],
        SMALL["decoder_hidden_size"],
        SMALL["decoder_mlp_dim"],
    )
    state = small_mae(3, layer_scale_init=0.1).state_dict()
    for key in ("blocks.0.ls1.gamma", "blocks.1.ls2.gamma", "decoder_blocks.0.ls1.gamma", "decoder_blocks.0.ls2.gamma"):
        assert key in state
        assert torch.equal(state[key], torch.full_like(state[key], 0.1))
    assert not any("norm_cross_attn" in k for k in state)  # EncoderBlock has none

    state = small_mae(3, mlp_type="swiglu").state_dict()
    assert state["blocks.0.mlp.linear1.weight"].shape == (2 * mlp, hidden)
    assert state["blocks.0.mlp.linear1.bias"].shape == (2 * mlp,)
    assert state["blocks.1.mlp.linear2.weight"].shape == (hidden, mlp)
    assert state["decoder_blocks.0.mlp.linear1.weight"].shape == (2 * dec_mlp, dec_hidden)
    assert not any(".ls1." in k for k in state)
    default = small_mae(3).state_dict()
    assert default["blocks.0.mlp.linear1.weight"].shape == (mlp, hidden)
    assert set(state) == {k for k in default if "norm_cross_attn" not in k}

    net = small_mae(3, pos_embed_type="rope")
    state = net.state_dict()
    assert not any("rope" in k for k in state)  # frequencies are not saved
    table = net.patch_embedding.position_embeddings
    assert not table.requires_grad and torch.equal(table, torch.zeros_like(table))

    net = small_mae(3, cls_token=False)
    assert net.cls_token is None and "cls_token" not in net.state_dict()
    assert "cls_token" in small_mae(3).state_dict()


def test_mae_drop_path_rates_rise_linearly():
    net = small_mae(3, num_layers=4, drop_path_rate=0.3)
    assert drop_probs(net.blocks) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(isinstance(b.drop_path, nn.Identity) for b in net.decoder_blocks)  # encoder only


@pytest.mark.parametrize("dims", [2, 3])
def test_mae_drop_path_inactive_in_eval(dims):
    torch.manual_seed(9)
    net = small_mae(dims, drop_path_rate=0.5, num_layers=2)
    geo = GEOMETRY[dims]
    x = torch.randn(4, geo["in_channels"], *geo["img_size"])
    n_tokens = math.prod(net.grid_size)
    mask = torch.zeros(4, n_tokens)
    mask[:, : n_tokens // 2] = 1
    net.eval()
    first, _ = net(x, mask=mask)
    second, _ = net(x, mask=mask)
    assert torch.equal(first, second)
    net.train()
    train_a, mask_a = net(x, mask=mask)
    train_b, _ = net(x, mask=mask)
    assert torch.equal(mask_a, mask)
    assert not torch.allclose(train_a, train_b)


@pytest.mark.parametrize(
    "dims, size, grid",
    [(3, (32, 16, 8), (4, 2, 2)), (3, (8, 24, 16), (1, 3, 4)), (2, (16, 48), (2, 6)), (2, (8, 16), (1, 2))],
)
def test_mae_rope_other_input_size(dims, size, grid):
    net = small_mae(dims, pos_embed_type="rope", cls_token=dims == 3)
    geo = GEOMETRY[dims]
    x = torch.randn(1, geo["in_channels"], *size)
    n_tokens = math.prod(grid)
    pred, mask = net(x, masking_ratio=0.5)
    assert pred.shape == (1, n_tokens, math.prod(net.patch_size) * geo["in_channels"])
    assert mask.shape == (1, n_tokens)
    features = net.forward_encoder(x)
    assert features.shape == (1, net.num_prefix_tokens + n_tokens, SMALL["hidden_size"])


def test_mae_rope_visible_tokens_get_their_grid_coordinates():
    """The encoder rotates each visible token by its own grid position, the class token by none."""
    net = small_mae(3, pos_embed_type="rope")
    indices = torch.tensor([[0, 3, 9, 14], [1, 2, 7, 15]])
    cos, sin = net._rope(net.rope, net.grid_size, indices, torch.device("cpu"))
    full_cos, full_sin = net._rope(net.rope, net.grid_size, None, torch.device("cpu"))
    assert cos.shape == (2, 1, 5, net.rope.rotated_pairs)
    assert torch.equal(cos[:, 0, 0], torch.ones_like(cos[:, 0, 0])) and torch.equal(
        sin[:, 0, 0], torch.zeros_like(sin[:, 0, 0])
    )
    for b in range(2):
        assert torch.equal(cos[b, 0, 1:], full_cos[0, 0, 1:][indices[b]])
        assert torch.equal(sin[b, 0, 1:], full_sin[0, 0, 1:][indices[b]])


@pytest.mark.parametrize("option", ["rope", "swiglu", "layerscale", "droppath", "all"])
def test_mae_save_attn_with_options_raises(option):
    with pytest.raises(ValueError, match="save_attn needs the default blocks"):
        small_mae(3, save_attn=True, **OPTIONS[option])


def test_mae_save_attn_without_class_token_is_fine():
    net = small_mae(3, save_attn=True, cls_token=False)
    net(torch.randn(1, 1, 16, 16, 16))
    assert net.blocks[0].attn.att_mat.shape == (1, 2, 4, 4)  # 4 visible tokens, no class token


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mlp_type="geglu"), "'geglu' is not a valid value"),
        (dict(layer_scale_init=0), "layer_scale_init must be None or a positive number, got 0"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\), got 1.0"),
        (dict(drop_path_rate=-0.5), r"drop_path_rate must be in \[0, 1\), got -0.5"),
        (dict(pos_embed_type="rope", rope_theta=0.5), "rope_theta must be > 1, got 0.5"),
        (dict(pos_embed_type="rope", hidden_size=8, num_heads=4), r"head_dim >= 2 \* spatial_dims = 6, got head_dim=2"),
        (
            dict(pos_embed_type="rope", decoder_hidden_size=8, decoder_num_heads=2),
            r"head_dim >= 2 \* spatial_dims = 6, got head_dim=4",
        ),  # fmt: skip
    ],
)
def test_mae_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_mae(3, **kwargs)


def test_mae_state_dict_round_trip_with_options():
    torch.manual_seed(10)
    net = randomize_(small_mae(3, **OPTIONS["all"])).eval()
    copy = small_mae(3, **OPTIONS["all"]).eval()
    copy.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    mask = (torch.arange(16) % 2).float()[None]
    assert torch.equal(net(x, mask=mask)[0], copy(x, mask=mask)[0])
    assert torch.equal(net.forward_encoder(x), copy.forward_encoder(x))
