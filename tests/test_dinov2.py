"""FD_DINOv2's network and precision / recall, against independent computations.

No DINOv2 weights can be downloaded here: a small random state dict in Meta's layout (mask token, a 37×37 position
grid as in the 518-px checkpoints) goes through the real loading path. The network is checked against a forward
pass written from the DINOv2 paper's and hub model's definition with plain tensor operations, including the hub
model's bicubic resize of the position grid, computed here in numpy from the interpolation formula; and its blocks
against transformers' independent Dinov2Model.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.dinov2 import (
    DINOV2_FILE,
    DINOV2_URL,
    DINOv2Features,
    DINOv2Scorer,
    architecture,
    hub_position_grid,
    save_random_dinov2_weights,
)
from eval.fid import precision_recall
from eval.reference import moments
from ldm.utils.weights import MissingWeightsError


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_dinov2_weights(tmp_path_factory.mktemp("dinov2") / "d.pth", embed_dim=128, depth=2)


# --- an independent DINOv2 forward ---------------------------------------------------------------------------
def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps around a sample at fraction t (PyTorch's bicubic, a = -0.75)."""

    def w(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


def bicubic_matrix(size_in: int, size_out: int, scale: float) -> np.ndarray:
    """(out, in) matrix of a 1-D bicubic resize by `scale`, half-pixel centres, borders clamped."""
    m = np.zeros((size_out, size_in))
    for i in range(size_out):
        src = (i + 0.5) / scale - 0.5
        i0 = math.floor(src)
        for tap, weight in zip(range(i0 - 1, i0 + 3), cubic_weights(src - i0), strict=True):
            m[i, min(max(tap, 0), size_in - 1)] += weight
    return m


def reference_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """DINOv2's class-token feature for normalised 224-px input x, in float64."""
    s = {k: v.double() for k, v in state.items()}
    x = x.double()
    dim = s["cls_token"].shape[-1]
    heads = dim // 64
    tokens = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=14)
    grid = tokens.shape[-1]
    tokens = torch.cat([s["cls_token"].expand(len(x), 1, dim), tokens.flatten(2).transpose(1, 2)], 1)
    # the hub model's position grid: the trained 37×37 grid resized by the factor (16 + 0.1) / 37
    trained = math.isqrt(s["pos_embed"].shape[1] - 1)
    resize = torch.from_numpy(bicubic_matrix(trained, grid, (grid + 0.1) / trained))
    patches = s["pos_embed"][0, 1:].reshape(trained, trained, dim)
    patches = torch.einsum("ai,bj,ijd->abd", resize, resize, patches).reshape(grid * grid, dim)
    tokens = tokens + torch.cat([s["pos_embed"][0, :1], patches])

    def norm(t, name):
        return F.layer_norm(t, (dim,), s[f"{name}.weight"], s[f"{name}.bias"], eps=1e-6)

    def linear(t, name):
        return t @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}"
        q, k, v = linear(norm(tokens, f"{b}.norm1"), f"{b}.attn.qkv").chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, 64)).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v  # 1/sqrt(64)
        tokens = tokens + s[f"{b}.ls1.gamma"] * linear(attn.transpose(1, 2).flatten(2), f"{b}.attn.proj")
        hidden = F.gelu(linear(norm(tokens, f"{b}.norm2"), f"{b}.mlp.fc1"))  # exact GELU
        tokens = tokens + s[f"{b}.ls2.gamma"] * linear(hidden, f"{b}.mlp.fc2")
    return norm(tokens, "norm")[:, 0]


def test_network_matches_an_independent_dinov2_forward(weights):
    state = torch.load(weights, weights_only=True)
    assert state["pos_embed"].shape == (1, 37 * 37 + 1, 128) and "mask_token" in state  # Meta's layout
    extractor = DINOv2Features(weights)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = extractor.net(x).double()
    expected = reference_forward(state, x)
    assert ours.shape == (3, 128)
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-5)
    # the grid resize matters: timm's own (to 16×16 by size, antialiased) gives other features
    from timm.layers import resample_abs_pos_embed

    timm_grid = resample_abs_pos_embed(state["pos_embed"], [16, 16], num_prefix_tokens=1)
    assert (timm_grid - hub_position_grid(state["pos_embed"], 16)).abs().max() > 1e-2


