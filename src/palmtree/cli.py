"""``palmtree`` command line: ``train``, ``bench``, ``verify``.

Each subcommand lives in its own module with a ``main(argv) -> int`` so tests drive
it directly; heavy imports happen only inside the chosen subcommand.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": (
        "palmtree.train",
        "align an image and a text encoder with the CLIP or SigLIP loss (the demo)",
    ),
    "bench": ("palmtree.bench", "time and measure the memory of the loss backends and peers"),
    "verify": ("palmtree.verify", "check the distributed loss against a float64 reference"),
}


def _usage() -> str:
    lines = ["usage: palmtree <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'palmtree <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"palmtree: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
