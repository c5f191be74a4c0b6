"""The CLIP zero-shot semantic function (privimage.clip_query) on open_clip's real code path.

No pretrained CLIP can be downloaded here, so a tiny untrained architecture is registered with
open_clip (``add_model_config``), created with random weights, saved as a state dict and loaded
back through ``load_clip`` exactly as a user's ``open_clip_pytorch_model.bin`` would be. Checks:
the logits equal an independent computation with the open_clip model itself; grey images equal
their RGB replication; batching does not change the result; the file's weights (not a random
init) are the ones used; every configuration mistake is a one-line ConfigError naming its key.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

from privimage.clip_query import ClipScorer, load_clip
from privimage.errors import ConfigError
from privimage.pipeline import run_pipeline

CPU = torch.device("cpu")
# Unique names: add_model_config mutates open_clip's process-wide registry.
TINY = "privimage-test-tiny-clip"
TINY_WIDE = "privimage-test-tiny-clip-wide"
IMAGE_SIZE = 48  # != 28 and != 32, so every test input goes through the resize
CLASSES = ["golden retriever", "lifeboat", "tabby cat", "school bus", "pizza"]


def _tiny_config(width: int) -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "layers": 2,
            "width": width,
            "patch_size": 8,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    }


def _create(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():
        # A random init has logit_scale = 1/0.07 for every seed; make it differ and != 1 so
        # the scale is checked too.
        model.logit_scale.fill_(2.0 + seed / 10)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The saved tiny model, its weight files (.bin and .safetensors) and a second model."""
    root = tmp_path_factory.mktemp("clip")
    configs = root / "configs"
    configs.mkdir()
    (configs / f"{TINY}.json").write_text(json.dumps(_tiny_config(64)))
    (configs / f"{TINY_WIDE}.json").write_text(json.dumps(_tiny_config(96)))
    open_clip.add_model_config(configs)

    model = _create(TINY, seed=0)
    bin_path = root / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), bin_path)
    st_path = root / "open_clip_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st_path))

    other = _create(TINY, seed=1)
    other_path = root / "other.pt"
    torch.save(other.state_dict(), other_path)
    wide_path = root / "wide.bin"
    torch.save(_create(TINY_WIDE, seed=2).state_dict(), wide_path)
    return {
        "model": model,
        "bin": bin_path,
        "safetensors": st_path,
        "other": other,
        "other_path": other_path,
        "wide": wide_path,
        "root": root,
    }


@pytest.fixture(scope="module")
def scorer(tiny) -> ClipScorer:
    return load_clip(TINY, tiny["bin"], device=CPU)


def _images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Like ImageSplit.as_float(): uint8 pixels mapped to [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, channels, size, size), generator=g)
    return pixels.float() / 127.5 - 1.0


def _reference_logits(model, images: torch.Tensor, classes, prompt="a photo of a {}."):
    """Zero-shot logits computed directly with open_clip, preprocessing written out by hand."""
    x = (images + 1) / 2
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=IMAGE_SIZE, mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    tokens = open_clip.tokenize([prompt.format(c) for c in classes], context_length=16)
    with torch.no_grad():
        img = model.encode_image((x - mean) / std, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        return model.logit_scale.exp() * img @ txt.T


def test_scorer_reports_model_input_size(scorer):
    assert scorer.image_size == IMAGE_SIZE


def test_logits_match_direct_open_clip_computation(tiny, scorer):
    images = _images(6, 3, 32)
    logits = scorer.class_logits(images, CLASSES, progress=False)
    assert logits.shape == (6, len(CLASSES))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, _reference_logits(tiny["model"], images, CLASSES))
    # Cosine similarity times the scale: bounded by the scale.
    assert logits.abs().max() <= tiny["model"].logit_scale.exp() + 1e-5


