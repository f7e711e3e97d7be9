"""``python -m echo COMMAND ...``: train, transcribe, evaluate, ablate, demo."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("echo.train", "train a model from a config"),
    "transcribe": ("echo.decode", "transcribe audio files with a checkpoint"),
    "evaluate": ("echo.evaluate", "WER/CER of a checkpoint on a manifest"),
    "ablate": ("echo.ablate", "pitch-feature ablation over seeds"),
    "demo": ("echo.demo", "build a small corpus, train briefly, score and transcribe"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the sub-command's ``main``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: python -m echo COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
