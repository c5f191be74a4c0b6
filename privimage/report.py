"""``evaluate/report.md``: the evaluation's numbers as tables a person reads.

Pure formatting of the :class:`~privimage.io.artifacts.Evaluation` the evaluate stage
writes (``metrics.json``); the pictures it links are written by that stage beside the
report. The CLI's summary line is here too, so both say the same of a run's privacy.
"""

from __future__ import annotations

from pathlib import Path

from privimage.io.artifacts import Evaluation, trained_text
from privimage.io.atomic import write_text

# The columns of :func:`_closeness_cells`: how near an attack's images come to training ones.
CLOSENESS_HEADERS = (
    "pixel L2 to nearest (median)",
    "closest 5%",
    "SSIM to nearest (median)",
    "near-copies",
    "nearer than median held-out",
)


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int | bool):
        return str(value)
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def privacy_line(ev: Evaluation) -> str:
    """The report's first line: what privacy these images have, from the run's ledger."""
    if ev.privacy == "none":
        why = "; ".join(ev.non_private_steps) or (
            f"synthesizer `{ev.synthesizer}`: it fits the sensitive data without noise"
        )
        return (
            f"**Privacy: none. These images carry no differential-privacy guarantee** "
            f"({why}). Read the leakage measurements below with that in mind."
        )
    if ev.privacy == "over_budget":
        return (
            f"**Privacy: NOT within budget.** ε = {ev.epsilon_spent:.4g} spent exceeds the "
            f"target {ev.target_epsilon:g} (the run's ledger `privacy.json`)."
        )
    if ev.privacy == "seeded":
        return (
            f"**Privacy: NOT differentially private against anyone who knows this run's "
            f"config.** Its DP noise was derived from the seed (`privacy.reproducible_noise="
            f"true`, for tests); ε = {ev.epsilon_spent:.3f} holds only against someone who "
            "does not know it."
        )
    if ev.privacy == "dp":
        trained = trained_text(ev.dp_trained)
        return (
            f"Privacy: ε = {ev.epsilon_spent:.3f} spent of {ev.target_epsilon} "
            f"(δ = {ev.delta:g}), from the run's ledger `privacy.json`; the noise was "
            "drawn from secret OS entropy." + (f" DP fine-tuning {trained}." if trained else "")
        )
    return "Privacy: no ledger (these images do not come from a privimage run)."


