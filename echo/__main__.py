"""``python -m echo COMMAND ...``: train, transcribe, evaluate, ablate, demo."""

from __future__ import annotations

import os
import sys

COMMANDS = {
    "train": ("echo.train", "train a model from a config"),
    "transcribe": ("echo.decode", "transcribe audio files with a checkpoint"),
    "evaluate": ("echo.evaluate", "WER/CER of a checkpoint on a manifest"),
    "ablate": ("echo.ablate", "pitch-feature ablation over seeds"),
    "demo": ("echo.demo", "build a small corpus, train briefly, score and transcribe"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the sub-command's ``main``; returns the exit status. Bad input that only shows
    once the command runs (a config value, a manifest line, a file that is not a checkpoint:
    ``ValueError``, ``TypeError``, ``FileNotFoundError``) is one line on stderr and status 1,
    not a traceback (``ECHO_DEBUG=1`` re-raises it)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
        usage = "usage: python -m echo COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            return 0
        problem = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"{usage}\npython -m echo: error: {problem}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        return module.main(argv[1:])
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("ECHO_DEBUG") == "1":
            raise
        print(f"python -m echo {argv[0]}: error: {e}\n(ECHO_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
