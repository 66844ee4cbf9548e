"""`smolvla_world` with Chain-of-Causality: the text pass, its labels and masking, the future alignment.

Real and offline: a recorded synthetic dataset labelled by `lerobot-wm-label-coc`, its pixel latent
cache, and the tiny SmolVLM of `support.vlm`.
"""

import json
import shutil

import pytest
import torch
from support import vlm
from support.datasets import make_synthetic_dataset
from support.vlm import TINY_SMOLVLA
from test_smolvla_world import B, H, batch, make_config

from lerobot_policy_world_modality.constants import OBS_WORLD_FUTURE, OBS_WORLD_FUTURE_VALID
from lerobot_policy_world_modality.smolvla_world.coc import CocLabels
from lerobot_policy_world_modality.smolvla_world.modeling_smolvla_world import SmolVLAWorldPolicy

tiny_vlm = vlm.tiny_vlm  # the session fixture: one tiny SmolVLM for every test

REPO = "local/smolvla_world_coc"
# Episodes of 8, 1 and 6 frames: global indices [0, 8), [8, 9), [9, 15).
EPISODES = (8, 1, 6)
# Hand-written texts over the labeller's file: episode 0 in two segments, episode 1 left unlabelled.
TEXTS = [
    {"episode_index": 0, "from_index": 0, "to_index": 5, "text": "move the cube to the left", "phase": "reach",
     "labeller": "template"},
    {"episode_index": 0, "from_index": 5, "to_index": 8, "text": "press the red button down", "phase": "press",
     "labeller": "template"},
    {"episode_index": 2, "from_index": 9, "to_index": 15, "text": "pull the drawer open", "phase": "push",
     "labeller": "template"},
]  # fmt: skip
LABELLED, UNLABELLED = 6, 8  # a frame of episode 0's second segment; the frame of episode 1


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """(dataset root, labels file, latent cache root): a recording, its pixel latents and its CoC labels."""
    from lerobot_policy_world_modality.tools.label_coc import main as label
    from lerobot_policy_world_modality.tools.precompute import main as precompute

    base = tmp_path_factory.mktemp("coc")
    root, cache = base / "ds", base / "cache"
    make_synthetic_dataset(root, repo_id=REPO, episode_lengths=EPISODES, task="press the button")
    flags = [f"--dataset.repo_id={REPO}", f"--dataset.root={root}"]
    assert precompute([*flags, f"--cache_root={cache}", "--no_progress"]) == 0
    assert label([*flags, "--no_progress"]) == 0
    labels = root / "meta" / "coc_labels.jsonl"
    # Only the dataset and the labeller settings are fingerprinted: texts of one's own may replace the records.
    labels.write_text("".join(json.dumps(r) + "\n" for r in TEXTS))
    return root, labels, cache


def _meta(root):
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    return LeRobotDatasetMetadata(REPO, root=root)


def _policy(tiny_vlm, labelled, seed=0, **overrides):
    root, labels, cache = labelled
    torch.manual_seed(seed)
    cfg = make_config(tiny_vlm, train_expert_only=False, latent_cache_root=str(cache), **overrides)
    return SmolVLAWorldPolicy(cfg, dataset_meta=_meta(root))


def _batch(policy, tiny_vlm, index, seed=0):
    b = batch(tiny_vlm, policy.config.world_latent_dim, seed=seed)
    b["index"] = torch.tensor(index)
    b["episode_index"] = torch.tensor([0 if i < 8 else 1 if i < 9 else 2 for i in index])
    return b


def test_labels_map_global_frames_to_their_segment_and_leave_the_rest_unlabelled(labelled):
    root, labels, _ = labelled
    coc = CocLabels.load(labels, _meta(root))
    assert coc.texts == [r["text"] for r in TEXTS]
    # from_index / to_index are global dataset indices, to exclusive.
    assert coc.segments_of(torch.tensor([0, 4, 5, 7, 8, 9, 14])).tolist() == [0, 0, 1, 1, -1, 2, 2]
    with pytest.raises(ValueError, match="outside the 15 frames"):
        coc.segments_of(torch.tensor([15]))