def meta_layout(hf_state: dict) -> dict:
    """transformers' Dinov2Model state dict → Meta's layout (what dinov2_vitl14_pretrain.pth holds)."""
    out = {
        "cls_token": hf_state["embeddings.cls_token"],
        "mask_token": hf_state["embeddings.mask_token"],
        "pos_embed": hf_state["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_state["layernorm.weight"],
        "norm.bias": hf_state["layernorm.bias"],
    }
    depth = 1 + max(int(k.split(".")[2]) for k in hf_state if k.startswith("encoder.layer."))
    for i in range(depth):
        hf, b = f"encoder.layer.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            qkv = [hf_state[f"{hf}.attention.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{b}.attn.qkv.{kind}"] = torch.cat(qkv)
            out[f"{b}.attn.proj.{kind}"] = hf_state[f"{hf}.attention.o_proj.{kind}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{b}.{name}.{kind}"] = hf_state[f"{hf}.{name}.{kind}"]
        out[f"{b}.ls1.gamma"] = hf_state[f"{hf}.layer_scale1.lambda1"]
        out[f"{b}.ls2.gamma"] = hf_state[f"{hf}.layer_scale2.lambda1"]
    return out


def test_blocks_match_transformers_dinov2(tmp_path):
    """A second, third-party implementation: transformers' Dinov2Model (a dev dependency) with a 16×16 grid, where
    no position resize happens, converted to Meta's layout and loaded through the real path."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=224, layerscale_value=0.5
    )
    hf = Dinov2Model(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # off the init values, so that every tensor shows in the output
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(meta_layout(hf.state_dict()), tmp_path / "hf.pth")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(pixel_values=x).pooler_output  # the final LayerNorm's class token
        ours = DINOv2Features(tmp_path / "hf.pth").net(x)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_features_of_images_go_through_the_recorded_resize(weights):
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 40, 56), dtype=np.uint8))
    torch_mode, pil_mode = DINOv2Features(weights, "torch"), DINOv2Features(weights, "pil")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    resized = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True)  # EDM2's 'torch'
    torch.testing.assert_close(torch_mode(images), torch_mode.net((resized / 255 - mean) / std))
    pil = [
        np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).resize((224, 224), Image.BICUBIC))
        for im in images
    ]
    pil = torch.from_numpy(np.stack(pil)).permute(0, 3, 1, 2).float()  # dgm-eval: PIL bicubic, 8 bits
    torch.testing.assert_close(pil_mode(images), pil_mode.net((pil / 255 - mean) / std))
    identity = torch_mode.identity()
    assert identity["resize"] == "torch" and pil_mode.identity()["resize"] == "pil"
    assert identity["architecture"] == {"embed_dim": 128, "depth": 2, "num_heads": 2}
    assert identity["network"].startswith("DINOv2 custom size") and len(identity["weights_sha256"]) == 64
    with pytest.raises(ValueError, match="dinov2_resize"):
        DINOv2Features(weights, "bilinear")


def test_weights_found_offline_or_a_clear_error(weights, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeightsError) as err:
        DINOv2Features()
    message = str(err.value)
    assert DINOV2_FILE in message and DINOV2_URL in message and "dinov2_weights=" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    with pytest.raises(MissingWeightsError, match="dinov2_weights=/no/such.pth does not exist"):
        DINOv2Features("/no/such.pth")
    cache = tmp_path / "torch" / "hub" / "checkpoints" / DINOV2_FILE  # where torch.hub.load keeps it
    cache.parent.mkdir(parents=True)
    cache.write_bytes(weights.read_bytes())
    assert DINOv2Features().weights_path == cache


def test_timm_safetensors_layout_loads_the_same_network(weights, tmp_path):
    """timm's hub file (model.safetensors of vit_large_patch14_dinov2.lvd142m) holds Meta's tensors less the mask
    token: it gives the same features."""
    from safetensors.torch import save_file

    state = torch.load(weights, weights_only=True)
    save_file(
        {k: v.contiguous() for k, v in state.items() if k != "mask_token"}, tmp_path / "model.safetensors"
    )
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    torch.testing.assert_close(
        DINOv2Features(tmp_path / "model.safetensors")(images),
        DINOv2Features(weights)(images),
        rtol=0,
        atol=0,
    )


def test_other_dinov2_variants_are_refused(weights):
    state = torch.load(weights, weights_only=True)
    with pytest.raises(ValueError, match="registers"):
        architecture({**state, "register_tokens": torch.zeros(1, 4, 128)})
    with pytest.raises(ValueError, match="SwiGLU"):
        architecture({**state, "blocks.0.mlp.w12.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="Meta's layout"):
        architecture({"model": state})


# --- precision / recall ------------------------------------------------------------------------------------
def brute_force_precision_recall(gen: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019, eq. 1-2, literally: a sample is inside a set's manifold when it lies within the
    distance from some member of the set to that member's k-th nearest other member."""

    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the member itself

    def inside(points, members):
        d = np.linalg.norm(points[:, None] - members[None], axis=-1)
        return (d <= radii(members)[None]).any(axis=1)

    return float(inside(gen, real).mean()), float(inside(real, gen).mean())


def test_precision_recall_match_the_definition():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 8))
    # half the generated samples on the real distribution, half far off it; and a narrower spread (less recall)
    gen = np.concatenate([rng.normal(scale=0.5, size=(30, 8)), rng.normal(loc=6.0, size=(30, 8))])
    for k in (1, 3, 5):
        got = precision_recall(torch.from_numpy(gen).float(), torch.from_numpy(real).float(), k)
        expected = brute_force_precision_recall(gen.astype(np.float32), real.astype(np.float32), k)
        assert got == pytest.approx(expected, abs=1e-6), k  # one sample moves either by 1/30 or more
    precision, recall = precision_recall(torch.from_numpy(gen).float(), torch.from_numpy(real).float(), 3)
    assert precision == pytest.approx(0.5, abs=0.1) and recall < 0.9
    same = torch.from_numpy(real).float()
    assert precision_recall(same, same, 3) == (1.0, 1.0)
    assert precision_recall(same[:3], same, 3) == (None, None)  # no 3 neighbours among 3 samples


