"""A tiny random SmolVLM (model + processor + BPE tokenizer) written offline, standing in for a Hub VLM.

Nothing can be downloaded from the Hub here, so tests build the VLM with transformers' own classes
(`SmolVLMConfig`, `SmolVLMForConditionalGeneration`, `SmolVLMProcessor`) and `save_pretrained` it into
a directory. SmolVLA loads that directory through the same `vlm_model_name` path (AutoConfig /
AutoProcessor / AutoModelForImageTextToText) a user's Hub id takes. Building takes about a second;
tests share one copy per session (see `tiny_vlm_dir`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Words of MetaWorld / LIBERO-like instructions and the synthetic dataset's task, for the BPE training.
CORPUS = (
    "pick place put open close push pull press turn move the a an up down left right of in on to from "
    "cube drawer door button square bowl plate block red green blue top side and reach window"
)
SPECIAL = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
}
# SmolVLA reads tokenizer.fake_image_token_id / global_image_token_id: they exist only with these.
IMAGE_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
# Image side and patch size: 16 patches, pixel-shuffled by 2 into 4 image tokens per camera.
IMAGE_SIZE = 64
PATCH_SIZE = 16

# SmolVLA / smolvla_world options that fit this VLM (pass with the VLM directory as vlm_model_name).
TINY_SMOLVLA = {
    "load_vlm_weights": True,
    "num_vlm_layers": 2,
    "resize_imgs_with_padding": (IMAGE_SIZE, IMAGE_SIZE),
    "chunk_size": 4,
    "n_action_steps": 2,
    "num_steps": 3,
    "max_state_dim": 8,
    "max_action_dim": 8,
    "tokenizer_max_length": 16,
}


def _tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = list(SPECIAL.values()) + list(IMAGE_TOKENS.values())
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator([CORPUS, CORPUS.upper(), "\n"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL, extra_special_tokens=IMAGE_TOKENS)


def make_tiny_smolvlm(
    directory: str | Path,
    seed: int = 0,
    text_width: int = 64,
    text_layers: int = 2,
    vision_width: int = 32,
    vision_layers: int = 1,
    image_size: int = IMAGE_SIZE,
) -> Path:
    """Write a random SmolVLM and its processor; by default 2 text layers of width 64, vision width 32, 64x64.

    The sizes are parameters so benchmarks can build a larger stand-in with the same code.
    """
    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(directory)
    config = SmolVLMConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": text_width,
            "intermediate_size": 2 * text_width,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_width // 16,
            "num_key_value_heads": max(1, text_width // 32),
            "head_dim": 16,
            "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": 2 * vision_width,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": max(1, vision_width // 16),
            "image_size": image_size,
            "patch_size": PATCH_SIZE,
        },
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    SmolVLMForConditionalGeneration(config).save_pretrained(directory)
    image_processor = SmolVLMImageProcessor(
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=False,
    )
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=(image_size // PATCH_SIZE) ** 2 // 4,
    )
    processor.save_pretrained(directory)
    return directory


_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """Session fixture: the tiny SmolVLM directory, built once per test process.

    Import it into a test module (`from support.vlm import tiny_vlm`); modules share one build.
    """
    if "dir" not in _BUILT:
        _BUILT["dir"] = make_tiny_smolvlm(tmp_path_factory.mktemp("tiny_smolvlm"))
    return _BUILT["dir"]
