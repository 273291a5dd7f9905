"""``python -m mlx_memosight <command> [args]``: run one of the command-line tools."""

import importlib
import sys

COMMANDS = ("convert", "generate", "lora", "fuse", "evaluate", "bench", "server", "chat")


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(f"usage: python -m mlx_memosight {{{','.join(COMMANDS)}}} [args]")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    name = sys.argv[1]
    if name not in COMMANDS:
        print(f"mlx_memosight: unknown command {name!r} (commands: {', '.join(COMMANDS)})",
              file=sys.stderr)
        sys.exit(2)
    try:
        module = importlib.import_module(f"mlx_memosight.{name}")
    except ModuleNotFoundError:
        print(f"mlx_memosight: the {name} command is not available in this version", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"mlx_memosight.{name}"] + sys.argv[2:]
    module.main()


if __name__ == "__main__":
    main()
