"""``python -m dalle_kernels masks ...``: the package's command line.

The mask tool lives in ``dalle_kernels.masks``; running that module directly with ``-m`` makes Python warn,
because importing the package has already imported it. This entry point runs it without the warning.
"""
import sys

from .masks import _main as _masks_main

COMMANDS = {"masks": (_masks_main, "draw DALL-E's attention masks as PNGs, or count kernel tiles")}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0](argv[1:])
    lines = [f"  {name:8s} {doc}" for name, (_, doc) in COMMANDS.items()]
    print("usage: python -m dalle_kernels COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
    if argv and argv[0] in ("-h", "--help"):
        return 0
    what = f"unknown command {argv[0]!r}" if argv else "no command given"
    print(f"\n{what}; expected one of {sorted(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
