"""World encoders through the real loading path: tiny random checkpoints saved to disk, loaded by path.

Each checkpoint is built from a transformers config class, written with `save_pretrained` (plus an
image / video processor config with non-default values), and loaded back through `load_encoder`,
exactly as a user's Hub download or local directory would be.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    VJEPA2Config,
    VJEPA2Model,
    VJEPA2VideoProcessor,
)

from lerobot_policy_world_modality.latents.encoder_base import preprocess_frames
from lerobot_policy_world_modality.latents.encoders import PixelThumbnailEncoder, load_encoder, resolve_encoder_identity
from lerobot_policy_world_modality.latents.hf_encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderLoadError

VIT = dict(num_hidden_layers=2, num_attention_heads=2, patch_size=8)


def _save(model, path, processor=None):
    torch.manual_seed(0)
    model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny checkpoints of every family, saved once for the module."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    dinov2 = Dinov2Model(Dinov2Config(hidden_size=48, intermediate_size=96, image_size=32, **VIT))
    # Non-default crop (non-square, to pin the (H, W) order), mean and std: proves they are read.
    dino_proc = BitImageProcessor(
        size={"shortest_edge": 40},
        crop_size={"height": 24, "width": 40},
        do_center_crop=True,
        image_mean=[0.3, 0.4, 0.5],
        image_std=[0.2, 0.25, 0.3],
    )
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=40, intermediate_size=80, image_size=32, **VIT))
    siglip_proc = SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.6, 0.7, 0.8])
    vjepa = VJEPA2Model(
        VJEPA2Config(
            hidden_size=64, crop_size=32, frames_per_clip=8, tubelet_size=2, mlp_ratio=2.0,
            pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=2, num_pooler_layers=1, **VIT,
        )
    )
    vjepa_proc = VJEPA2VideoProcessor(crop_size=32, image_mean=[0.4, 0.4, 0.4], image_std=[0.3, 0.3, 0.3])
    return {
        "dinov2": _save(dinov2, root / "dinov2", dino_proc),
        "dinov2_noproc": _save(dinov2, root / "dinov2_noproc"),
        "siglip": _save(siglip, root / "siglip", siglip_proc),
        "vjepa2": _save(vjepa, root / "vjepa2", vjepa_proc),
    }


def _frames(b=3, h=36, w=44, seed=0, m=None):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 3, h, w) if m is None else (b, m, 3, h, w)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def _family_frames(name, b=3):
    return _frames(b, m=4) if name == "vjepa2" else _frames(b)


@pytest.mark.parametrize("name,dim", [("dinov2", 48), ("siglip", 40), ("vjepa2", 64)])
def test_dim_is_read_from_the_model_config(ckpts, name, dim):
    enc = load_encoder(ckpts[name])
    assert enc.dim == dim and enc.identity.kind == name
    z = enc.encode(_family_frames(name))
    assert z.shape == (3, dim) and z.dtype == torch.float32 and torch.isfinite(z).all()


def test_preprocessing_comes_from_the_processor_config_else_model_config(ckpts):
    ident = load_encoder(ckpts["dinov2"]).identity
    # The processor crops, so its crop_size (H, W) is used, not its resize size or the model's 32.
    assert ident.image_size == (24, 40)
    assert ident.image_mean == pytest.approx((0.3, 0.4, 0.5)) and ident.image_std == pytest.approx((0.2, 0.25, 0.3))
    fallback = load_encoder(ckpts["dinov2_noproc"]).identity
    assert fallback.image_size == (32, 32)
    assert fallback.image_mean == IMAGENET_MEAN and fallback.image_std == IMAGENET_STD
    sig = load_encoder(ckpts["siglip"]).identity
    assert sig.image_size == (32, 32) and sig.image_mean == pytest.approx((0.1, 0.2, 0.3))
    vj = load_encoder(ckpts["vjepa2"]).identity
    assert vj.image_size == (32, 32) and vj.image_std == pytest.approx((0.3, 0.3, 0.3))


def test_processor_without_rescale_is_folded_into_mean_std(tmp_path, ckpts):
    # A processor that normalises raw 0..255 pixels: mean/std must be brought to the [0, 1] scale
    # instead of rescaling the frames (which would be the double-rescale bug in reverse).
    model = Dinov2Model.from_pretrained(ckpts["dinov2_noproc"])
    proc = BitImageProcessor(do_rescale=False, do_center_crop=False, size={"height": 32, "width": 32},
                             image_mean=[127.5] * 3, image_std=[51.0] * 3)
    ident = load_encoder(_save(model, tmp_path / "raw", proc)).identity
    assert ident.image_mean == pytest.approx((0.5,) * 3) and ident.image_std == pytest.approx((0.2,) * 3)


@pytest.mark.parametrize("name", ["dinov2", "siglip", "vjepa2"])
def test_uint8_and_float_frames_give_the_same_latent(ckpts, name):
    enc = load_encoder(ckpts[name])
    frames = _family_frames(name)
    a = enc.encode(frames)
    b = enc.encode(frames.float() / 255.0)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # A double rescale (float frames divided by 255 again) would give a clearly different latent.
    c = enc.encode(frames.float() / 255.0 / 255.0)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["dinov2", "siglip", "vjepa2"])
def test_a_batch_equals_frames_encoded_one_by_one(ckpts, name):
    # Precompute encodes batches, evaluation encodes single frames: they must agree.
    enc = load_encoder(ckpts[name])
    frames = _family_frames(name, b=4)
    batch = enc.encode(frames)
    single = torch.cat([enc.encode(frames[i : i + 1]) for i in range(len(frames))])
    assert (batch - single).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_still_output_float32(ckpts, dtype):
    enc = load_encoder(ckpts["dinov2"], dtype=dtype)
    assert next(enc.parameters()).dtype == dtype
    z = enc.encode(_frames())
    assert z.dtype == torch.float32
    ref = load_encoder(ckpts["dinov2"]).encode(_frames())
    assert torch.allclose(z, ref, atol=0.1, rtol=0.1)
    # Half weights change the latent bytes, so they change the identity (and the cache fingerprint).
    assert enc.identity != load_encoder(ckpts["dinov2"]).identity
    assert enc.identity == resolve_encoder_identity(ckpts["dinov2"], dtype=dtype)


def test_dinov2_poolings(ckpts):
    frames = _frames()
    out = {p: load_encoder(ckpts["dinov2"], pooling=p).encode(frames) for p in ("cls", "mean", "pooler")}
    assert load_encoder(ckpts["dinov2"]).identity.pooling == "cls"
    assert (out["cls"] - out["mean"]).abs().max() > 1e-3
    # In transformers, DINOv2's pooler output is the layer-normed CLS token (documented).
    assert torch.allclose(out["cls"], out["pooler"])
    with pytest.raises(ValueError, match="Pooling 'max'.*'cls', 'mean', 'pooler'"):
        load_encoder(ckpts["dinov2"], pooling="max")


def test_dinov2_mean_pooling_skips_cls_and_register_tokens(tmp_path):
    cfg = Dinov2WithRegistersConfig(hidden_size=32, intermediate_size=64, image_size=32, num_register_tokens=4, **VIT)
    model = Dinov2WithRegistersModel(cfg).eval()
    enc = load_encoder(_save(model, tmp_path / "reg"), pooling="mean")
    assert enc.identity.kind == "dinov2" and enc.identity.extra["model_type"] == "dinov2_with_registers"
    frames = _frames(2, 32, 32)
    pixels = preprocess_frames(frames, enc.identity.image_size, enc.identity.image_mean, enc.identity.image_std)
    with torch.no_grad():
        tokens = model(pixel_values=pixels).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 16
    assert torch.allclose(enc.encode(frames), tokens[:, 5:].mean(1), atol=1e-6)


def test_siglip_poolings_and_cls_is_rejected(ckpts):
    frames = _frames()
    pooler = load_encoder(ckpts["siglip"]).encode(frames)
    assert load_encoder(ckpts["siglip"]).identity.pooling == "pooler"
    mean = load_encoder(ckpts["siglip"], pooling="mean").encode(frames)
    assert (pooler - mean).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no CLS token.*'pooler', 'mean'"):
        resolve_encoder_identity(ckpts["siglip"], pooling="cls")


def test_full_siglip_checkpoint_loads_its_vision_tower(tmp_path):
    vision = dict(hidden_size=32, intermediate_size=64, image_size=32, **VIT)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64, max_position_embeddings=16)
    full = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    enc = load_encoder(_save(full, tmp_path / "siglip_full"))
    assert enc.identity.kind == "siglip" and enc.identity.extra["model_type"] == "siglip" and enc.dim == 32
    frames = _frames(2)
    pixels = preprocess_frames(frames, enc.identity.image_size, enc.identity.image_mean, enc.identity.image_std)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=pixels).pooler_output
    # Equal to the saved vision tower: its weights were loaded, not freshly initialised.
    assert torch.allclose(enc.encode(frames), expected, atol=1e-6)


def test_vjepa2_window(ckpts):
    enc = load_encoder(ckpts["vjepa2"])
    assert enc.window == 4 and enc.identity.pooling == "mean"
    with pytest.raises(ValueError, match=r"\[B, 4, C, H, W\]"):
        enc.encode(_frames(2, m=2))
    with pytest.raises(ValueError, match=r"\[B, 4, C, H, W\]"):
        enc.encode(_frames(2))
    with pytest.raises(ValueError, match="multiple of its tubelet_size \\(2\\)"):
        load_encoder(ckpts["vjepa2"], window=3)
    with pytest.raises(ValueError, match="multiple of its tubelet_size"):
        resolve_encoder_identity(ckpts["vjepa2"], window=1)
    with pytest.raises(ValueError, match="'cls' is not valid.*\\['mean'\\]"):
        load_encoder(ckpts["vjepa2"], pooling="cls")
    short = load_encoder(ckpts["vjepa2"], window=2)
    assert short.identity.window == 2 and short.encode(_frames(2, m=2)).shape == (2, 64)
    # The frames' order matters: a video encoder, not a bag of frames.
    clip = _frames(1, m=4)
    assert (enc.encode(clip) - enc.encode(clip.flip(1))).abs().max() > 1e-4


def test_image_encoders_reject_a_window(ckpts):
    with pytest.raises(ValueError, match="window must be 1"):
        load_encoder(ckpts["dinov2"], window=4)


@pytest.mark.parametrize("name", ["dinov2", "siglip", "vjepa2", "pixels", "pixels-8"])
def test_resolved_identity_equals_the_loaded_one(ckpts, name):
    path = ckpts.get(name, name)
    assert resolve_encoder_identity(path) == load_encoder(path).identity
    json.dumps(load_encoder(path).identity.to_dict())  # serialisable into cache meta and checkpoints


def test_identity_revision_tracks_the_weights_and_resolve_never_reads_them(tmp_path, ckpts):
    model = Dinov2Model.from_pretrained(ckpts["dinov2_noproc"])
    path = _save(model, tmp_path / "d")
    before = resolve_encoder_identity(path)
    assert before.revision.startswith("sha256:")
    assert resolve_encoder_identity(path) == before  # deterministic
    with torch.no_grad():
        model.embeddings.cls_token.add_(1.0)
    _save(model, tmp_path / "d")
    after = resolve_encoder_identity(path)
    assert after.revision != before.revision and after == load_encoder(path).identity
    # Resolving hashes the weight file but never parses it: corrupt weights still resolve,
    # loading them fails. This is what keeps the identity cheap.
    (tmp_path / "d" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert resolve_encoder_identity(path).revision not in (before.revision, after.revision)
    with pytest.raises(EncoderLoadError, match="Cannot load the weights"):
        load_encoder(path)


def test_unsupported_family_and_bad_paths_fail_clearly(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type 'bert'.*dinov2.*siglip.*vjepa2"):
        resolve_encoder_identity(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match="not a directory"):
        load_encoder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable config.json"):
        load_encoder(str(tmp_path / "empty"))


def test_pixels_builtin():
    enc = load_encoder("pixels")
    assert enc.identity == PixelThumbnailEncoder(16).identity == resolve_encoder_identity("pixels-16")
    assert enc.dim == 3 * 16 * 16 and load_encoder("pixels-8").dim == 3 * 8 * 8
    frames = _frames(4, 48, 48)
    z = enc.encode(frames)
    assert z.shape == (4, 768) and z.dtype == torch.float32
    assert torch.allclose(z, enc.encode(frames.float() / 255.0), atol=1e-5)
    single = torch.cat([enc.encode(frames[i : i + 1]) for i in range(4)])
    assert (z - single).abs().max() <= 1e-5
    # Different images give different thumbnails: the latent carries the scene layout.
    assert (z[0] - z[1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="no pooling choice"):
        load_encoder("pixels", pooling="mean")
    with pytest.raises(ValueError, match="window must be 1"):
        resolve_encoder_identity("pixels", window=2)


def test_hub_id_resolves_from_the_hub_cache_with_its_commit_hash(tmp_path, monkeypatch, ckpts):
    # The Hub path, offline: a snapshot laid out as huggingface_hub caches it. The revision must be
    # the commit transformers resolved, and the weights must be loaded from that same commit.
    import shutil

    import transformers.utils.hub as hf_hub_utils

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-dinov2"
    shutil.copytree(ckpts["dinov2"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_hub_utils, "TRANSFORMERS_CACHE", str(tmp_path / "hub"))

    ident = resolve_encoder_identity("tiny-org/tiny-dinov2")
    assert ident.revision == commit and ident.name == "tiny-org/tiny-dinov2" and ident.image_size == (24, 40)
    enc = load_encoder("tiny-org/tiny-dinov2")
    assert enc.identity == ident
    frames = _frames()
    assert torch.allclose(enc.encode(frames), load_encoder(ckpts["dinov2"]).encode(frames))
