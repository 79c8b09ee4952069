"""Push a repaired model folder (timm or transformers export, or a repair run folder) to the Hugging Face hub.

    python tools/push.py DIR --repo-id USER/NAME [--private] [--revision REV] [--create-pr] [--dry-run]

Only the files a model folder consists of are uploaded (config, weights, image processor, card, repair report
and pictures); sub-folders, other files and symlinks out of DIR are left out and listed with the reason. A
missing README.md (the model card) is generated and uploaded from memory: DIR is never written to. The token
comes from HF_TOKEN or `hf auth login`; it is never printed. A folder that is not a finished model folder is
refused (exit 2), a failed upload ends with one line (exit 1).
"""

from __future__ import annotations

from sinder_hub.cli import ArgumentParser
from sinder_hub.hub import PushResult, push_folder


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="push", description=__doc__.splitlines()[0])
    parser.add_argument("folder", metavar="DIR", help="folder with config.json and the weights")
    parser.add_argument("--repo-id", required=True, help="hub model repo, USER/NAME (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to commit to (created if needed)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help="commit title")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the files to upload and those left out, print the card; no network"
    )
    args = parser.parse_args(argv)

    result = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        dry_run=args.dry_run,
        commit_message=args.commit_message,
    )

    if args.dry_run:
        print(f"dry run: would upload {len(result.files)} files from {result.folder} to {result.repo_id}")
        for name, size in result.files:
            note = (
                "  (model card, generated: not written to the folder)"
                if name == "README.md" and result.card_is_new
                else ""
            )
            print(f"{size:>14,d}  {name}{note}")
        print_left_out(result)
        print("\n--- README.md ---")
        print(result.card)
        return 0
    print(f"pushed {len(result.files)} files from {result.folder} to {result.repo_id}")
    print_left_out(result)
    print(result.pr_url or result.commit_url)
    return 0


def print_left_out(result: PushResult) -> None:
    """The folder entries not uploaded, one a line with the reason (nothing when none was left out)."""
    if not result.left_out:
        return
    print(f"left out {len(result.left_out)} (not uploaded):")
    width = max(len(name) for name, _ in result.left_out)
    for name, reason in result.left_out:
        print(f"  {name:<{width}}  {reason}")