def test_labels_of_other_data_or_without_meta_are_refused_naming_the_fix(labelled, tmp_path):
    root, labels, _ = labelled
    # A copy of the dataset elsewhere is another dataset for the fingerprint (as for the latent cache).
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    with pytest.raises(ValueError, match=r"other data .*dataset root.*lerobot-wm-label-coc .*--overwrite"):
        CocLabels.load(labels, _meta(copy))
    # Re-recorded data (other content, same episode lengths) at the same place.
    other = tmp_path / "other"
    make_synthetic_dataset(other, repo_id=REPO, episode_lengths=EPISODES, task="press the button", seed=1)
    moved = other / "meta" / "coc_labels.jsonl"
    shutil.copy(labels, moved)
    meta = json.loads(labels.with_name("coc_labels.meta.json").read_text())
    meta["dataset"]["root"] = str(other.resolve())  # only the content differs now
    moved.with_name("coc_labels.meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dataset content"):
        CocLabels.load(moved, _meta(other))

    bare = tmp_path / "bare.jsonl"
    shutil.copy(labels, bare)
    with pytest.raises(ValueError, match="no readable meta file .*lerobot-wm-label-coc"):
        CocLabels.load(bare, _meta(root))
    with pytest.raises(FileNotFoundError, match="lerobot-wm-label-coc"):
        CocLabels.load(tmp_path / "none.jsonl", _meta(root))
    # A record across an episode boundary cannot be one episode's segment.
    crossing = tmp_path / "crossing.jsonl"
    crossing.write_text(json.dumps({**TEXTS[0], "to_index": 9}) + "\n")
    shutil.copy(labels.with_name("coc_labels.meta.json"), tmp_path / "crossing.meta.json")
    with pytest.raises(ValueError, match=r"line 1: frames \[0, 9\) are not inside episode 0"):
        CocLabels.load(crossing, _meta(root))


def test_text_flags_are_checked_up_front(tiny_vlm):
    with pytest.raises(ValueError, match="--policy.coc_path="):
        make_config(tiny_vlm, train_expert_only=False, lambda_text=0.1)
    with pytest.raises(ValueError, match="--policy.train_expert_only=false"):
        make_config(tiny_vlm, coc_path="labels.jsonl", lambda_text=0.1)
    with pytest.raises(ValueError, match="future_frames >= 1"):
        make_config(tiny_vlm, lambda_align=0.1, future_frames=0, use_prophet=False, inject_memory=False)


def test_the_text_pass_leaves_actions_and_action_loss_unchanged(tiny_vlm, labelled):
    root, labels, _ = labelled
    plain = _policy(tiny_vlm, labelled)
    talking = _policy(tiny_vlm, labelled, coc_path=str(labels), lambda_text=0.5)
    assert talking.coc is not None and plain.coc is None
    talking.load_state_dict(plain.state_dict())  # the same weights
    b = _batch(plain, tiny_vlm, [LABELLED, 2])
    noise = torch.randn(B, H, TINY_SMOLVLA["max_action_dim"])
    actions = plain.predict_action_chunk(dict(b), noise=noise)
    assert torch.equal(actions, talking.predict_action_chunk(dict(b), noise=noise))

    time = torch.tensor([0.3, 0.7])
    out = {}
    for name, policy in (("plain", plain), ("talking", talking)):
        policy.train()
        torch.manual_seed(1)  # the same draws in both (oracle scheduling, dropout)
        out[name] = policy.forward(dict(b), noise=noise.clone(), time=time.clone())
    (plain_loss, plain_info), (loss, info) = out["plain"], out["talking"]
    assert info["action_loss"] == plain_info["action_loss"]  # bit for bit: the text pass is not mixed in
    assert info["text_loss"] > 0 and info["text_labelled"] == 1.0 and "text_loss" not in plain_info
    assert loss.item() == pytest.approx(plain_loss.item() + 0.5 * info["text_loss"], rel=1e-5)
    # The text loss reaches the LM head (frozen by SmolVLA, opened for it); the plain policy's stays frozen.
    loss.backward()
    head = talking.smolvla.model.vlm_with_expert.vlm.lm_head.weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    assert not plain.smolvla.model.vlm_with_expert.vlm.lm_head.weight.requires_grad


