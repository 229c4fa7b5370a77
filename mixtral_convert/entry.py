"""The entry point: run the command line and map every outcome to one line on stderr and an
exit code a CI can use (0 ok, 1 verify mismatch, 2 bad usage or input, 130 SIGINT, 143 SIGTERM)."""

from __future__ import annotations

import os
import signal
import sys
import traceback

import click

from .cli import cli
from .errors import ConvertError


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so that cleanup handlers run, like KeyboardInterrupt."""


def _on_sigterm(signum, frame):
    raise Terminated()


_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _line(msg) -> str:
    """Any message as a single line."""
    return " ".join(str(msg).split())


def _fail(msg: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    click.echo(f"error: {_line(msg)}", err=True)
    sys.exit(code)


def main(argv=None) -> None:
    """Entry point: maps every failure to one line on stderr and an exit code a CI can use.

    0 success; 1 verify found a mismatch; 2 bad usage, bad input or any other failure (one
    line `error: ...`; the traceback only with --debug); 130 SIGINT; 143 SIGTERM.
    """
    args = [str(a) for a in (argv if argv is not None else sys.argv[1:])]
    debug = "--debug" in args
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # not cli.main(): click would turn Ctrl-C into Abort and print a blank line first
        with cli.make_context("mixtral-convert", args) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: interrupted (SIGINT); nothing was left half-written", err=True)
        sys.exit(130)
    except _NoArgsIsHelp as e:  # bare `mixtral-convert` (or a bare group): the help, as click shows it
        click.echo(e.ctx.get_help(), err=True)
        sys.exit(2)
    except click.ClickException as e:
        _fail(f"{e.format_message()} (see 'mixtral-convert --help')", 2, debug)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        click.echo("error: interrupted (SIGINT); nothing was left half-written", err=True)
        sys.exit(130)
    except Terminated:
        if debug:
            traceback.print_exc()
        click.echo("error: terminated (SIGTERM); nothing was left half-written", err=True)
        sys.exit(143)
    except ConvertError as e:
        _fail(str(e), e.exit_code, debug)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}; check the path, its permissions and the disk", 2, debug)
    except MemoryError:
        _fail("out of memory; close other programs or use a machine with more memory (re-run with --debug "
              "and report it if this is a small checkpoint)", 2, debug)
    except Exception as e:  # a bug: still one line, never a half-written output (the output dir cleans up)
        _fail(f"internal error: {type(e).__name__}: {e} (re-run with --debug for the traceback and report it)",
              2, debug)
    sys.exit(0)


def entry() -> None:
    """The console script and `python -m mixtral_convert`: main(), then leave without running
    the interpreter's and the C++ runtime's exit handlers. By then everything is written, flushed
    and closed, or cleaned up (that happens while an exception unwinds, before main's handlers
    run); what is skipped is torch's own teardown, which (1) is slow (docs/performance.md), and
    (2) after an interruption can abort the process while a daemon worker thread is still inside
    a torch kernel ("terminate called without an active exception", exit -6 instead of 130)."""
    from .io.prefetch import reuse_freed_blocks
    reuse_freed_blocks()
    try:
        main()
        code = 0
    except SystemExit as e:
        if not isinstance(e.code, int):
            raise
        code = e.code
    from .formats.mistral import remove_copies
    remove_copies()  # os._exit runs no atexit handler
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
