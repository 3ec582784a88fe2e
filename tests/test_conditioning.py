"""Frozen OpenCLIP text encoder on a small random tower, through open_clip's real loading paths."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ldm.conditioning import Conditioning, FrozenOpenCLIPTextEncoder, MissingWeightsError

PROMPTS = ["a red circle on a blue background", "green square, white background", ""]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=None, layer="penultimate")


def test_shapes_frozen_and_deterministic(encoder):
    cond = encoder(PROMPTS)
    assert cond.tokens.shape == (3, encoder.context_length, encoder.width)
    assert cond.pooled.shape == (3, encoder.pooled_dim)
    assert cond.mask.dtype == torch.bool and cond.mask.shape == (3, encoder.context_length)
    # the mask marks real tokens: start + words + end; the empty prompt has only start and end tokens
    assert cond.mask[2].sum() == 2 and cond.mask[0].sum() > cond.mask[1].sum() > 2
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.text.training
    again = encoder(PROMPTS)
    torch.testing.assert_close(again.tokens, cond.tokens, rtol=0, atol=0)
    assert (cond.tokens[0] - cond.tokens[1]).abs().mean() > 1e-3


def test_last_layer_matches_open_clip_forward(encoder):
    """layer='last' tokens and pooled embedding equal open_clip's own TextTransformer output."""
    last = FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=None, layer="last")
    last.text.load_state_dict(encoder.text.state_dict())
    ours = last(PROMPTS)
    last.text.output_tokens = True
    pooled, tokens = last.text(last.tokenize(PROMPTS))
    torch.testing.assert_close(ours.tokens, tokens)
    torch.testing.assert_close(ours.pooled, pooled)
    # the penultimate layer (SD2's choice) is a different representation with the same pooled output
    pen = encoder(PROMPTS)
    assert not torch.allclose(pen.tokens, ours.tokens)
    torch.testing.assert_close(pen.pooled, ours.pooled)


def test_null_conditioning_is_the_empty_prompt(encoder):
    null = encoder.null(4)
    assert len(null) == 4
    torch.testing.assert_close(null.tokens[3], encoder([""]).tokens[0])


def test_truncated_marks_the_prompts_longer_than_the_context(encoder):
    """Against the tokenizer's own BPE count: start + tokens + end > context length."""
    tokenizer = open_clip.get_tokenizer("ldm-tiny-text")
    n = encoder.context_length - 2  # words that just fit
    prompts = ["a cat", "word " * n, "word " * (n + 1), "two words " * n, "", "ünïcödé " * n]
    expected = [len(tokenizer.encode(p)) + 2 > encoder.context_length for p in prompts]
    assert encoder.truncated(prompts).tolist() == expected
    assert expected[1:3] == [False, True]  # the boundary is met
    assert (
        encoder.tokenize(prompts)[2, -1] != 0
    )  # the cut prompt fills the context (it ends with the end token)


def test_conditioning_where_cat_index():
    a = Conditioning(torch.zeros(3, 2, 4), torch.zeros(3, 5), torch.ones(3, 2, dtype=torch.bool))
    b = Conditioning(torch.ones(1, 2, 4), torch.ones(1, 5), torch.zeros(1, 2, dtype=torch.bool))
    mixed = a.where(torch.tensor([True, False, True]), b)
    assert mixed.tokens[:, 0, 0].tolist() == [1.0, 0.0, 1.0]
    assert mixed.pooled[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert mixed.mask[:, 0].tolist() == [False, True, False]
    both = Conditioning.cat([a, b.expand(3)])
    assert both.tokens.shape == (6, 2, 4) and both.pooled.shape == (6, 5)
    assert len(both[1:4]) == 3
    assert (
        both.to(torch.float64).tokens.dtype == torch.float64
        and both.to(torch.float64).mask.dtype == torch.bool
    )


def _reference_tower_state(tmp_path):
    """A full (plain) CLIP of our tiny config, saved as open_clip would ship it."""
    torch.manual_seed(1)
    clip = open_clip.create_model("ldm-tiny-text", pretrained=None)
    return clip, {k: v.contiguous() for k, v in clip.state_dict().items()}


def test_loads_local_weights_file(tmp_path):
    clip, state = _reference_tower_state(tmp_path)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    enc = FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=str(path), layer="last")
    expected = clip.encode_text(enc.tokenize(PROMPTS))  # open_clip's pooled, projected embedding
    torch.testing.assert_close(enc(PROMPTS).pooled, expected)
    assert enc.identity()["weights_in_checkpoint"] is False


def test_loads_local_dir(tmp_path):
    clip, state = _reference_tower_state(tmp_path)
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    save_file(state, folder / "open_clip_model.safetensors")
    cfg = {"model_cfg": open_clip.get_model_config("ldm-tiny-text"), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    enc = FrozenOpenCLIPTextEncoder(f"local-dir:{folder}", pretrained=None, layer="last")
    torch.testing.assert_close(enc(PROMPTS).pooled, clip.encode_text(enc.tokenize(PROMPTS)))


def test_missing_pretrained_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        FrozenOpenCLIPTextEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    assert "open_clip" in message and "text_encoder.pretrained=" in message and str(tmp_path) in message


def test_unknown_tag_lists_known_tags():
    with pytest.raises(MissingWeightsError, match="laion2b_s34b_b79k"):
        FrozenOpenCLIPTextEncoder("ViT-B-32", pretrained="no-such-tag")


def test_a_context_length_other_than_the_tower_s_is_refused():
    """The tower's position embeddings and causal mask are built for its own length; another one used to fail
    only at the first prompt, with a shape error."""
    with pytest.raises(ValueError, match="32 tokens"):
        FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=None, context_length=16)
    same = FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=None, context_length=32)
    assert same(["a cat"]).tokens.shape[1] == 32


def test_the_mask_covers_start_text_and_end_tokens(encoder):
    """Against the tokenizer's own BPE count. Padding is id 0, which is also a real token ("!" not ending a word):
    it must not be taken for padding."""
    tokenizer = open_clip.get_tokenizer("ldm-tiny-text")
    prompts = ['the sign says "sale!"!', "a red circle", ""]
    assert 0 in tokenizer.encode(prompts[0])  # the case at stake
    mask = encoder(prompts).mask
    assert mask.sum(1).tolist() == [len(tokenizer.encode(p)) + 2 for p in prompts]
    assert all(m[: int(m.sum())].all() for m in mask)  # one run from the start token


def test_the_null_prompt_is_full_precision_and_follows_the_weights():
    """Cached, but computed outside autocast (a first call in a bf16 training step used to fix a bf16 copy) and
    recomputed when the weights change (e.g. a checkpoint loaded into the tower after a first use)."""
    torch.manual_seed(1)
    enc = FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        null = enc.null(2)
    reference = enc([""])
    assert null.tokens.dtype == null.pooled.dtype == torch.float32
    torch.testing.assert_close(null.tokens[1], reference.tokens[0], rtol=0, atol=0)
    torch.testing.assert_close(null.pooled[1], reference.pooled[0], rtol=0, atol=0)
    torch.manual_seed(2)
    other = FrozenOpenCLIPTextEncoder("ldm-tiny-text", pretrained=None)
    enc.text.load_state_dict(other.text.state_dict())
    torch.testing.assert_close(enc.null().tokens, other([""]).tokens, rtol=0, atol=0)
