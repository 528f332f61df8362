"""``python -m dalle_kernels masks ...``: the package's command line.

The mask tool lives in ``dalle_kernels.masks``; running that module directly with ``-m`` makes Python warn,
because importing the package has already imported it. This entry point runs it without the warning.
"""
import sys

from .masks import _main as _masks_main

COMMANDS = {"masks": (_masks_main, "draw DALL-E's attention masks as PNGs, or count kernel tiles")}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:8s} {doc}" for name, (_, doc) in COMMANDS.items()]
        print("usage: python -m dalle_kernels COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; expected one of {sorted(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