def test_text_loss_falls_on_a_fixed_batch(tiny_vlm, labelled):
    _, labels, _ = labelled
    policy = _policy(tiny_vlm, labelled, coc_path=str(labels), lambda_text=1.0)
    policy.train()
    b = _batch(policy, tiny_vlm, [1, 12])
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss, info = policy.forward(dict(b))
        loss.backward()
        opt.step()
        losses.append(info["text_loss"])
    assert losses[-1] < 0.7 * losses[0], losses


def test_unlabelled_frames_are_masked_not_faked(tiny_vlm, labelled):
    _, labels, _ = labelled
    policy = _policy(tiny_vlm, labelled, coc_path=str(labels), lambda_text=1.0)
    policy.train()
    head = policy.smolvla.model.vlm_with_expert.vlm.lm_head.weight

    # No frame of the batch has a label: no text loss and nothing reaches the LM head.
    none = _batch(policy, tiny_vlm, [UNLABELLED, UNLABELLED])
    loss, info = policy.forward(dict(none))
    assert info["text_loss"] == 0.0 and info["text_labelled"] == 0.0
    assert loss.item() == pytest.approx(info["action_loss"] + info["world_loss"], rel=1e-5)
    loss.backward()
    assert head.requires_grad and head.grad is None

    # One labelled frame: its loss alone; what the unlabelled frame shows does not matter.
    with torch.no_grad():
        mixed = _batch(policy, tiny_vlm, [LABELLED, UNLABELLED])
        alone, info = policy.coc.loss(policy.smolvla, dict(mixed))
        assert info["text_labelled"] == 0.5
        other = dict(mixed)
        other["observation.image"] = mixed["observation.image"].clone()
        other["observation.image"][1] = torch.rand(3, 48, 48)
        assert torch.equal(policy.coc.loss(policy.smolvla, other)[0], alone)
        # ... while the labelled frame's own image does (the text reads the prefix).
        other["observation.image"][0] = torch.rand(3, 48, 48)
        assert not torch.equal(policy.coc.loss(policy.smolvla, other)[0], alone)
        # Its text is the one of its own segment: another frame of that segment gives the same loss.
        same_segment = dict(mixed, index=torch.tensor([7, UNLABELLED]))
        assert torch.equal(policy.coc.loss(policy.smolvla, same_segment)[0], alone)
        other_segment = dict(mixed, index=torch.tensor([4, UNLABELLED]))
        assert not torch.equal(policy.coc.loss(policy.smolvla, other_segment)[0], alone)


