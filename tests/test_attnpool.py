"""The fast attention pooling is CLIP's pooling: measured against a float64 ground truth.

Attention pools are built with the exact shapes of random-weight RN50, RN101 and RN50x4
(read from open_clip's configs), with non-zero biases and, in the peaky cases, scaled inputs.
Planted bugs are applied to safelib's own source and must each be caught.
"""
import copy
import inspect
import types

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d

import safelib.clip.attnpool as attnpool_module
from safelib.clip.attnpool import attention_pool, attention_weights

MODELS = ("RN50", "RN101", "RN50x4")


def make_attnpool(name: str, seed: int = 0) -> AttentionPool2d:
    """An attnpool shaped like `name`'s, random weights, every bias non-zero."""
    cfg = open_clip.get_model_config(name)
    vision = cfg["vision_cfg"]
    embed = vision["width"] * 32
    torch.manual_seed(seed)
    pool = AttentionPool2d(vision["image_size"] // 32, embed, embed // 64, cfg["embed_dim"])
    with torch.no_grad():
        for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            linear.weight.normal_(std=embed ** -0.5)
            linear.bias.normal_(std=0.5)  # a key bias that is not zero must still cancel
    return pool.eval()


def dense_maps(pool: AttentionPool2d, n: int, scale: float, seed: int = 1) -> torch.Tensor:
    side = int((pool.positional_embedding.shape[0] - 1) ** 0.5)
    generator = torch.Generator().manual_seed(seed)
    # post-ReLU maps are non-negative, as layer4's are
    return torch.randn(n, pool.positional_embedding.shape[1], side, side, generator=generator).relu() * scale


def reference_pool(pool: AttentionPool2d, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's math written out plainly: full self-attention over all tokens, keep token 0."""
    n, c, h, w = dense.shape
    heads, d = pool.num_heads, c // pool.num_heads
    x = dense.reshape(n, c, h * w).permute(2, 0, 1)                     # (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)             # (HW+1)NC
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    q = F.linear(x, pool.q_proj.weight, pool.q_proj.bias).view(-1, n, heads, d)
    k = F.linear(x, pool.k_proj.weight, pool.k_proj.bias).view(-1, n, heads, d)
    v = F.linear(x, pool.v_proj.weight, pool.v_proj.bias).view(-1, n, heads, d)
    scores = torch.einsum("qnhd,knhd->nhqk", q, k) / d ** 0.5
    attention = scores.softmax(-1)                                      # N heads L L
    out = torch.einsum("nhqk,knhd->qnhd", attention, v).reshape(-1, n, c)
    out = F.linear(out, pool.c_proj.weight, pool.c_proj.bias)
    return out[0], attention[:, :, 0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


CASES = [(name, scale) for name in MODELS for scale in (1.0, 30.0)]


@pytest.mark.parametrize("name,scale", CASES)
def test_float64_fast_path_equals_open_clip(name: str, scale: float) -> None:
    pool = make_attnpool(name).double()
    dense = dense_maps(pool, 4, scale).double()
    truth = pool(dense)
    assert rel(attention_pool(pool, dense), truth) < 1e-12
    assert rel(reference_pool(pool, dense)[0], truth) < 1e-12


@pytest.mark.parametrize("name,scale", CASES)
def test_float32_error_at_most_3x_open_clips_own(name: str, scale: float) -> None:
    pool = make_attnpool(name)
    dense = dense_maps(pool, 16, scale)  # 16 samples: one sample's rounding error is too noisy to compare
    truth = copy.deepcopy(pool).double()(dense.double())
    ours = rel(attention_pool(pool, dense), truth)
    theirs = rel(pool(dense), truth)
    assert ours <= 3 * theirs, (ours, theirs)


def test_peaky_inputs_really_are_peaky() -> None:
    """Guard the test data: at scale 30 attention concentrates on few tokens, at 1 it is spread."""
    pool = make_attnpool("RN50").double()
    spread = attention_weights(pool, dense_maps(pool, 4, 1.0).double()).amax(-1).mean()
    peaky = attention_weights(pool, dense_maps(pool, 4, 30.0).double()).amax(-1).mean()
    assert peaky > 0.5 > spread


@pytest.mark.parametrize("name", MODELS)
def test_attention_weights_match_open_clips_attention(name: str) -> None:
    pool = make_attnpool(name).double()
    dense = dense_maps(pool, 3, 10.0).double()
    weights = attention_weights(pool, dense)
    _, reference = reference_pool(pool, dense)
    side = pool.positional_embedding.shape[0]
    assert weights.shape == (3, pool.num_heads, side)
    assert rel(weights, reference) < 1e-12
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, pool.num_heads, dtype=torch.float64))


@pytest.mark.parametrize("name", MODELS)
def test_gradients_of_every_attnpool_tensor_agree(name: str) -> None:
    ours_pool = make_attnpool(name).double()
    theirs_pool = copy.deepcopy(ours_pool)
    dense = dense_maps(ours_pool, 3, 10.0).double()
    dense_ours = dense.clone().requires_grad_(True)
    dense_theirs = dense.clone().requires_grad_(True)
    direction = torch.randn(3, ours_pool.c_proj.out_features, dtype=torch.float64)
    (attention_pool(ours_pool, dense_ours) * direction).sum().backward()
    (theirs_pool(dense_theirs) * direction).sum().backward()
    assert rel(dense_ours.grad, dense_theirs.grad) < 1e-10
    theirs = dict(theirs_pool.named_parameters())
    for key, parameter in ours_pool.named_parameters():
        if key == "k_proj.bias":
            # softmax is shift-invariant: the key bias's true gradient is zero
            assert parameter.grad is None or parameter.grad.abs().max() == 0
            scale = theirs["k_proj.weight"].grad.abs().max()
            assert theirs[key].grad.abs().max() < 1e-10 * scale
            continue
        assert parameter.grad is not None, key
        assert rel(parameter.grad, theirs[key].grad) < 1e-10, key


@pytest.mark.parametrize(
    "dtype,tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2), (torch.float32, 1e-5), (torch.float64, 1e-12)]
)
def test_every_supported_dtype(dtype: torch.dtype, tolerance: float) -> None:
    pool = make_attnpool("RN50")
    dense = dense_maps(pool, 2, 1.0)
    truth = copy.deepcopy(pool).double()(dense.double())
    low = copy.deepcopy(pool).to(dtype)
    out = attention_pool(low, dense.to(dtype))
    assert out.dtype == dtype
    assert rel(out, truth) < tolerance
    weights = attention_weights(low, dense.to(dtype))
    assert weights.dtype == dtype


def test_other_grid_refused_unless_interpolation_is_asked_for() -> None:
    pool = make_attnpool("RN50")
    dense = torch.rand(2, 2048, 9, 9)
    with pytest.raises(ValueError, match=r"9x9 differs from the 7x7 grid.*interpolate_pos=True"):
        attention_pool(pool, dense)
    with pytest.raises(ValueError, match="interpolate_pos=True"):
        attention_weights(pool, dense)
    assert attention_pool(pool, dense, interpolate_pos=True).shape == (2, 1024)
    assert attention_weights(pool, dense, interpolate_pos=True).shape == (2, 32, 82)
    # on the trained grid, asking for interpolation changes nothing
    native = dense_maps(pool, 2, 1.0)
    torch.testing.assert_close(attention_pool(pool, native, interpolate_pos=True), attention_pool(pool, native))


def test_bad_shapes_are_refused() -> None:
    pool = make_attnpool("RN50")
    with pytest.raises(ValueError, match="N x C x H x W"):
        attention_pool(pool, torch.rand(2048, 7, 7))
    with pytest.raises(ValueError, match="1024 channels but this attnpool expects 2048"):
        attention_pool(pool, torch.rand(1, 1024, 7, 7))


# --- planted bugs: each mutation of safelib/attnpool.py must fail the exactness checks above ---

MUTATIONS = {
    "drop the mean token": (
        "mean = x.mean(dim=-1, keepdim=True)",
        "mean = torch.zeros_like(x[..., :1])",
    ),
    "wrong softmax scale": (
        "scale = head_dim ** -0.5\n    q0 = torch.addmm(bq",
        "scale = channels ** -0.5\n    q0 = torch.addmm(bq",
    ),
    "drop the value bias": ("reshape(n, channels) + bv", "reshape(n, channels)"),
    "wrong head split": (
        "return weight.view(heads, -1, weight.shape[-1])",
        "return weight.view(-1, heads, weight.shape[-1]).transpose(0, 1)",
    ),
}
# Planted bugs in the fused backward: the forward stays right, the gradients must not agree.
BACKWARD_MUTATIONS = {
    "softmax backward not centred": (
        "ds = attention * (da - (attention * da).sum(-1, keepdim=True))",
        "ds = attention * da",
    ),
    "p_0 misses the query path": ("dpos[0] += dq_sum @ wq", "pass"),
    "p misses the score path": ("dpos.addmm_(score_part.transpose(0, 1).reshape(length, channels), wk)", "pass"),
    "maps miss the mean token's share": ("dt0.unsqueeze(-1) / dx.shape[-1]", "0"),
    "chunks restart at row 0": ("start = rows.stop", "start = 0"),
}


def mutated_module(original: str, replacement: str) -> types.ModuleType:
    source = inspect.getsource(attnpool_module)
    assert source.count(original) == 1, f"mutation site {original!r} not found once: update the planted bug"
    module = types.ModuleType("mutated_attnpool")
    exec(compile(source.replace(original, replacement), "mutated_attnpool", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("bug", MUTATIONS)
def test_planted_bug_is_caught(bug: str) -> None:
    mutant = mutated_module(*MUTATIONS[bug])
    pool = make_attnpool("RN50").double()
    dense = dense_maps(pool, 3, 10.0).double()
    truth = pool(dense)
    assert rel(mutant.attention_pool(pool, dense), truth) > 1e-6, bug


def gradient_errors(attention_pool_fn, name: str = "RN50", n: int = 5) -> dict[str, float]:
    """Relative error of every gradient (maps and attnpool tensors) against open_clip's autograd, float64."""
    ours_pool = make_attnpool(name).double()
    theirs_pool = copy.deepcopy(ours_pool)
    dense = dense_maps(ours_pool, n, 10.0).double()
    dense_ours, dense_theirs = dense.clone().requires_grad_(True), dense.clone().requires_grad_(True)
    direction = torch.randn(n, ours_pool.c_proj.out_features, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(2))
    (attention_pool_fn(ours_pool, dense_ours) * direction).sum().backward()
    (theirs_pool(dense_theirs) * direction).sum().backward()
    theirs = dict(theirs_pool.named_parameters())
    errors = {"dense": rel(dense_ours.grad, dense_theirs.grad)}
    errors.update({key: rel(p.grad, theirs[key].grad) for key, p in ours_pool.named_parameters()
                   if key != "k_proj.bias"})
    return errors


@pytest.mark.parametrize("bug", BACKWARD_MUTATIONS)
def test_planted_backward_bug_is_caught(bug: str, monkeypatch) -> None:
    # small chunks, so that 5 samples span 3 chunks and the chunk bookkeeping is exercised
    chunk = 2 * 2048 * 50 * 8
    monkeypatch.setattr(attnpool_module, "CHUNK_BYTES", chunk)
    assert max(gradient_errors(lambda p, x: attention_pool(p, x)).values()) < 1e-10
    mutant = mutated_module(*BACKWARD_MUTATIONS[bug])
    mutant.CHUNK_BYTES = chunk
    errors = gradient_errors(lambda p, x: mutant.attention_pool(p, x))
    assert max(errors.values()) > 1e-6, (bug, errors)


def test_fused_gradients_hold_across_chunks(monkeypatch) -> None:
    """A batch split into several chunks gives the gradients of one chunk (and of open_clip)."""
    whole = gradient_errors(lambda p, x: attention_pool(p, x))
    monkeypatch.setattr(attnpool_module, "CHUNK_BYTES", 2 * 2048 * 50 * 8)  # 2 samples per chunk in float64
    assert len(attnpool_module._chunks(5, 2048, 50, 8)) == 3
    split = gradient_errors(lambda p, x: attention_pool(p, x))
    assert max(whole.values()) < 1e-10 and max(split.values()) < 1e-10, (whole, split)


@pytest.mark.parametrize("trainable", ["values", "attention"])
def test_fused_gradients_of_a_trainable_subset(trainable: str) -> None:
    """SAFE trains subsets: the tensors that need a gradient get open_clip's, the others none."""
    from safelib.methods.safe import TRAINABLE_SETS

    ours_pool = make_attnpool("RN50").double()
    theirs_pool = copy.deepcopy(ours_pool)
    for key, p in ours_pool.named_parameters():
        p.requires_grad_(key.split(".")[0] in TRAINABLE_SETS[trainable])
    dense = dense_maps(ours_pool, 3, 10.0).double()
    direction = torch.randn(3, ours_pool.c_proj.out_features, dtype=torch.float64)
    (attention_pool(ours_pool, dense) * direction).sum().backward()
    (theirs_pool(dense) * direction).sum().backward()
    theirs = dict(theirs_pool.named_parameters())
    for key, p in ours_pool.named_parameters():
        if not p.requires_grad or key == "k_proj.bias":
            assert p.grad is None or key == "k_proj.bias", key
            continue
        assert rel(p.grad, theirs[key].grad) < 1e-10, key



def test_half_precision_maps_pool_with_a_float32_layer() -> None:
    """The cache stores fp16 maps; the pooling computes in its own dtype instead of failing."""
    pool = make_attnpool("RN50")
    dense = dense_maps(pool, 2, 1.0).half()
    torch.testing.assert_close(attention_pool(pool, dense), attention_pool(pool, dense.float()))


# ---------------------------------------------------------------- spatial attention (what the book draws and measures)


def test_spatial_attention_averages_heads_drops_the_mean_token_and_renormalises() -> None:
    from safelib.clip.attnpool import grid_side, spatial_attention

    attention = torch.rand(3, 4, 1 + 9).softmax(-1)
    spatial = spatial_attention(attention)
    assert spatial.shape == (3, 9) and spatial.dtype == torch.float32
    by_hand = [[sum(float(attention[n, h, 1 + i]) for h in range(4)) / 4 for i in range(9)] for n in range(3)]
    by_hand = torch.tensor([[a / sum(row) for a in row] for row in by_hand])
    torch.testing.assert_close(spatial, by_hand)
    torch.testing.assert_close(spatial_attention(attention.half()), spatial, rtol=2e-3, atol=1e-3)  # float32 out
    assert grid_side(1 + 9) == 3
    with pytest.raises(ValueError, match="not a square grid"):
        grid_side(1 + 8)
    with pytest.raises(ValueError, match="N x heads"):
        spatial_attention(torch.rand(2, 10))


def test_a_second_backward_is_refused_clearly() -> None:
    # the backward writes its gradients into the saved blocks, so a second one would read garbage
    pool = make_attnpool("RN50")
    for parameter in pool.parameters():
        parameter.requires_grad_(True)
    out = attention_pool(pool, dense_maps(pool, 2, 1.0)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        out.backward()
