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


@cli.command()
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the joined file (a directory puts it there under the base "
                   "name). Default: the base name beside the pieces, e.g. consolidated.00.pth.")
@click.option("--md5", metavar="HEX", default=None, help="Expected md5 of the joined file.")
@click.option("--sha256", metavar="HEX", default=None, help="Expected sha256 of the joined file.")
@click.option("--checksums", metavar="FILE", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="md5sum/sha256sum-style file; the line naming OUTPUT's file "
                                 "name gives the expected checksum.")
@click.option("--force", is_flag=True, help="Overwrite an existing OUTPUT.")
@click.option("--remove-pieces", is_flag=True,
              help="Delete the pieces after the joined file is written and verified.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bar or summary; print only the md5 and sha256 lines.")
def concat(inputs, output, md5, sha256, checksums, force, remove_pieces, quiet):
    """Join the torrent's byte pieces (consolidated.00.pth-split0 ... -splitN) into one
    checkpoint, verified, instead of `cat`.

    INPUT is a directory (its *-splitN pieces are taken) or piece files, in any order; they are
    joined in numeric order of the suffix (split10 after split9). Missing, duplicate or empty
    pieces, and pieces of different base names, are refused by name.

    While copying, md5 and sha256 are computed (and compared with --md5, --sha256 or
    --checksums when given). Then, even without a checksum, the result must be a loadable torch
    checkpoint: a complete zip with every record where its directory says, every tensor record
    with the bytes its tensors need, and torch.load(weights_only=True) giving a dict of tensors.
    This catches a truncated piece.

    The data goes to a hidden temporary file beside OUTPUT, fsynced and renamed only when every
    check passed; on any failure, Ctrl-C or SIGTERM it is removed. An existing OUTPUT is refused
    without --force. --remove-pieces deletes the pieces only after that.

    \b
    Examples:
      mixtral-convert concat Mixtral-8x7B/
      mixtral-convert concat DIR --checksums DIR/SHA256SUMS --remove-pieces
      mixtral-convert concat p/consolidated.00.pth-split* -o /big/disk/
    """
    from . import concat as op
    from .progress import human_bytes

    r = op.concat(list(inputs), output=output, md5=md5, sha256=sha256, checksums=checksums,
                  force=force, remove_pieces=remove_pieces, quiet=quiet)
    if not quiet:
        click.echo(f"wrote {r.output}: {r.nbytes} bytes ({human_bytes(r.nbytes)}) from "
                   f"{len(r.pieces)} pieces in {r.seconds:.1f} s, "
                   f"{human_bytes(r.throughput)}/s")
    click.echo(f"md5     {r.md5}")
    click.echo(f"sha256  {r.sha256}")
    if quiet:
        return
    compared = ", ".join(r.compared) if r.compared else "none given (printed above)"
    click.echo(f"checked: loadable torch checkpoint ({r.tensors} tensors, {r.records} data "
               f"records); checksums matched: {compared}")
    if r.removed_pieces:
        click.echo(f"removed the {len(r.pieces)} pieces")
    if r.split_ready:
        click.echo(f"params.json and tokenizer.model are beside it: `mixtral-convert split "
                   f"{r.output.parent}` can now run on that directory")
    elif r.assets_beside_pieces:
        click.echo(f"params.json and tokenizer.model are beside the pieces: copy them next to "
                   f"{r.output.name}, then `mixtral-convert split {r.output.parent}` can run")