def test_prompt_template_is_used(tiny, scorer):
    images = _images(3, 3, 32)
    prompt = "a blurry picture of the {}"
    logits = scorer.class_logits(images, CLASSES, prompt=prompt, progress=False)
    torch.testing.assert_close(logits, _reference_logits(tiny["model"], images, CLASSES, prompt))
    default = scorer.class_logits(images, CLASSES, progress=False)
    assert not torch.allclose(logits, default)


def test_grayscale_equals_rgb_replication(scorer):
    grey = _images(4, 1, 28)
    from_grey = scorer.class_logits(grey, CLASSES, progress=False)
    from_rgb = scorer.class_logits(grey.repeat(1, 3, 1, 1), CLASSES, progress=False)
    assert from_grey.shape == (4, len(CLASSES))
    torch.testing.assert_close(from_grey, from_rgb, rtol=0, atol=0)


def test_batch_size_does_not_change_logits(scorer):
    images = _images(10, 3, 32, seed=3)
    small = scorer.class_logits(images, CLASSES, batch_size=3, progress=False)
    large = scorer.class_logits(images, CLASSES, batch_size=64, progress=False)
    torch.testing.assert_close(small, large, rtol=0, atol=1e-5)
    again = scorer.class_logits(images, CLASSES, batch_size=3, progress=False)
    assert torch.equal(small, again)


def test_loaded_weights_are_the_files(tiny, scorer):
    images = _images(5, 3, 32, seed=4)
    loaded = scorer.class_logits(images, CLASSES, progress=False)
    saved = _reference_logits(tiny["model"], images, CLASSES)
    different = _reference_logits(tiny["other"], images, CLASSES)
    torch.testing.assert_close(loaded, saved)
    assert not torch.allclose(loaded, different, atol=1e-3)
    # And the other file gives the other model's logits.
    other = load_clip(TINY, tiny["other_path"], device=CPU)
    torch.testing.assert_close(other.class_logits(images, CLASSES, progress=False), different)


def test_safetensors_file_loads_the_same_weights(tiny, scorer):
    images = _images(4, 3, 32, seed=5)
    from_st = load_clip(TINY, tiny["safetensors"], device=CPU)
    torch.testing.assert_close(
        from_st.class_logits(images, CLASSES, progress=False),
        scorer.class_logits(images, CLASSES, progress=False),
        rtol=0,
        atol=0,
    )


def test_preprocessing_matches_open_clips_own_pil_transform(tiny, scorer):
    """Our tensor preprocessing reproduces open_clip's PIL eval transform (resize, [0, 1],
    mean/std, channel order); PIL's and torch's bicubic kernels differ slightly, so compare
    against how much two different images differ."""
    from PIL import Image

    pixels = torch.randint(0, 256, (4, 3, 28, 28), generator=torch.Generator().manual_seed(6))
    cfg = open_clip.get_model_preprocess_cfg(tiny["model"])
    transform = open_clip.image_transform(
        cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"]
    )
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy().astype("uint8")) for p in pixels]
    ref = torch.stack([transform(p) for p in pil])
    ours = scorer.preprocess(pixels.float() / 127.5 - 1.0)
    assert ours.shape == ref.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ours - ref).abs().mean() < 0.02
    assert (ours.roll(1, 0) - ref).abs().mean() > 0.5


def test_progress_bar_runs(scorer):
    logits = scorer.class_logits(_images(3, 3, 32), CLASSES, batch_size=2, progress=True)
    assert logits.shape == (3, len(CLASSES))


def test_no_random_init_warning_when_loading(tiny, caplog):
    with caplog.at_level(logging.WARNING):
        load_clip(TINY, tiny["bin"], device=CPU)
    assert "initialized randomly" not in caplog.text


def _config_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert match in msg
    return msg


def test_missing_weights_setting_is_a_config_error():
    msg = _config_error("query.clip_weights", load_clip, "ViT-B-32", None, device=CPU)
    assert "nothing is downloaded" in msg
    assert "query.clip_weights=/path/to/" in msg


