"""The Space's Check, Merge and Push without Gradio: `ame_hf.check`, `ame_hf.merge` and `ame_hf.push_to_hub` as
the form calls them, and the Markdown the app shows after a merge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fetch import format_size
from .space_select import Progress, card_markdown, form_config, parse_ingredients

if TYPE_CHECKING:
    from .records import MergeResult

__all__ = ["MergeView", "one_line", "run_check", "run_merge", "run_push", "summary_markdown"]

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def one_line(err: BaseException) -> str:
    """The error as the CLI prints it: one line, whitespace collapsed.

    Args:
        err: any exception.

    Returns:
        Its message on one line (its class name when it has none).

    >>> one_line(ValueError("two\\n   lines"))
    'two lines'
    """
    return " ".join(str(err).split()) or type(err).__name__


def _weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def run_check(ingredients: str | None, dtype: str = "auto", token: str | None = None, *,
              options: dict[str, Any] | None = None, allow_local_paths: bool = True) -> str:
    """The compatibility report of the ingredients, as `ame-hf check` prints it.

    Args:
        ingredients: the form's text, one reference a line.
        dtype: the output dtype to check for (`auto`: the ingredients').
        token: Hub token.
        options: the other options of `check` as the form gives them (`pivot`, `base`, `variant`,
            `tokenizer_source`); blank means the default.
        allow_local_paths: accept local directories as ingredients, pivot, tokenizer source or base (False on a
            public Space).

    Returns:
        The report's text.

    Raises:
        AmeError: an invalid option, a local path where they are disabled, or a reference that cannot be read.
    """
    import ame_hf
    from .config import CHECK_FIELDS

    refs = parse_ingredients(ingredients)
    config = form_config(refs, {**(options or {}), "dtype": dtype}, allow_local_paths=allow_local_paths)
    return ame_hf.check(refs, token=token, **{name: getattr(config, name) for name in CHECK_FIELDS}).format()


@dataclass(frozen=True, kw_only=True)
class MergeView:
    """What the app shows after a merge; `folder` (the merge output) is what Push uploads.

    Attributes:
        folder: the merge output.
        card_markdown: its model card, for display.
        config_yaml: its `ame_config.yaml`.
        summary_markdown: the Summary (`summary_markdown`).
    """

    folder: Path
    card_markdown: str
    config_yaml: str
    summary_markdown: str


def run_merge(ingredients: str | None, options: dict[str, Any], work_dir: Path, token: str | None = None, *,
              progress: Progress | None = None, allow_local_paths: bool = True) -> MergeView:
    """Merge with `ame_hf.merge` into `work_dir/merged` and render the card, config and summary.

    Args:
        ingredients: the form's text, one reference a line.
        options: `AmeConfig` fields as the form gives them (`base` included): blank strings mean the default.
        work_dir: an empty folder for the output.
        token: Hub token.
        progress: called with (fraction done, description) as the merge goes.
        allow_local_paths: accept local directories as ingredients, pivot, tokenizer source or base (False
            on a public Space).

    Returns:
        A `MergeView` of the output.

    Raises:
        AmeError: invalid options, a local path where they are disabled, or whatever `merge` refuses.
    """
    import ame_hf

    refs = parse_ingredients(ingredients)
    config = form_config(refs, options, allow_local_paths=allow_local_paths)

    def on_bytes(done: int, total: int) -> None:
        if progress is not None and total:
            progress(done / total, f"Merging: {format_size(done)} of {format_size(total)}")

    if progress is not None:
        progress(0.0, "Downloading and checking the ingredients")
    result = ame_hf.merge(refs, work_dir / "merged", config, token=token, progress=False, callback=on_bytes)
    return MergeView(
        folder=result.path,
        card_markdown=card_markdown((result.path / "README.md").read_text(encoding="utf-8")),
        config_yaml=(result.path / "ame_config.yaml").read_text(encoding="utf-8"),
        summary_markdown=summary_markdown(result),
    )


def summary_markdown(result: MergeResult) -> str:
    """The Summary under the Merge tab: what was merged, how, how fast, and each ingredient's commit and size.

    Args:
        result: the merge's record.

    Returns:
        Markdown: a sentence and a table.
    """
    cfg = result.config
    lr = f"relative lr {cfg.relative_lr}" if cfg.relative_lr is not None else f"lr {cfg.lr}"
    out_size = sum(f.stat().st_size for f in result.path.iterdir() if f.is_file())
    lines = [
        (f"Merged **{len(result.ingredients)}** checkpoints with **{cfg.optimizer}** ({lr}, {cfg.schedule} "
         f"schedule, {cfg.epochs} epoch(s)) in **{result.seconds:.1f} s**: {format_size(out_size)} written."),
        "",
        "| # | ingredient | commit sha | weights |",
        "|---|---|---|---|",
    ]
    for i, ing in enumerate(result.ingredients):
        sha = f"`{ing.sha}`" if ing.sha else "local directory"
        lines.append(f"| {i} | {ing.display_name} | {sha} | {format_size(_weights_size(ing.path))} |")
    return "\n".join(lines)


def run_push(folder: str | Path | None, repo_id: str | None, private: bool = False, token: str | None = None, *,
             revision: str | None = None, create_pr: bool = False, commit_message: str | None = None) -> str:
    """Upload a merge (or tune) output with its card.

    Args:
        folder: the output of the latest Merge or Tune (None before one).
        repo_id: the target repo.
        private: create the repo private (unticked: the Hub's default, or the existing repo's visibility).
        token: Hub token with write access.
        revision: the branch to push to (blank: the repo's default branch).
        create_pr: open a pull request instead of committing to the branch.
        commit_message: the commit's message (blank: the default).

    Returns:
        The repo (or pull request) URL.

    Raises:
        AmeError: nothing to push yet, or what `push_to_hub` refuses.
    """
    import ame_hf

    if not folder or not (Path(folder) / "ame_config.yaml").is_file():
        raise ame_hf.InvalidConfigError("nothing to push yet: run Merge or Tune first")
    # An unticked box leaves the Hub's default (and an existing repo's visibility) alone.
    return ame_hf.push_to_hub(folder, (repo_id or "").strip(), token=token, private=True if private else None,
                              revision=(revision or "").strip() or None, create_pr=bool(create_pr),
                              commit_message=(commit_message or "").strip() or None)