def test_future_alignment_pulls_the_expert_states_towards_the_future_latents(tiny_vlm, labelled):
    plain = _policy(tiny_vlm, labelled)
    aligned = _policy(tiny_vlm, labelled, lambda_align=1.0)
    missing, unexpected = aligned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("align.") for k in missing)
    b = _batch(plain, tiny_vlm, [2, 12])
    noise, time = torch.randn(B, H, TINY_SMOLVLA["max_action_dim"]), torch.tensor([0.3, 0.7])
    # Future steps past the episode end take no part: only the valid rows decide the loss.
    b[OBS_WORLD_FUTURE_VALID] = torch.tensor([[True, False], [True, True]])
    out = {}
    for name, policy in (("plain", plain), ("aligned", aligned)):
        policy.train()
        torch.manual_seed(1)
        out[name] = policy.forward(dict(b), noise=noise.clone(), time=time.clone())
    (plain_loss, plain_info), (loss, info) = out["plain"], out["aligned"]
    assert info["action_loss"] == plain_info["action_loss"]
    assert loss.item() == pytest.approx(plain_loss.item() + info["align_loss"], rel=1e-5)
    changed = dict(b, **{OBS_WORLD_FUTURE: b[OBS_WORLD_FUTURE].clone()})
    changed[OBS_WORLD_FUTURE][0, 1] = torch.randn(b[OBS_WORLD_FUTURE].shape[-1])  # an invalid row
    torch.manual_seed(1)
    assert aligned.forward(changed, noise=noise.clone(), time=time.clone())[1]["align_loss"] == info["align_loss"]

    # The alignment reaches the action expert itself (the states it is computed from), not only its head.
    loss.backward()
    plain_loss.backward()
    theirs = dict(plain.named_parameters())
    expert = [(p.grad, theirs[n].grad) for n, p in aligned.named_parameters()
              if "lm_expert" in n and p.grad is not None]  # fmt: skip
    assert expert and any(not torch.allclose(mine, plain_grad) for mine, plain_grad in expert)
    assert aligned.align.proj.weight.grad.abs().sum() > 0

    # On a fixed batch a few optimiser steps raise the cosine.
    opt = torch.optim.Adam([p for p in aligned.parameters() if p.requires_grad], lr=3e-3)
    cos = []
    for _ in range(5):
        opt.zero_grad()
        torch.manual_seed(1)
        loss, info = aligned.forward(dict(b), noise=noise.clone(), time=time.clone())
        loss.backward()
        opt.step()
        cos.append(info["align_cos"])
    assert cos[-1] > cos[0], cos


def test_explain_writes_a_text_per_new_chunk_without_changing_the_actions(tiny_vlm, tmp_path):
    torch.manual_seed(0)
    quiet = SmolVLAWorldPolicy(make_config(tiny_vlm))
    path = tmp_path / "eval" / "explanations.jsonl"
    talking = SmolVLAWorldPolicy(make_config(tiny_vlm, explain=True, explain_path=str(path), explain_max_tokens=4))
    talking.load_state_dict(quiet.state_dict())
    dim = quiet.config.world_latent_dim
    noise = torch.randn(B, H, TINY_SMOLVLA["max_action_dim"])
    for step in range(3):  # n_action_steps=2: new chunks at steps 0 and 2
        b = batch(tiny_vlm, dim, seed=step)
        assert torch.equal(quiet.select_action(dict(b), noise=noise), talking.select_action(dict(b), noise=noise))
    assert [(e["episode"], e["step"], e["env"]) for e in talking.explanations] == [
        (0, 0, 0), (0, 0, 1), (0, 2, 0), (0, 2, 1)]  # fmt: skip
    assert all(isinstance(e["text"], str) for e in talking.explanations) and not quiet.explanations
    talking.reset()
    talking.select_action(dict(batch(tiny_vlm, dim)), noise=noise)
    assert talking.explanations[-1]["episode"] == 1 and talking.explanations[-1]["step"] == 0
    assert [json.loads(line) for line in path.read_text().splitlines()] == talking.explanations
    with pytest.raises(ValueError, match="--policy.explain=true"):
        make_config(tiny_vlm, explain_path=str(path))


def test_explanations_say_what_the_text_loss_taught(tiny_vlm, labelled):
    """Trained on two frames of different segments until the text loss is small, greedy decoding gives each
    frame its own text: the generation reads the frame's prefix (images, instruction, state)."""
    from lerobot_policy_world_modality.smolvla_world.coc import generate_text

    _, labels, _ = labelled
    policy = _policy(tiny_vlm, labelled, coc_path=str(labels), lambda_text=1.0)
    b = _batch(policy, tiny_vlm, [LABELLED, 12])
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(60):
        policy.train()
        opt.zero_grad()
        loss, info = policy.forward(dict(b))
        loss.backward()
        opt.step()
        if info["text_loss"] < 0.05:
            break
    assert info["text_loss"] < 0.05, info
    policy.eval()
    tokenizer = policy.smolvla.model.vlm_with_expert.processor.tokenizer
    expected = [tokenizer.decode(tokenizer(TEXTS[i]["text"], add_special_tokens=False)["input_ids"]).strip()
                for i in (1, 2)]  # fmt: skip
    assert generate_text(policy.smolvla, dict(b), max_tokens=20) == expected


