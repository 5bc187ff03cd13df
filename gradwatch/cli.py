"""The ``gradwatch`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_plugins(args: argparse.Namespace) -> int:
    """List the plugins a watch would load, with the hooks each implements."""
    from rich.console import Console
    from rich.table import Table

    from gradwatch.manager import make_plugin_manager

    pm = make_plugin_manager(autoload=not args.no_autoload)
    table = Table(title="gradwatch plugins", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("from")
    table.add_column("hooks")
    for name, plugin in pm.list_name_plugin():
        dist = next((d for p, d in pm.list_plugin_distinfo() if p is plugin), None)
        origin = f"{dist.project_name} {dist.version}" if dist is not None else getattr(plugin, "__name__", "")
        hooks = sorted(c.name.removeprefix("gradwatch_") for c in pm.get_hookcallers(plugin) or ())
        table.add_row(name, origin, ", ".join(hooks))
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gradwatch import __version__

    parser = argparse.ArgumentParser(prog="gradwatch", description="Gradient diagnostics for PyTorch.")
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins = sub.add_parser("plugins", help="list the plugins a watch loads and the hooks they implement")
    plugins.add_argument("--no-autoload", action="store_true", help="leave out third-party entry-point plugins")
    plugins.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
