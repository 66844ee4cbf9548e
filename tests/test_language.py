"""The shared frozen text encoder (language.py) on a tiny offline BERT: pooling, caching, identity, errors."""

import pytest
import torch
from support.text import make_tiny_text_encoder

from lerobot_policy_world_modality.language import (
    FrozenTextEncoder,
    LanguageOptions,
    TextEncoderLoadError,
    bind_language_encoder,
    instructions_from_batch,
    resolve_text_encoder,
)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return make_tiny_text_encoder(tmp_path_factory.mktemp("text") / "tiny_bert")


def test_mean_pooling_over_the_mask_float32_and_frozen(text_dir):
    enc = FrozenTextEncoder(str(text_dir))
    assert enc.dim == 32 and not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())
    short, long = "press the button", "pick the red cube and put it on the blue plate"
    rows = enc.encode([short, long])
    assert rows.shape == (2, 32) and rows.dtype == torch.float32 and not rows.requires_grad
    # By hand: the unpadded sentence alone, mean over its tokens. Equal to its row in the padded batch
    # only if padding is masked out of the mean.
    inputs = enc.tokenizer([short], return_tensors="pt")
    with torch.no_grad():
        alone = enc.model(**inputs).last_hidden_state[0].mean(dim=0)
    assert torch.allclose(rows[0], alone, atol=1e-5)
    assert not torch.allclose(rows[0], rows[1])


def test_each_distinct_instruction_is_encoded_once(text_dir):
    enc = FrozenTextEncoder(str(text_dir))
    batch = ["open the drawer", "press the button", "open the drawer", "open the drawer"]
    first = enc.encode(batch)
    assert enc.num_encoded == 2
    assert torch.equal(first[0], first[2]) and torch.equal(first[0], first[3])
    again = enc.encode(["press the button", "open the drawer"])
    assert enc.num_encoded == 2  # served from the cache
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    enc.encode(["close the door"])
    assert enc.num_encoded == 3


def test_cache_is_bounded_least_recently_used(text_dir):
    enc = FrozenTextEncoder(str(text_dir), cache_size=2)
    enc.encode(["open the drawer", "press the button"])
    enc.encode(["open the drawer"])  # most recent now
    enc.encode(["close the door"])  # evicts "press the button"
    assert list(enc._cache) == ["open the drawer", "close the door"]
    enc.encode(["press the button"])
    assert enc.num_encoded == 4


def test_embeddings_made_under_inference_mode_serve_training(text_dir):
    """lerobot-eval calls the policy under inference_mode; cached rows must still work with autograd."""
    enc = FrozenTextEncoder(str(text_dir))
    with torch.inference_mode():
        enc.encode(["open the drawer"])
    proj = torch.nn.Linear(enc.dim, 4)
    proj(enc.encode(["open the drawer"])).sum().backward()  # would fail on an inference tensor
    assert proj.weight.grad is not None and enc.num_encoded == 1


def test_identity_revision_tracks_the_files(text_dir, tmp_path):
    identity, _, _ = resolve_text_encoder(str(text_dir))
    assert identity.revision.startswith("sha256:") and identity.dim == 32
    assert FrozenTextEncoder(str(text_dir)).identity == identity
    other = make_tiny_text_encoder(tmp_path / "other", seed=1)
    assert resolve_text_encoder(str(other))[0].revision != identity.revision
    with pytest.raises(TextEncoderLoadError, match="mismatch"):
        resolve_text_encoder(str(other), revision=identity.revision)
    # The tokenizer is part of the identity: another vocabulary changes every embedding.
    vocab = other / "vocab.txt"
    before = resolve_text_encoder(str(other))[0].revision
    vocab.write_text(vocab.read_text() + "extra\n")
    assert resolve_text_encoder(str(other))[0].revision != before


def test_bind_fills_then_checks_the_revision(text_dir, tmp_path):
    opts = LanguageOptions()
    assert bind_language_encoder(opts) is None and opts.language_encoder_revision is None
    opts = LanguageOptions(language_encoder=str(text_dir))
    identity = bind_language_encoder(opts)
    assert opts.language_encoder_revision == identity.revision
    with pytest.raises(TextEncoderLoadError, match="language_encoder is not"):
        bind_language_encoder(LanguageOptions(language_encoder_revision=identity.revision))


def test_clear_errors_for_bad_paths(tmp_path):
    with pytest.raises(TextEncoderLoadError, match="not a directory"):
        resolve_text_encoder(str(tmp_path / "nope" / "tiny"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderLoadError, match="no config.json"):
        resolve_text_encoder(str(tmp_path / "empty"))


def test_instructions_from_batch_validates():
    assert instructions_from_batch({"task": ["a b", "c"]}, 2) == ["a b", "c"]
    assert instructions_from_batch({"task": "open it"}, 3) == ["open it"] * 3
    with pytest.raises(KeyError, match="language_encoder"):
        instructions_from_batch({}, 2)
    with pytest.raises(ValueError, match="Empty language instruction"):
        instructions_from_batch({"task": ["open", "  "]}, 2)
    with pytest.raises(ValueError, match="3 instructions for a batch of 2"):
        instructions_from_batch({"task": ["a", "b", "c"]}, 2)
