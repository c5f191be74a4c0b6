"""The release boundary: ``release/`` holds only what may leave the data owner's hands.

A run folder mixes what a differential-privacy guarantee covers with what it does not:
the evaluation, the selection judge, checkpoints and per-step losses are all computed from
the sensitive data outside the ledger's mechanisms. Zipping the run folder would release
them. So every stage *declares* its outputs (an :class:`Output` per file or folder, in the
stage module's ``RELEASE``, or ``release_outputs(cfg)`` where it depends on the config)
with where each comes from:

* ``mechanism``: the output of a DP mechanism of the ledger (``"stage/name"``), e.g. the
  noisy histogram or the DP-SGD model;
* ``inputs``: what else it is computed from, each ``"public"`` (public data, the config,
  seeds) or another declared output (``"stage/path"``): post-processing, which costs no
  privacy when every input is releasable.

:func:`write_release` resolves that lineage for every declared output. An output is
releasable when its mechanism (if any) is completed in the run's ledger and all its
inputs are releasable, and when the ledger records no non-private use of the sensitive
data. Only those are copied into ``release/``, beside the ledger, a ``MANIFEST.json``
(every file with its SHA-256, the output it copies and its lineage) and a ``RELEASE.md``
stating (epsilon, delta) and what was done. Anything not declared is never released.
An invocation that finished nothing new leaves ``release/`` as it is.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privimage.data.archives import file_digest
from privimage.data.cache import cache_key
from privimage.io.artifacts import (
    LEDGER,
    guarantee,
    is_done,
    mechanism_line,
    privacy_status,
    read_ledger,
)
from privimage.io.atomic import is_leftover

RELEASE_DIR = "release"
MANIFEST = "MANIFEST.json"
README = "RELEASE.md"
PUBLIC = "public"

# What stays behind, said in RELEASE.md so nobody goes looking for it in release/.
NOT_RELEASED = (
    "`evaluate/` (fidelity, utility and leakage measured on the sensitive data, with "
    "pictures of real training images)",
    "`query/selection_score.json` (a judge trained without DP on the sensitive data)",
    "`finetune/stats.jsonl` and the logs (exact losses of sensitive batches)",
    "checkpoints (model, optimizer and the secret random streams)",
    "`config.yaml` and `.hydra/` (paths on the data owner's machines)",
)


@dataclass(frozen=True)
class Output:
    """One output of a stage (a file or folder in its folder) and where it comes from.

    Attributes:
        mechanism: ``"stage/name"`` of the ledger mechanism this is the output of, or
            None for post-processing.
        inputs: What else it is computed from: ``"public"`` or ``"stage/path"`` of
            another declared output.
        dest: Where it goes inside ``release/``; None keeps it out of ``release/`` (an
            intermediate, such as the pretrained model, declared only for the lineage).
    """

    mechanism: str | None = None
    inputs: tuple[str, ...] = ()
    dest: str | None = None


def _lineage(
    node: str, outputs: dict[str, Output], completed: set[str], seen: tuple[str, ...] = ()
) -> tuple[set[str], str | None]:
    """The mechanisms ``node`` derives from, and why it is not releasable (None if it is).

    ``completed`` holds the ``"stage/name"`` of every mechanism the ledger completed.
    """
    if node == PUBLIC:
        return set(), None
    if node in seen:
        return set(), f"{node} derives from itself"
    output = outputs.get(node)
    if output is None:
        return set(), f"{node} is not a declared releasable output"
    mechanisms: set[str] = set()
    if output.mechanism is not None:
        if output.mechanism not in completed:
            return set(), f"{node} needs {output.mechanism}, not completed in the ledger"
        mechanisms.add(output.mechanism)
    for parent in output.inputs:
        more, why = _lineage(parent, outputs, completed, (*seen, node))
        if why is not None:
            return set(), why
        mechanisms |= more
    return mechanisms, None


def _copy(src: Path, dst: Path, root: Path, *, copy_of: str, mechanisms: set[str]) -> dict:
    """Copy ``src`` to ``dst`` (inside ``root``) and return its MANIFEST entry."""
    # A copy, not a hard link: some writers (np.savez, savefig, save_pretrained) rewrite
    # a file in place, and a rerun of a stage must not change what was released.
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    digest = file_digest(dst)
    return {
        "path": dst.relative_to(root).as_posix(),
        "sha256": digest["sha256"],
        "bytes": digest["size"],
        "copy_of": copy_of,
        "mechanisms": sorted(mechanisms),
    }


def _files(root: Path) -> list[Path]:
    """The files of an output; a killed write's temporary file is none of them."""
    if not root.is_dir():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not is_leftover(p))


