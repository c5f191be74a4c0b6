"""Parameter-efficient DP fine-tuning (``finetune.trainable``): only the named parts train.

Training fewer parameters shrinks the total norm of the DP noise (it is added to the
trained parameters only) while each example's clipped gradient keeps its bound, so the
clipping must be computed over exactly the trained parameters: the per-example norms are
checked against ``torch.func`` restricted to them. The stage test checks that the frozen
weights leave fine-tuning bit-identical, and that the ledger and the release say what
was trained.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_bookkeeping import _clip, _reference, _row_loss, _rows, _unet
from torch import nn

from privimage.dp.bookkeeping import BookKeeping
from privimage.errors import ConfigError
from privimage.nets.models import load_unet
from privimage.pipeline import run_pipeline
from privimage.stages.finetune import select_trainable

UP = ["up_blocks", "conv_norm_out", "conv_out"]


def test_prefixes_match_whole_module_names():
    model = nn.Module()
    model.a = nn.ModuleList([nn.Linear(2, 2) for _ in range(11)])
    model.b = nn.Linear(2, 2)
    info = select_trainable(model, ["a.1", "b"])
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    # "a.1" is the second layer, not also the eleventh ("a.10").
    assert trained == ["a.1.bias", "a.1.weight", "b.bias", "b.weight"]
    assert info == {"trainable": ["a.1", "b"], "trained_parameters": 12, "parameters": 72}
    assert select_trainable(model, None)["trainable"] == "all"
    assert all(p.requires_grad for p in model.parameters())


def test_a_prefix_that_names_nothing_is_a_one_line_error():
    model = _unet("nano", 16, 1)
    with pytest.raises(ConfigError, match=r"'decoder' names no parameter.*up_blocks") as exc:
        select_trainable(model, ["up_blocks", "decoder"])
    assert "\n" not in str(exc.value)


@pytest.mark.slow
def test_norms_cover_exactly_the_trained_parameters():
    examples, k = 3, 2
    model = _unet("tiny28", 28, 1)
    rows = _rows(28, 1, examples=examples, k=k)
    reference = _reference(model, rows, examples=examples, k=k)
    trained = {n for n in reference if n.split(".")[0] in UP}
    full_norms, _ = _clip(reference, 1.0)
    norms, expected = _clip({n: v for n, v in reference.items() if n in trained}, 1.0)
    # The frozen part carries a share of each example's gradient far above the
    # tolerance: norms that left it in would fail the comparison.
    assert (full_norms > 1.01 * norms).all()
    clip = float(norms.median())
    _, expected = _clip({n: v for n, v in reference.items() if n in trained}, clip)

    select_trainable(model, UP)
    engine = BookKeeping(model, max_grad_norm=clip, noise_multiplicity=k)
    assert {n for n, _ in engine.covered_parameters()} == trained
    _row_loss(engine, *rows).mean().backward()

    assert torch.allclose(engine.last_norms, norms, rtol=1e-4, atol=0)
    for name, p in model.named_parameters():
        if name in trained:
            assert torch.allclose(p.grad, expected[name], rtol=1e-3, atol=1e-6), name
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"


@pytest.mark.slow
def test_frozen_weights_stay_pretrained_and_the_ledger_says_what_trained(
    tmp_path_factory, compose, pretrain_smoke, copy_run
):
    base = pretrain_smoke(tmp_path_factory.mktemp("partial-base"))
    run = copy_run(base, "run")
    trainable = ["up_blocks.1", "conv_out"]
    cfg = compose(
        [
            "experiment=smoke",
            "stages=[finetune]",
            f"finetune.trainable=[{','.join(trainable)}]",
        ]
    )
    run_pipeline(cfg, run)

    before = dict(load_unet(base / "pretrain" / "unet")[0].named_parameters())
    after = dict(load_unet(run / "finetune" / "unet")[0].named_parameters())
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    in_scope = {n for n in after if n.startswith("up_blocks.1.") or n.startswith("conv_out.")}
    assert moved and moved <= in_scope

    ledger = json.loads((run / "privacy.json").read_text())
    (entry,) = [m for m in ledger["mechanisms"] if m["stage"] == "finetune"]
    assert entry["details"] == {
        "trainable": trainable,
        "trained_parameters": sum(after[n].numel() for n in in_scope),
        "parameters": sum(p.numel() for p in after.values()),
    }
