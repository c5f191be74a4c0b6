"""DP fine-tuning settings compared on one pretrained UNet, judged on public signals only.

For each ``--variant`` (a name and Hydra overrides of the ``finetune.*`` group), this
copies a finished run's ``query/`` and ``pretrain/`` into ``--out/<name>``, with the run's
privacy ledger cut back to the query's spend (so fine-tuning is calibrated as in the
original run, to the same target epsilon), fine-tunes again with DP-SGD (fresh secret
noise, so rows differ by that too), and scores the fine-tuned UNet with
``bench/handwriting_proxy.py`` (public handwriting proxy and the glyph judge). It prints
one JSON line per variant: its noise multiplier, steps, fine-tuning seconds and scores.
The MNIST test split is never read.

Each variant is a separate DP release of the same sensitive training data, recorded in its
own copy's ledger only: comparing V variants spends V times the fine-tuning budget on that
data. That is acceptable for the embedded demo digits this bench is for; on a real
sensitive dataset, count the comparison as V releases (or compare on public data).

    python bench/refinetune.py runs/demo/main --experiment demo \\
        --variant base --variant lr3e-3 finetune.lr=3e-3 \\
        --variant b512e6 finetune.batch_size=512 finetune.epochs=6 finetune.lr=2e-3
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def query_only_ledger(run_dir: Path, dest: Path) -> None:
    """The run's ledger as it stood before fine-tuning: the query's mechanism alone."""
    ledger = json.loads((run_dir / "privacy.json").read_text())
    ledger["mechanisms"] = [m for m in ledger["mechanisms"] if m["stage"] == "query"]
    ledger["events"] = [e for e in ledger["events"] if e["stage"] == "query"]
    if not ledger["mechanisms"]:
        sys.exit(f"{run_dir}/privacy.json records no query; this bench needs a PrivImage run")
    ledger["epsilon_spent"] = ledger["mechanisms"][-1]["epsilon_after"]
    (dest / "privacy.json").write_text(json.dumps(ledger, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run (query/ and pretrain/)")
    parser.add_argument("--experiment", default="demo")
    parser.add_argument(
        "--variant", nargs="+", action="append", required=True, metavar="NAME [OVERRIDE ...]"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/refinetune"))
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3, help="proxy classifier seeds")
    args = parser.parse_args()
    for name, *overrides in args.variant:
        dest = args.out / name
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for stage in ("query", "pretrain"):
            shutil.copytree(args.run_dir / stage, dest / stage)
        query_only_ledger(args.run_dir, dest)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "privimage", f"experiment={args.experiment}",
             f"hydra.run.dir={dest}", "stages=[finetune]", *overrides],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        spent = [
            m for m in json.loads((dest / "privacy.json").read_text())["mechanisms"]
            if m["stage"] == "finetune"
        ]  # fmt: skip
        proxy = subprocess.run(
            [sys.executable, str(HERE / "handwriting_proxy.py"), str(dest / "finetune" / "unet"),
             "--per-class", str(args.per_class), "--seeds", str(args.seeds)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        scores = json.loads(proxy.stdout.strip().splitlines()[-1])
        print(
            json.dumps(
                {
                    "variant": name,
                    "overrides": overrides,
                    "noise_multiplier": spent[-1]["noise_multiplier"],
                    "steps": spent[-1]["steps"],
                    "epsilon_after": spent[-1]["epsilon_after"],
                    "finetune_s": round(seconds),
                    "proxy_accuracy": scores["proxy_accuracy"],
                    "spread": scores["spread"],
                    "glyph_judge_accuracy": scores["glyph_judge_accuracy"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