def write_release(
    run_dir: Path, declarations: dict[str, dict[str, Output]], *, summary: dict[str, str]
) -> Path:
    """(Re)build ``run_dir/release/`` from the finished stages' releasable outputs.

    Args:
        run_dir: The run folder.
        declarations: Per stage, its declared outputs (path inside the stage folder to
            :class:`Output`).
        summary: A few ``what: value`` lines for RELEASE.md (method, data, model).

    Returns:
        The release folder. It is built beside the old one and swapped in, so a crash
        leaves the old or the new release, never a mix.
    """
    run_dir = Path(run_dir)
    ledger_path = run_dir / LEDGER
    ledger = read_ledger(run_dir)
    outputs = {
        f"{stage}/{path}": output
        for stage, declared in declarations.items()
        if is_done(run_dir, stage)
        for path, output in declared.items()
        if (run_dir / stage / path).exists()
    }
    final = run_dir / RELEASE_DIR
    built_from = _basis(run_dir, ledger_path, outputs, summary)
    if (final / MANIFEST).exists() and (
        json.loads((final / MANIFEST).read_text()).get("built_from") == built_from
    ):
        return final  # nothing finished or changed since the last build
    status = privacy_status(ledger)
    private_use = [e["description"] for e in ledger.get("non_private", [])]
    if status == "over_budget":
        private_use.append(
            f"epsilon spent {ledger['epsilon_spent']:.4g} exceeds the target "
            f"{ledger['target_epsilon']:g}"
        )
    # A folder of its own per build (two invocations in one run folder never share one),
    # with the usual permissions rather than mkdtemp's owner-only ones.
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{RELEASE_DIR}.tmp."))
    tmp.chmod(0o755)
    files: list[dict[str, Any]] = []
    withheld: list[str] = []
    completed = {
        f"{m['stage']}/{m['name']}"
        for m in ledger.get("mechanisms", [])
        if m.get("status") == "completed"
    }
    for node, output in outputs.items():
        if output.dest is None:
            continue
        mechanisms, why = _lineage(node, outputs, completed)
        if private_use:
            why = f"no guarantee covers this run ({private_use[0]})"
        if why is not None:
            withheld.append(f"`{node}`: {why}")
            continue
        source = run_dir / node
        for src in _files(source):
            rel = src.relative_to(source) if source.is_dir() else Path()
            copy_of = (Path(node) / rel).as_posix()
            files.append(
                _copy(src, tmp / output.dest / rel, tmp, copy_of=copy_of, mechanisms=mechanisms)
            )
    if ledger_path.exists():
        files.append(_copy(ledger_path, tmp / LEDGER, tmp, copy_of=LEDGER, mechanisms=set()))
    manifest = {
        "built_from": built_from,
        # What the files are: the guarantee in words, and as flags. Seeded noise keeps
        # the files (tests compare them) but no guarantee holds against the config's
        # readers, so differentially_private is false then too.
        "guarantee": guarantee(ledger),
        "differentially_private": status == "dp",
        "noise_secret": bool(ledger.get("noise_secret", False)),
        "epsilon_spent": ledger.get("epsilon_spent"),
        "delta": ledger.get("delta"),
        "files": files,
        "withheld": withheld,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (tmp / README).write_text(render_release_md(manifest, ledger, summary))
    old = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{RELEASE_DIR}.old."))
    if final.exists():
        final.rename(old / RELEASE_DIR)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _basis(run_dir: Path, ledger_path: Path, outputs: dict[str, Output], summary: dict) -> str:
    """A key of everything a build reads: the ledger, the summary, the declarations, and
    the size and mtime of every file of every finished declared output (a stat each: far
    cheaper than copying and hashing them again on every invocation)."""
    stats = {}
    for node in outputs:
        for path in _files(run_dir / node):
            st = path.stat()
            stats[path.relative_to(run_dir).as_posix()] = [st.st_size, st.st_mtime_ns]
    return cache_key(
        {
            "ledger": ledger_path.read_text() if ledger_path.exists() else None,
            "summary": summary,
            "outputs": {node: [o.mechanism, list(o.inputs), o.dest] for node, o in outputs.items()},
            "files": stats,
            "version": 1,
        }
    )


def render_release_md(manifest: dict, ledger: dict, summary: dict[str, str]) -> str:
    """RELEASE.md: the guarantee, what was done, what is here and what is not."""
    lines = ["# privimage release", "", f"**{guarantee(ledger)}.**", ""]
    lines += [f"- {key}: {value}" for key, value in summary.items()]
    mechanisms = ledger.get("mechanisms", [])
    if mechanisms:
        lines += [
            "",
            f"Mechanisms on the sensitive data, composed by one `{ledger.get('accountant')}` "
            "accountant (all in `privacy.json`):",
            "",
        ]
        lines += [mechanism_line(m) for m in mechanisms]
    lines += ["", "## Contents", ""]
    by_top: dict[str, int] = {}
    for f in manifest["files"]:
        top = f["path"].split("/")[0]
        by_top[top] = by_top.get(top, 0) + 1
    if list(by_top) == [LEDGER] or not by_top:
        lines.append("Only the ledger: no output of this run is covered by the guarantee.")
    for top, count in by_top.items():
        lines.append(f"- `{top}`: {count} file(s)")
    lines += [f"- `{MANIFEST}`: every file with its SHA-256, source and lineage", ""]
    if manifest["withheld"]:
        lines += ["Withheld (not covered by the guarantee):", ""]
        lines += [f"- {w}" for w in manifest["withheld"]] + [""]
    lines += ["Never released (computed from the sensitive data outside the ledger):", ""]
    lines += [f"- {item}" for item in NOT_RELEASED]
    lines += [f"- {m['description']}" for m in ledger.get("measurements", [])] + [""]
    lines += [
        "Threat model: the adversary knows the code, the config and seed, the public data "
        "and everything in this folder, but not the DP mechanisms' secret random draws; "
        "the number of sensitive images and their class names are treated as public.",
        "",
    ]
    return "\n".join(lines)
