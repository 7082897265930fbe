"""The `geochat` command line: a thin dispatcher over command modules in `geochat.commands`.

Every command registers its own sub-parser; this module only parses, dispatches, and turns
`GeoChatError` (and a few OS errors) into one line on stderr with exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence

import geochat.commands
from geochat.errors import BandSelectionError, GeoChatError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geochat", description="Chat about remote-sensing imagery: grounded boxes, map coordinates, cited sources."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each module in geochat.commands defines `register(subparsers)`, adding its sub-command and `func`.
    for module in sorted(pkgutil.iter_modules(geochat.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"geochat.commands.{module.name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "inputs", None), list) and not any(e.startswith("-") for e in extra):
        args.inputs += extra  # `ask IMAGE --task refer "question"`: options between the image and the question
    elif extra:
        parser.parse_args(argv)  # argparse's own error for what it does not know
    if not args.verbose:
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except BandSelectionError as exc:  # the library's wording fits the app and the API too; here: the flag
        flag = f" (pass the {exc.option} with --{exc.option})" if exc.option else ""
        print(f"geochat: error: {exc}{flag}", file=sys.stderr)
        return EXIT_USAGE
    except GeoChatError as exc:
        print(f"geochat: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"geochat: error: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("geochat").setLevel(logging.WARNING)  # ours say what a user should know (a run waiting)
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
