"""Reading an engine's command line as its argument parser would: options' values and positionals."""

from __future__ import annotations

import os


def option(argv: list[str], *names: str) -> str | None:
    """The last value given to any of `names` (`--opt value` or `--opt=value`), as argparse takes it."""
    value = None
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
    return value


def positional(args: list[str]) -> str | None:
    """The first argument that is not an option or an option's value (`--opt value`)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            skip = "=" not in arg
            continue
        return arg
    return None


def port(argv: list[str], default: int, *names: str) -> int | None:
    """The port option's value, or the engine's default; None when it is not a TCP port."""
    text = option(argv, *names)
    try:
        value = int(text) if text is not None else default
    except ValueError:
        return None
    return value if 0 < value < 65536 else None


def runs_program(argv: list[str], program: str) -> bool:
    """The command runs `program` itself, or an interpreter running it (`python3 /usr/bin/program`)."""
    return any(os.path.basename(arg) == program for arg in argv[:2])
