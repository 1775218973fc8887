"""The ``blockpool`` command: :mod:`.main` dispatches to one module per subcommand
(:mod:`.demo`, :mod:`.inspect`, :mod:`.report` for ``bench``, :mod:`.doctor`; ``serve`` is
:mod:`blockpool.server.command`)."""

from blockpool.cli.main import COMMANDS, UsageError, build_parser, load_model, main, positive_int, writable_dir

__all__ = ["COMMANDS", "UsageError", "build_parser", "load_model", "main", "positive_int", "writable_dir"]
