"""load_clip: the model readers load on Colab, exercised offline."""
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

import safelib as sl
from safelib.clip.models import uses_quick_gelu


def text_activation(clip: sl.ClipModel) -> type:
    return type(clip.model.transformer.resblocks[0].mlp.gelu)


def test_openai_weights_get_quick_gelu_without_a_download() -> None:
    for name in sl.RESNET_MODELS:
        assert uses_quick_gelu(name, "openai"), name
    assert uses_quick_gelu("RN50", "yfcc15m") and uses_quick_gelu("RN50", "cc12m")
    assert not uses_quick_gelu("RN50", None)


def test_random_clip_describes_its_split(rn50: sl.ClipModel) -> None:
    assert text_activation(rn50) is QuickGELU
    assert (rn50.image_size, rn50.grid, rn50.dense_channels, rn50.embed_dim, rn50.num_heads) == (224, 7, 2048, 1024, 32)
    assert all(not p.requires_grad for p in rn50.model.parameters())
    assert not rn50.model.training


def test_trunk_then_fast_pooling_is_encode_image(rn50: sl.ClipModel) -> None:
    images = torch.randn(2, 3, 224, 224)
    dense = rn50.trunk(images)
    assert dense.shape == (2, 2048, 7, 7)
    expected = rn50.model.encode_image(images)
    torch.testing.assert_close(rn50.encode_image(images), expected, rtol=1e-4, atol=1e-5)


def test_weights_file_loads_and_gives_the_same_features(tmp_path, rn50: sl.ClipModel) -> None:
    path = tmp_path / "rn50-random.safetensors"
    save_file({k: v.contiguous() for k, v in rn50.model.state_dict().items()}, str(path))
    loaded = sl.load_clip("RN50", pretrained=path)
    assert text_activation(loaded) is QuickGELU  # a published-weights file gets QuickGELU too
    images = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(loaded.encode_image(images), rn50.encode_image(images))
    tokens = loaded.tokenizer(["a photo of a cat."])
    torch.testing.assert_close(loaded.model.encode_text(tokens), rn50.model.encode_text(tokens))


def test_state_dict_pt_file_loads_with_weights_only(tmp_path, rn50: sl.ClipModel) -> None:
    path = tmp_path / "rn50-random.pt"
    torch.save(rn50.model.state_dict(), path)
    loaded = sl.load_clip("RN50", pretrained=path)
    torch.testing.assert_close(loaded.attnpool.c_proj.weight, rn50.attnpool.c_proj.weight)


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-L-14"])
def test_vit_is_refused_with_the_reason(name: str) -> None:
    with pytest.raises(ValueError, match=r"not a ResNet CLIP.*attention-pooling.*Valid names: RN50, RN101"):
        sl.load_clip(name)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'RN18'.*RN50, RN101, RN50x4, RN50x16, RN50x64, miniclip"):
        sl.load_clip("RN18")
    with pytest.raises(ValueError, match="plain name 'RN50'"):
        sl.load_clip("RN50-quickgelu")


def test_unknown_tag_lists_valid_tags_and_missing_file_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown weights 'laion2b'.*openai, yfcc15m, cc12m"):
        sl.load_clip("RN50", pretrained="laion2b")
    with pytest.raises(FileNotFoundError, match="no/such/file.safetensors"):
        sl.load_clip("RN50", pretrained="no/such/file.safetensors")


def test_offline_fetch_fails_with_what_was_tried_and_how_to_supply_a_file() -> None:
    with pytest.raises(RuntimeError) as caught:
        sl.load_clip("RN101", pretrained="openai")
    message = str(caught.value)
    assert "timm/resnet101_clip.openai" in message and "RN101.pt" in message
    assert "pretrained='/path/to/weights.safetensors'" in message


def test_every_resnet_clip_has_its_tags() -> None:
    assert sl.weight_tags("RN50") == ("openai", "yfcc15m", "cc12m")
    assert sl.weight_tags("RN101") == ("openai", "yfcc15m")
    for name in ("RN50x4", "RN50x16", "RN50x64"):
        assert sl.weight_tags(name) == ("openai",)
        assert open_clip.get_model_config(name)["vision_cfg"]["layers"]  # a ModifiedResNet config


def test_miniclip_loads_offline_and_names_its_weights() -> None:
    clip = sl.load_clip("miniclip")
    assert clip.pretrained == "shipped" and sl.load_clip("miniclip", pretrained="shipped").pretrained == "shipped"
    assert (clip.image_size, clip.grid) == (128, 4)
    assert not clip.model.training and all(not p.requires_grad for p in clip.model.parameters())


def test_any_local_weights_file_gets_quick_gelu(tmp_path, rn50: sl.ClipModel) -> None:
    """load_clip asks once whether `pretrained` is a local file, and a file (any name) gets QuickGELU."""
    path = tmp_path / "rn50-weights"  # no suffix: still a file of published-style weights
    torch.save(rn50.model.state_dict(), path)
    assert text_activation(sl.load_clip("RN50", pretrained=path)) is QuickGELU


def test_a_hand_built_model_is_wrapped_like_a_loaded_one(tiny_clip: sl.ClipModel) -> None:
    """`wrap_clip` gives a model built by hand CLIP's preprocessing, frozen, as `load_clip` does."""
    assert tiny_clip.mean == sl.data.CLIP_MEAN and tiny_clip.std == sl.data.CLIP_STD
    assert tiny_clip.preprocess is not None and not tiny_clip.model.training
    assert all(not p.requires_grad for p in tiny_clip.model.parameters())
