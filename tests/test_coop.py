"""CoOp: the prompt learner's text path is open_clip's encode_text, and coop runs under sl.run."""
from __future__ import annotations

import pytest
import torch

import safelib as sl
from safelib.methods import ClipHead, Coop, CoopConfig, FewShotData, SplitFeatures, method_config, resolve_preset
from safelib.methods.coop import PromptLearner, encode_prompt_embeddings
from safelib.runs import RunConfig, run

NAMES = ("circle", "five pointed star", "golden retriever")


def _context_of(clip: sl.ClipModel, words: str) -> torch.Tensor:
    """The token embeddings of ``words`` (between SOS and EOS): CoOp's "init from words" context."""
    tokens = clip.tokenizer([words])
    count = int(tokens.argmax(dim=-1)) - 1
    with torch.no_grad():
        return clip.model.token_embedding(tokens)[0, 1:1 + count]


def _check_text_path_is_encode_text(clip: sl.ClipModel) -> None:
    init = _context_of(clip, "a photo of a")
    learner = PromptLearner(clip.model, clip.tokenizer, NAMES, n_ctx=init.shape[0], init=init)
    with torch.no_grad():
        ours = encode_prompt_embeddings(clip.model, learner(), learner.tokens)
        theirs = clip.model.encode_text(clip.tokenizer([f"a photo of a {name}." for name in NAMES]))
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def test_text_path_reproduces_encode_text_on_the_miniclip():
    from safelib.clip.miniclip import CHECKPOINT

    if not CHECKPOINT.is_file():
        pytest.skip("the mini-CLIP checkpoint is not shipped in this checkout")
    _check_text_path_is_encode_text(sl.load_clip("miniclip", "shipped"))


def test_text_path_reproduces_encode_text_on_rn50(rn50):
    _check_text_path_is_encode_text(rn50)


def test_only_the_context_learns_and_the_class_tokens_stay(tiny_clip):
    learner = PromptLearner(tiny_clip.model, tiny_clip.tokenizer, NAMES, n_ctx=4)
    assert [name for name, p in learner.named_parameters()] == ["ctx"]
    assert learner.ctx.shape == (4, tiny_clip.model.token_embedding.weight.shape[1])
    assert learner.ctx.std().item() == pytest.approx(0.02, rel=0.5)
    prompts = learner()
    with torch.no_grad():
        embedded = tiny_clip.model.token_embedding(learner.tokens)
    assert torch.equal(prompts[:, 5:], embedded[:, 5:]) and torch.equal(prompts[:, :1], embedded[:, :1])


def test_a_prompt_longer_than_the_context_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="fills the text tower's context length 16"):
        PromptLearner(tiny_clip.model, tiny_clip.tokenizer, NAMES, n_ctx=16)


def test_coop_needs_the_text_tower_through_its_head():
    head = ClipHead(classifier=torch.eye(4, 2), logit_scale=100.0, classnames=("a", "b"))
    split = SplitFeatures(labels=torch.tensor([0, 1]), pooled=torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match=r"ClipHead\(clip=<ClipModel>"):
        Coop(CoopConfig(epochs=1)).fit(FewShotData(train=split, val=split, head=head))


def test_coop_epochs_resolve_from_shots_and_dataset():
    config = method_config("coop")
    assert resolve_preset(config, "dtd", 1)[0].epochs == 50
    assert resolve_preset(config, "dtd", 4)[0].epochs == 100
    assert resolve_preset(config, "dtd", 16)[0].epochs == 200
    assert resolve_preset(config, "imagenet", 16)[0].epochs == 50
    assert resolve_preset(method_config("coop", {"epochs": 3}), "dtd", 16)[0].epochs == 3


def test_coop_trains_and_runs_under_sl_run(tmp_path):
    from safelib.clip.miniclip import CHECKPOINT

    if not CHECKPOINT.is_file():
        pytest.skip("the mini-CLIP checkpoint is not shipped in this checkout")
    config = RunConfig(dataset="miniworld_shape_largest", dataset_options={"per_class": [4, 3, 5]}, method="coop",
                       shots=2, seed=1, train_views=2, method_config={"epochs": 3},
                       cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "runs"))
    record, fitted = run(config, return_method=True)
    assert record["chosen"]["epochs"] == 3 and len(record["chosen"]["train_loss"]) == 3
    assert record["preset"]["n_ctx"] == 16 and record["preset"]["max_epoch"] == 3
    assert 0.0 <= record["test_acc"] <= 100.0
    start = torch.nn.functional.normalize(fitted.head.classifier, dim=0)
    assert not torch.allclose(fitted.method._text, start)  # its own learned prompts, not the template classifier