def render_report(ev: Evaluation, *, class_names: list[str]) -> str:
    """The report as Markdown text."""
    fid, util, leak = ev.fidelity, ev.utility, ev.leakage
    lines = ["# Evaluation report", "", privacy_line(ev)]
    lines += [
        f"Synthetic images: {fid['synthetic_images']} from `{ev.synthetic}`; "
        f"{len(class_names)} classes.",
        "",
        "These measurements read the sensitive data; they are for the data owner and are "
        "not part of the differentially private release: keep `evaluate/` private and share "
        "only the run's `release/` folder.",
        "",
        "![synthetic images](samples.png)",
        "",
        "## Fidelity",
        "",
    ]
    lines += _table(
        ["metric", "value", "notes"],
        [
            [
                "FID",
                _f(fid["fid"], 2),
                f"TF-Inception-2015 pool features; {fid['synthetic_images']} synthetic vs "
                f"{fid['reference_images']} real training images",
            ],
            [
                "precision",
                _f(fid["precision"]),
                f"k-NN manifold, k = {fid['k']}, {fid['precision_recall_images']} images a side",
            ],
            [
                "recall",
                _f(fid["recall"]),
                f"k-NN manifold, k = {fid['k']}, {fid['precision_recall_images']} images a side",
            ],
            ["Inception Score", "n/a", fid["inception_score_note"]],
        ],
    )
    lines += ["## Utility: trained on synthetic, tested on real", ""]
    if "not_computed" in util:
        lines += [f"Not computed: {util['not_computed']}.", ""]
    else:
        lines += [
            f"Each classifier trains on {util['synthetic_train_images']} synthetic images; "
            "its epoch (and, for logistic regression and the MLP, its weight decay) is chosen "
            f"on {util['synthetic_validation_images']} held-out synthetic images. The real "
            "test split "
            f"({util['real_test_images']} images) is read once, after all training.",
            "",
        ]
        real = "mean_real_data_test_accuracy" in util
        rows = [
            [
                kind,
                _f(c["test_accuracy"]),
                *([_f(c["real_data_test_accuracy"])] if real else []),
                _f(c["validation_accuracy"]),
                f"{c['epoch']} of {c['epochs_trained']}",
                f"{c['weight_decay']:g}",
            ]
            for kind, c in util["classifiers"].items()
        ]
        rows.append(
            [
                "**mean**",
                f"**{_f(util['mean_test_accuracy'])}**",
                *([f"**{_f(util['mean_real_data_test_accuracy'])}**"] if real else []),
                "",
                "",
                "",
            ]
        )
        header = ["classifier", "real test accuracy"]
        if real:
            header.append(f"same, trained on {util['real_train_images']} real images")
        lines += _table([*header, "synthetic val. accuracy", "epoch", "wd"], rows)
    nn = leak["nearest_neighbour"]
    lines += [
        "## Leakage: how close the synthetic images come to the training set",
        "",
        f"Each image's nearest neighbour among the {leak['training_images_searched']} "
        "sensitive training images in pixel space (L2 on [0, 1] pixels; SSIM and PSNR to "
        "that neighbour), and among "
        f"{leak['feature_neighbours_searched']} of them in Inception-feature space. The "
        f"baseline is {leak['heldout_real_images']} real held-out test images: synthetic "
        "images no closer than unseen real images reveal nothing by their closeness.",
        "",
    ]
    # (label, the percentile at the close end: low distances, high similarities)
    labels = {
        "pixel_l2": ("pixel L2 to nearest", "p05"),
        "feature_l2": ("Inception L2 to nearest", "p05"),
        "ssim": ("SSIM to nearest", "p95"),
        "psnr": ("PSNR to nearest, dB", "p95"),
        "near_copy_score": ("near-copy score", "p05"),
    }
    rows = []
    for key, (label, close) in labels.items():
        s, h = nn[key]["synthetic"], nn[key]["heldout_real"]
        rows.append(
            [
                f"{label} ({'5th' if close == 'p05' else '95th'} pct. = closest 5%)",
                _f(s.get("median")),
                _f(s.get(close)),
                _f(h.get("median")),
                _f(h.get(close)),
            ]
        )
    lines += _table(
        [
            "statistic",
            "synthetic median",
            "synthetic closest 5%",
            "held-out median",
            "held-out closest 5%",
        ],
        rows,
    )
    nc = leak["near_copies"]
    lines += [
        f"**Near-copies** ({nc['criterion']}): {nc['synthetic_count']} synthetic images "
        f"({100 * nc['synthetic_fraction']:.2f}%); real held-out images: "
        f"{100 * nc['heldout_real_fraction']:.2f}%.",
        "",
        "![closest pairs](nearest_pairs.png)",
        "",
        "![distances](nearest_distances.png)",
        "",
        "### Membership inference on the downstream classifiers",
        "",
    ]
    mia = leak["membership_inference"]
    if "not_computed" in mia:
        lines += [f"Not computed: {mia['not_computed']}.", ""]
    else:
        first = next(iter(mia.values()))
        fpr_note = (
            "AUC 0.5 and TPR 1% at 1% FPR are chance."
            if first["nonmembers"] >= 100
            else "AUC 0.5 is chance; with fewer than 100 non-members no false positive is "
            "allowed, so the TPR column is the TPR at 0% FPR."
        )
        lines += [
            f"Loss-threshold attack: {first['members']} training images (members) against "
            f"{first['nonmembers']} test images (non-members). {fpr_note}",
            "",
        ]
        lines += _table(
            ["classifier", "AUC", "TPR at 1% FPR"],
            [[k, _f(v["auc"]), _f(v["tpr_at_1pct_fpr"])] for k, v in mia.items()],
        )
    lines += ["### Gradient inversion (Geiping et al. 2020)", ""]
    attack = leak.get("gradient_attack", {})
    if "not_computed" in attack or not attack:
        lines += [f"Not computed: {attack.get('not_computed', 'not run')}.", ""]
    else:
        lines += [
            "From one gradient of a CNN on one of its own training images, Adam on the "
            "cosine gradient distance with a TV prior reconstructs the image. The CNN trained "
            "on real data is the positive control; for the CNN trained on synthetic data, "
            "the question is whether its reconstructions resemble any sensitive image.",
            "",
        ]
        rows = []
        for key, r in attack.items():
            rows.append(
                [
                    f"CNN trained on {_who(key)}",
                    str(r["images"]),
                    _f(r["psnr_to_true_image"]["median"], 1),
                    _f(r["ssim_to_true_image"]["median"]),
                    _f(r["ssim_to_nearest_sensitive"]["median"]),
                ]
            )
        lines += _table(
            [
                "model",
                "images",
                "PSNR to its training image (dB, median)",
                "SSIM to it",
                "SSIM to nearest sensitive image",
            ],
            rows,
        )
        control = attack.get("real/cnn")
        if control and control["psnr_to_true_image"]["median"] < 20:
            lines += [
                "**The attack did not recover the control's images either** (median PSNR "
                f"{control['psnr_to_true_image']['median']:.1f} dB): at "
                "`evaluate.gradient_attack_steps` it is too weak against a trained CNN to "
                "say anything about the synthetic-data model, so do not read the second row "
                "as evidence of privacy. `bench/gradient_attack.py` measures how the control "
                "fares with more steps; Geiping et al. use 24,000 steps and restarts.",
                "",
            ]
        lines += ["![gradient inversion](gradient_attack.png)", ""]
    lines += _memorisation(leak.get("model_inversion", {}))
    lines += _gmi(leak.get("gan_attack", {}))
    if secs := ev.seconds:
        lines += ["## Time", ""]
        lines += _table(["part", "seconds"], [[k, f"{v:.1f}"] for k, v in secs.items()])
    return "\n".join(lines)