def test_nonexistent_weights_file_is_a_config_error(tiny):
    missing = tiny["root"] / "nope.bin"
    msg = _config_error("query.clip_weights", load_clip, TINY, missing, device=CPU)
    assert str(missing) in msg and "does not exist" in msg
    _config_error("is a directory", load_clip, TINY, tiny["root"], device=CPU)


def test_unknown_model_name_lists_close_names(tiny):
    msg = _config_error("query.clip_model", load_clip, "ViT-B-32x", tiny["bin"], device=CPU)
    assert "ViT-B-32" in msg and "close names" in msg
    _config_error("query.clip_model", load_clip, "hf-hub:laion/x", tiny["bin"], device=CPU)


def test_hub_tokenizer_models_are_refused(tiny):
    for name in ("ViT-B-16-SigLIP", "xlm-roberta-base-ViT-B-32", "ViT-L-14-CLIPA"):
        msg = _config_error("query.clip_model", load_clip, name, tiny["bin"], device=CPU)
        assert "Hugging Face" in msg


def test_weights_for_another_architecture_are_a_config_error(tiny):
    msg = _config_error("query.clip_weights", load_clip, TINY, tiny["wide"], device=CPU)
    assert f"does not fit query.clip_model={TINY}" in msg
    assert "misshapen" in msg
    # The shapes identify the architecture the file was saved from.
    assert f"they look like {TINY_WIDE}" in msg


def test_unreadable_weights_file_is_a_config_error(tiny):
    for suffix in (".bin", ".safetensors"):
        junk = tiny["root"] / f"junk{suffix}"
        junk.write_bytes(b"not a state dict\n" * 8)
        msg = _config_error("query.clip_weights", load_clip, TINY, junk, device=CPU)
        assert "could not be read" in msg
    # OpenAI's original .pt files are TorchScript archives, which weights_only refuses.
    archive = tiny["root"] / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(archive))
    msg = _config_error("query.clip_weights", load_clip, TINY, archive, device=CPU)
    assert "TorchScript" in msg and "open_clip_pytorch_model.bin" in msg


def test_prompt_without_placeholder_is_a_config_error(scorer):
    images = _images(2, 3, 32)
    _config_error("query.clip_prompt", scorer.class_logits, images, CLASSES, prompt="a photo")
    _config_error("query.clip_prompt", scorer.class_logits, images, CLASSES, prompt="{} of {name}")


@pytest.mark.slow
def test_query_stage_runs_with_clip_and_accounts_it(tiny, tmp_path, compose):
    """The whole query stage with the CLIP semantic function, on the smoke data."""
    overrides = [
        "experiment=smoke",
        "stages=[query]",
        "query.method=clip",
        f"query.clip_model={TINY}",
        "query.score_selection=false",
    ]
    run_dir = tmp_path / "run"
    cfg = compose([*overrides, f"query.clip_weights={tiny['bin']}"])
    run_pipeline(cfg, run_dir)
    selection = json.loads((run_dir / "query" / "selection.json").read_text())
    assert selection["semantic_function"] == f"clip:{TINY}"
    chosen = [p["public_class"] for c in selection["classes"] for p in c["public_classes"]]
    assert len(chosen) == len(set(chosen)) == 10
    ledger = json.loads((run_dir / "privacy.json").read_text())
    assert [(m["stage"], m["status"]) for m in ledger["mechanisms"]] == [("query", "completed")]

    # Without a weights file it stops with one line, before the ledger is opened.
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="query.clip_weights") as info:
        run_pipeline(compose(overrides), missing)
    assert "\n" not in str(info.value)
    assert not (missing / "privacy.json").exists()


@pytest.mark.slow
def test_other_stages_import_without_open_clip():
    """open_clip is needed by query.method=clip only; the stages load without it."""
    code = (
        "import sys; sys.modules['open_clip'] = None\n"  # makes `import open_clip` fail
        "import privimage.stages, privimage.pipeline, privimage.results\n"
        "try:\n    import privimage.clip_query\nexcept ImportError:\n    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-1500:]