@pytest.mark.slow
def test_lerobot_train_trains_with_the_text_loss_on_a_labelled_recording(tiny_vlm, tmp_path):
    """Record, precompute, label (template backend), two lerobot-train steps with text and alignment,
    then one lerobot-eval episode that writes the explanations."""
    from huggingface_hub import ModelCard
    from support.cli import BIN, capped_eval_cmd, short_train_flags
    from test_smolvla_world_e2e import _run, _tiny_flags

    root = tmp_path / "ds"
    make_synthetic_dataset(root, repo_id=REPO, episode_lengths=EPISODES, task="press the button")
    flags = [f"--dataset.repo_id={REPO}", f"--dataset.root={root}"]
    for tool in ("lerobot-wm-precompute", "lerobot-wm-label-coc"):
        res = _run([BIN / tool, *flags, *(["--backend=template"] if "label" in tool else [])])
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    labels = root / "meta" / "coc_labels.jsonl"
    assert [json.loads(line)["text"] for line in labels.read_text().splitlines()] == ["press the button"] * 3

    out = tmp_path / "train"
    coc_flags = ["--policy.type=smolvla_world", *_tiny_flags(tiny_vlm), "--policy.train_expert_only=false",
                 f"--policy.coc_path={labels}", "--policy.lambda_text=0.1", "--policy.lambda_align=0.1",
                 "--policy.history_frames=2", "--policy.future_frames=2", "--policy.prophet_width=32",
                 "--policy.prophet_heads=2", "--policy.prophet_depth=1"]  # fmt: skip
    res = _run([BIN / "lerobot-train", *coc_flags, *flags, *short_train_flags(out, 2, batch_size=2, log_freq=1)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ckpt = out / "checkpoints" / "last" / "pretrained_model"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["coc_path"] == str(labels) and cfg["lambda_text"] == 0.1 and cfg["lambda_align"] == 0.1
    # The card keeps the figures of the training batches: the text pass and the alignment ran in lerobot-train.
    figures = ModelCard.load(ckpt / "README.md").data.to_dict()["world_modality"]["training"]
    assert figures["text_loss"] > 0 and figures["text_labelled"] == 1.0 and 0 < figures["align_loss"] < 2
    # The checkpoint reloads without the dataset: no labels are needed at rollout.
    policy = SmolVLAWorldPolicy.from_pretrained(ckpt)
    assert policy.coc is None and policy.align is not None

    # One short MetaWorld episode through the stock lerobot-eval, explaining every new chunk.
    explained = tmp_path / "eval" / "explanations.jsonl"
    cmd = capped_eval_cmd(ckpt, tmp_path / "eval", episode_length=6)
    explain = ["--policy.explain=true", f"--policy.explain_path={explained}", "--policy.explain_max_tokens=4"]
    res = _run([*cmd, *explain])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    rows = [json.loads(line) for line in explained.read_text().splitlines()]
    steps = TINY_SMOLVLA["n_action_steps"]
    assert [(r["episode"], r["step"], r["env"]) for r in rows] == [(0, s, 0) for s in range(0, 6, steps)]
    assert all(isinstance(r["text"], str) for r in rows)
    # lerobot-wm-compare reads the same file into its report, paired with the episode's outcome.
    from lerobot_policy_world_modality.tools import compare

    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    success = [bool(s) for t in info["per_task"] for s in t["metrics"]["successes"]]
    episodes = compare.read_explanations(explained, success, batch_size=1, eval_seed=1000)
    assert [(e["episode"], e["success"], [s for s, _ in e["texts"]]) for e in episodes] == [(0, success[0], list(range(0, 6, steps)))]
    section = "\n".join(compare.explanations_markdown([{"arm": "coc", "seed": 0, "task": "button-press-v3", "mode": "pred",
                                                         "file": str(explained), "episodes": episodes}]))  # fmt: skip
    assert f"- episode 0 (env seed 1000, {'success' if success[0] else 'failure'}): step" in section