def _memorisation(inv: dict) -> list[str]:
    lines = ["### Model memorisation (model inversion)", ""]
    if "not_computed" in inv or not inv:
        return lines + [f"Not computed: {inv.get('not_computed', 'not run')}.", ""]
    lines += [
        "Images inverted from each CNN (per class, from noise, towards the class under the "
        "CNN's own BatchNorm running statistics, as DeepInversion does), and how close each "
        "comes to its nearest sensitive training image, beside real held-out images. A model "
        "that memorised training images would give inversions nearer to them than unseen "
        "real images are; the CNN trained on real data is the control.",
        "",
    ]
    rows = [
        [
            f"inverted from CNN trained on {_who(key)}",
            str(r["images"]),
            _f(r["classified_as_target"]),
        ]
        + _closeness_cells(r)
        for key, r in inv.items()
        if key != "heldout_real"
    ]
    rows.append(["real held-out images (baseline)", "", ""] + _closeness_cells(inv["heldout_real"]))
    lines += _table(["images", "n", "classified as target", *CLOSENESS_HEADERS], rows)
    return lines + ["![model inversion](model_inversion.png)", ""]


def _who(key: str) -> str:
    return "real data (control)" if key.startswith("real/") else "synthetic data"


def _closeness_cells(r: dict) -> list[str]:
    """The CLOSENESS_HEADERS cells of one attack's images (the held-out baseline has no
    near-copy count, and sits at 0.5 of its own median by definition)."""
    return [
        _f(r["pixel_l2"]["median"], 2),
        _f(r["pixel_l2"]["p05"], 2),
        _f(r["ssim"]["median"]),
        str(r["near_copies"]) if "near_copies" in r else "",
        _f(r["nearer_than_heldout_median"]) if "near_copies" in r else "0.5",
    ]


def _gmi(gmi: dict) -> list[str]:
    lines = ["### GAN-based model inversion (GMI, Zhang et al. 2020)", ""]
    if "not_computed" in gmi or not gmi:
        return lines + [f"Not computed: {gmi.get('not_computed', 'not run')}.", ""]
    judge = gmi["evaluator"]
    lines += [
        "A DCGAN trained on the public data is the image prior; its latents are optimised "
        "until each CNN assigns the target class. Attack accuracy is the share of recovered "
        "images that an independent classifier (trained on "
        f"{judge['trained_on']}; {_f(judge['heldout_accuracy'])} on held-out real images) "
        "assigns their target class. The prior alone, from random latents with targets "
        "dealt in turn, is what the public data gives an attacker without the model; the "
        "CNN trained on real data is the positive control.",
        "",
    ]
    names = {"prior_only": "GAN prior alone (random latents)"}
    rows = [
        [
            names.get(key, f"recovered from CNN trained on {_who(key)}"),
            str(r["images"]),
            _f(r["attack_accuracy"]),
            _f(r["classified_as_target"]) if "classified_as_target" in r else "",
        ]
        + _closeness_cells(r)
        for key, r in gmi.items()
        if key not in ("evaluator", "heldout_real")
    ]
    rows.append(
        ["real held-out images (baseline)", "", "", ""] + _closeness_cells(gmi["heldout_real"])
    )
    lines += _table(
        ["images", "n", "attack accuracy", "classified as target by the CNN", *CLOSENESS_HEADERS],
        rows,
    )
    control, prior = gmi.get("real/cnn"), gmi["prior_only"]
    if control and control["attack_accuracy"] < prior["attack_accuracy"] + 0.2:
        lines += [
            "**The attack recovered little from the control either** (attack accuracy "
            f"{control['attack_accuracy']:.2f} against {prior['attack_accuracy']:.2f} for the "
            "prior alone): at these settings it is too weak to say anything about the "
            "synthetic-data model; raise `evaluate.gan_attack_steps` or "
            "`evaluate.gan_attack_prior_steps`.",
            "",
        ]
    return lines + ["![GAN-based inversion](gan_inversion.png)", ""]


def write_report(path: Path, ev: Evaluation, *, class_names: list[str]) -> None:
    """Write :func:`render_report` to ``path`` atomically."""
    write_text(Path(path), render_report(ev, class_names=class_names))


def summary_line(ev: Evaluation) -> str:
    """The headline numbers of ``evaluate/metrics.json`` in one line."""

    def num(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    line = (
        f"FID {num(ev.fid, '.2f')}, precision {num(ev.precision, '.3f')}, "
        f"recall {num(ev.recall, '.3f')}, "
        f"downstream accuracy {num(ev.downstream_accuracy, '.3f')}"
    )
    if ev.privacy == "none":
        line += ", NOT differentially private"
    elif ev.privacy == "over_budget":
        line += f", epsilon {ev.epsilon_spent:.4g} OVER the target {ev.target_epsilon:g}"
    elif ev.privacy == "seeded":
        line += (
            f", epsilon {ev.epsilon_spent:.3f} but NOT differentially private against anyone "
            "who knows the config (privacy.reproducible_noise=true)"
        )
    elif ev.privacy == "dp":
        line += f", epsilon {ev.epsilon_spent:.3f} of {ev.target_epsilon} (delta {ev.delta:g})"
    return line
