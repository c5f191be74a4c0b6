"""``privimage push <run> --model-repo user/name --dataset-repo user/name``: upload a
run's release to the Hugging Face Hub, for users who are online.

Only ``release/`` leaves the machine, and only when its ledger gives a DP guarantee
(:func:`privimage.io.artifacts.privacy_status` is ``dp``): the model folder
(``release/model/``: the pipeline, its weights and model card) becomes a model repo; the
synthetic dataset (``release/synthetic/dataset/``) is pushed with ``datasets``'
``push_to_hub`` and its card put on top. :func:`plan` decides what goes where without
touching the network; :func:`push` then makes the calls.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from privimage.errors import PrivImageError
from privimage.io.artifacts import DATASET, LEDGER, privacy_status
from privimage.io.cards import CARD
from privimage.io.release import README, RELEASE_DIR


@dataclass(frozen=True)
class Upload:
    """One folder of the release and the hub repo it goes to."""

    folder: Path
    repo_id: str
    repo_type: str  # "model" or "dataset"


def plan(run_dir: Path, *, model_repo: str | None, dataset_repo: str | None) -> list[Upload]:
    """What :func:`push` would upload; raises a one-line error when it must not."""
    if not model_repo and not dataset_repo:
        raise PrivImageError("nothing to push: give --model-repo and/or --dataset-repo")
    release = Path(run_dir) / RELEASE_DIR
    ledger_file = release / LEDGER
    if not ledger_file.exists():
        raise PrivImageError(f"{release} holds no {LEDGER}; finish the run first")
    status = privacy_status(json.loads(ledger_file.read_text()))
    if status != "dp":
        raise PrivImageError(
            f"the release in {release} gives no DP guarantee (privacy status {status!r}, "
            f"see {release / README}); privimage push uploads only DP releases"
        )
    wanted = [
        (model_repo, release / "model", "model"),
        (dataset_repo, release / "synthetic" / DATASET, "dataset"),
    ]
    uploads = []
    for repo_id, folder, repo_type in wanted:
        if not repo_id:
            continue
        if repo_id.count("/") != 1:
            raise PrivImageError(f"repo id {repo_id!r} is not 'user/name'; give one like that")
        if not (folder / CARD).exists():
            raise PrivImageError(f"{folder} has no {CARD} card; rerun the run to rebuild it")
        uploads.append(Upload(folder, repo_id, repo_type))
    return uploads


def push(uploads: list[Upload], *, private: bool) -> list[str]:
    """Upload each planned folder; returns the repo URLs."""
    import datasets
    from huggingface_hub import DatasetCard, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()
    urls = []
    try:
        for up in uploads:
            api.create_repo(up.repo_id, repo_type=up.repo_type, private=private, exist_ok=True)
            if up.repo_type == "model":
                api.upload_folder(folder_path=str(up.folder), repo_id=up.repo_id)
            else:
                dataset = datasets.load_from_disk(str(up.folder))
                dataset.push_to_hub(up.repo_id, private=private)
                DatasetCard.load(up.folder / CARD).push_to_hub(up.repo_id, repo_type="dataset")
            kind = "datasets/" if up.repo_type == "dataset" else ""
            urls.append(f"https://huggingface.co/{kind}{up.repo_id}")
    except OfflineModeIsEnabled as e:
        raise PrivImageError(f"cannot push while offline ({e}); unset HF_HUB_OFFLINE") from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrivImageError(
            f"the upload to the Hub failed: {first}; check `hf auth login`"
        ) from None
    return urls


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="privimage push", description="Upload a run's DP release to the Hugging Face Hub."
    )
    parser.add_argument("run", type=Path, help="the run directory (holding release/)")
    parser.add_argument("--model-repo", help="user/name of the model repo")
    parser.add_argument("--dataset-repo", help="user/name of the dataset repo")
    parser.add_argument("--private", action="store_true", help="create private repos")
    args = parser.parse_args(argv)
    uploads = plan(args.run, model_repo=args.model_repo, dataset_repo=args.dataset_repo)
    for up in uploads:
        print(f"privimage push: {up.folder} -> {up.repo_type} repo {up.repo_id}")
    for url in push(uploads, private=args.private):
        print(f"privimage push: {url}")
    return 0