def test_fd_dinov2_of_the_reference_against_itself_is_zero(weights, tmp_path):
    """The scorer fed the reference images: Fréchet distance 0 (to rounding), precision and recall 1; another set
    of images is far from it."""
    from eval.reference import ReferenceStats

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (24, 3, 32, 32), dtype=np.uint8))
    extractor = DINOv2Features(weights)
    features = extractor(images).numpy()
    mu, sigma = moments(features)
    scorer = DINOv2Scorer(extractor, ReferenceStats(mu, sigma, len(features), features, {"source": "test"}))
    for start in (0, 12):  # two batches, given out of order
        scorer.update(range(12 - start, 24 - start), images[12 - start : 24 - start])
    same = scorer.compute()
    assert abs(same["fd_dinov2"]) < 1e-4 * np.trace(sigma)
    assert same["precision_dinov2"] == same["recall_dinov2"] == 1.0 and same["num_images"] == 24
    scorer.reset()
    smooth = torch.from_numpy(np.linspace(0, 255, 32 * 32 * 3 * 24).reshape(24, 3, 32, 32).astype(np.uint8))
    scorer.update(range(24), smooth)
    other = scorer.compute()
    assert other["fd_dinov2"] > 100 * abs(same["fd_dinov2"]) and other["fd_dinov2"] > 0.1 * np.trace(sigma)
    assert scorer.protocol()["precision_recall"]["neighborhood"] == 3
