"""Command-line interface: parse, call one operation, print. No conversion logic lives here."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from . import __version__
from .errors import ConvertError, Mismatch


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so that cleanup handlers run, like KeyboardInterrupt."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> None:
    """Entry point: maps failures to one line on stderr and an exit code a CI can use.

    0 success; 1 verify found a mismatch; 2 bad usage or input; 130 SIGINT; 143 SIGTERM.
    """
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="mixtral-convert", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("error: interrupted; nothing was left half-written", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()} (see 'mixtral-convert --help')", err=True)
        sys.exit(2)
    except (ConvertError, Mismatch) as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted (SIGINT); nothing was left half-written", err=True)
        sys.exit(130)
    except Terminated:
        click.echo("error: terminated (SIGTERM); nothing was left half-written", err=True)
        sys.exit(143)
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror or e}", err=True)
        sys.exit(2)
    sys.exit(0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mixtral-convert")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
def cli(debug: bool) -> None:
    """Convert Mixtral checkpoints to LLaMA2-Accessory's tensor-parallel layouts, and prove
    the result is the same model.

    \b
    Typical use, on the torrent release:
      mixtral-convert concat DIR                # join consolidated.00.pth-split0..9
      mixtral-convert split DIR -n 8            # base layout: whole experts per rank
      mixtral-convert split-sparse DIR -n 8     # sparse layout: expert FFN dims sliced
      mixtral-convert verify DIR/converted --source DIR

    Exit codes: 0 ok, 1 verify mismatch, 2 bad usage or input, 130/143 interrupted.
    """
