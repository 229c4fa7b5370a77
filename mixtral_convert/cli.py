"""The click commands: parse, call one operation, print. No conversion logic lives here; the
entry point that maps every failure to one line and an exit code is `entry.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import ConvertError, WorldSizeError
from .formats.registry import TARGETS, all_target_options


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
@click.option("--hash", "hashes", type=click.Choice(["md5", "sha256"]), multiple=True,
              help="Also compute and print this hash (repeatable). By default only the hashes a given checksum "
                   "needs are computed, or sha256 alone when none is given: md5 runs on one core, slower than "
                   "the disk.")
@click.option("--force", is_flag=True, help="Overwrite an existing OUTPUT.")
@click.option("--remove-pieces", is_flag=True,
              help="Delete the pieces after the joined file is written and verified.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bar or summary; print only the hash lines.")
def concat(inputs, output, md5, sha256, checksums, hashes, force, remove_pieces, quiet):
    """Join a checkpoint's byte pieces into one file, verified, instead of `cat`: the torrent's
    consolidated.00.pth-split0 ... -splitN, or the consolidated.safetensors.0 ... .N that
    Mixtral-8x22B's mirrors ship.

    INPUT is a directory (its pieces are taken) or piece files, in any order; they are joined in
    numeric order of the suffix (split10 after split9). Missing, duplicate or empty pieces, and
    pieces of different base names, are refused by name.

    While copying, the hashes that --md5, --sha256 or --checksums give are computed and compared
    (sha256 alone, printed, when none is given; --hash adds one). Then, even without a
    checksum, the result must be whole: a torch checkpoint must be a complete zip with every
    record where its directory says, every tensor record with the bytes its tensors need, and
    torch.load(weights_only=True) giving a dict of tensors; a safetensors file must have a
    header that parses, tensors that tile its data and the exact size. This catches a truncated piece.

    The data goes to a hidden temporary file beside OUTPUT, fsynced and renamed only when every
    check passed; on any failure, Ctrl-C or SIGTERM it is removed. An existing OUTPUT is refused
    without --force. --remove-pieces deletes the pieces only after that.

    \b
    Examples:
      mixtral-convert concat Mixtral-8x7B/
      mixtral-convert concat DIR --checksums DIR/SHA256SUMS --remove-pieces
      mixtral-convert concat p/consolidated.00.pth-split* -o /big/disk/
    """
    from .commands import concat as op
    r = op.concat(list(inputs), output=output, md5=md5, sha256=sha256, checksums=checksums,
                  force=force, remove_pieces=remove_pieces, quiet=quiet, hashes=hashes)
    click.echo("\n".join(r.lines(quiet)))


def _world_size_option(f):
    return click.option("-n", "--world-size", "world_size", type=click.IntRange(min=1), default=8,
                        show_default=True,
                        help="Number of tensor-parallel ranks (GPUs) the output is for. Must divide the "
                             "KV heads, vocabulary, dim and (base) experts or (sparse) FFN dim; "
                             "an invalid N is refused with the list of valid ones.")(f)


_out_option = click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
                           help="Output directory (created atomically: a temporary sibling renamed into "
                                "place at the end).")
_force_option = click.option("--force", is_flag=True,
                             help="Replace a non-empty output directory's files that mixtral-convert wrote "
                                  "(never anything else).")
_quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
_format_option = click.option("--format", "fmt", type=click.Choice(["pth", "safetensors"]), default="pth",
                              show_default=True,
                              help="Shard file format: .model.pth (what Accessory loads) or .model.safetensors "
                                   "(same tensors, for other consumers).")
_tokenizer_option = click.option("--tokenizer", default=None, metavar="PATH_OR_hf://org/name",
                                 help="tokenizer.model to use when the source has none (a file, its directory, "
                                      "or a hub repository).")
_dtype_option = click.option("--compute-dtype", "--dtype", "dtype", type=click.Choice(["float32", "bfloat16"]),
                             default="float32", show_default=True,
                             help="The dtype the forward computes in (weights are cast layer by layer as they are "
                                  "used); nothing is written in it. --dtype is the older name of this option: on "
                                  "split and merge, --dtype casts what is written.")
_device_option = click.option("--device", default="cpu", show_default=True,
                              help="cpu or cuda (cuda:K); one layer's weights are on it at a time.")


_base_option = click.option(
    "--base", default=None, metavar="SRC",
    help="For a trainable-only PEFT save (only lora/bias/norm tensors): the model it was trained from, any "
         "readable source (any format, any N, hf://org/name). Its tensors are read, the save's norms and biases "
         "replace them, its LoRA is merged in.")
_adapter_option = click.option("--adapter", default=None, metavar="PATH_OR_hf://org/name", help="An HF PEFT LoRA "
                               "adapter (peft, axolotl, unsloth, trl) merged into the source as it is read.")
_drop_biases_option = click.option(
    "--drop-biases", is_flag=True,
    help="Write a model with non-zero biases (a bias-tuned PEFT save) to an output that has none, leaving them "
         "out: recorded in the manifest and the summary; the output is then not the source's model "
         "(verify --forward measures by how much). Without it such an output is refused.")


def _print_result(verb: str, res, quiet: bool) -> None:
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    if not quiet:
        click.echo("\n".join(res.lines(verb)))


def _parse_ranks(text):
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated rank numbers such as 0,3, got {text!r}",
                                 param_hint="--ranks") from None


_ranks_option = click.option(
    "--ranks", default=None, metavar="R1,R2,...",
    help="Write only these ranks' shards into OUT (shared with other processes converting the other "
         "ranks, e.g. on a cluster's shared filesystem); the files equal a single-process run's. "
         "Under torchrun this is automatic: process RANK of WORLD_SIZE takes ranks RANK, "
         "RANK+WORLD_SIZE, ...")


_cast_option = click.option(
    "--dtype", "cast", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
    help="Write the tensors in this dtype, cast a block at a time as they stream (default: keep the "
         "source's). A cast to float16 of values beyond its range (|x| > 65504) is refused.")


def _merge_dtype_option(f):
    """--dtype of merge: every dtype some target takes (each target checks its own)."""
    choices = list(dict.fromkeys(d for t in TARGETS.values() for d in t.dtypes))
    return click.option(
        "--dtype", "cast", type=click.Choice(choices), default=None,
        help="Write the tensors in this dtype, cast a block at a time as they stream (default: keep the "
             "source's). A cast to float16 of values beyond its range (|x| > 65504) is refused. "
             + "; ".join(f"--to {t.name}: {', '.join(t.dtypes)}" for t in TARGETS.values()) + ".")(f)


def _target_options(f):
    """Every target's own options (formats.checkpoint.TargetOption), each saying which --to takes it."""
    for o, names in reversed(all_target_options()):
        helps: dict[str, list] = {}  # each target's own help for the flag, targets of one help together
        for name in names:
            helps.setdefault(next(x.help for x in TARGETS[name].options if x.flag == o.flag), []).append(name)
        f = click.option(o.flag, o.dest, default=None, metavar=o.metavar,
                         help=" ".join(f"--to {', '.join(ns)}: {h}" for h, ns in helps.items()))(f)
    return f


_dry_run_option = click.option(
    "--dry-run", is_flag=True,
    help="Detect and validate the source and the output directory, then print the plan (every output file "
         "with its exact size, the tensors per rank, the dtype, the space needed against the space free) "
         "and write nothing.")


_dequantize_option = click.option(
    "--dequantize", is_flag=True, help="Take a quantized GGUF as the source (refused without it): gguf's own "
    "dequantize, then --dtype (default bfloat16; float32 keeps those values exactly). Lossy: said in the manifest.")
_mixed_experts_option = click.option("--convert-mixed-experts", type=click.Choice(["float32", "float16", "bfloat16",
    "q8_0"]), help="Restacking an old per-expert GGUF: a layer's experts of several types go to this (else refused)")
_write_ranks_option = click.option(
    "--write-ranks", type=click.Choice(["auto", "together", "in-turn"]), default="auto", show_default=True,
    help="Write the N files together (a thread each, in step, so that a source region several ranks read is "
         "read from the disk once; sparse ranks share one read of each expert's w2 rows) or one after another. "
         "auto: together when the source is larger than half the memory available for the page cache. The files "
         "are the same either way.")


def _split(src: Path, layout: str, world_size: int, ranks, write_ranks, fmt, base, adapter, tokenizer, dequantize,
           out, force, quiet, dry_run, cast, drop_biases) -> None:
    """split / split-sparse: their options gathered into commands.options' objects."""
    from .commands.options import OutputOptions, SourceOptions, SplitOptions
    from .commands.split import split
    ranks = _parse_ranks(ranks)
    opts = SplitOptions(layout, world_size, tuple(ranks) if ranks is not None else None, fmt, write_ranks)
    try:
        res = split(src, opts, SourceOptions(base, adapter, tokenizer, dequantize),
                    OutputOptions(out, force, quiet, dry_run, cast, drop_biases))
    except WorldSizeError as e:  # name the option (the plan does not know it)
        raise ConvertError(f"-n {world_size}: {e}; pass -n with one of them") from None
    if dry_run:
        return click.echo("\n".join(res.lines()))
    _print_result(f"wrote the {layout} layout for {world_size} rank{'s' * (world_size > 1)}:", res, quiet)


def _split_options(f):
    """The options split and split-sparse share."""
    for option in reversed((click.argument("src", type=click.Path(path_type=Path)), _out_option,
                            _world_size_option, _force_option, _ranks_option, _quiet_option,
                            _format_option, _tokenizer_option, _cast_option, _dry_run_option,
                            _write_ranks_option, _base_option, _drop_biases_option, _dequantize_option,
                            _adapter_option)):
        f = option(f)
    return f


@cli.command("split")
@_split_options
def split_cmd(**options):
    """Re-shard SRC into Accessory's base layout (llama_type "mixtral").

    Every rank gets whole experts (rank r holds experts r*E/N .. (r+1)*E/N-1), its chunk of the
    attention heads, embedding columns and output rows, and a copy of the norms and router.
    SRC is any supported checkpoint: the torrent release, a mistral-inference folder
    (consolidated.safetensors) or Mistral's uncompressed .tar (read in place), Mistral's fused
    consolidated.NN.pt, an HF hub directory, hf://org/name[@rev], or an Accessory directory to
    re-shard, or Accessory's PEFT save (llama_type mixtral_peft: LoRA merged; a trainable-only one with --base).
    A model with non-zero biases (a bias-tuned PEFT save) is written as mixtral_peft (lora_rank -1, the
    biases in place), which Accessory's mixtral_peft loads.
    Default output: SRC/converted.
    """
    _split(layout="base", **options)


@cli.command("split-sparse")
@_split_options
def split_sparse_cmd(**options):
    """Re-shard SRC into Accessory's sparse layout (llama_type "mixtral_sparse").

    Every rank holds 1/N of every expert's FFN dim, fused per layer into feed_forward.w1, w3
    and w2 (w2 transposed), plus the same attention/embedding chunks as the base layout.
    Default output: SRC/converted_sparse. It has no biases: a model with non-zero ones is refused
    (use split, or --drop-biases).
    """
    _split(layout="sparse", **options)


@cli.command("merge")
@click.argument("shards", type=click.Path(path_type=Path))
@_out_option
@_force_option
@_quiet_option
@click.option("--to", "to", type=click.Choice(list(TARGETS)), default="torrent", show_default=True,
              help="; ".join(f"{t.name}: {t.help}" for t in TARGETS.values()) + ".")
@_target_options
@_tokenizer_option
@_merge_dtype_option
@_dry_run_option
@_base_option
@_drop_biases_option
@_dequantize_option
@_mixed_experts_option
@_adapter_option
def merge_cmd(shards, out, force, quiet, to, tokenizer, cast, dry_run, base, drop_biases, adapter, **target_options):
    """Reassemble an Accessory directory (base or sparse, any N), or any other source, into the
    torrent layout (consolidated.00.pth, params.json, tokenizer.model; default output
    SHARDS_merged) or another --to layout (default output SHARDS + the target's suffix, e.g. SHARDS_hf)."""
    from .commands.merge import merge
    from .commands.options import MergeOptions, OutputOptions, SourceOptions
    mixed = target_options.pop("convert_mixed_experts")
    res = merge(shards, MergeOptions(to, target_options, mixed),
                SourceOptions(base, adapter, tokenizer, target_options.pop("dequantize")),
                OutputOptions(out, force, quiet, dry_run, cast, drop_biases))
    if dry_run:
        return click.echo("\n".join(res.lines()))
    _print_result("merged", res, quiet)


@cli.command("verify")
@click.argument("shards", type=click.Path(path_type=Path))
@click.option("--source", "-s", type=click.Path(path_type=Path), default=None,
              help="The checkpoint SHARDS was made from (directory or consolidated.00.pth). Without it, "
                   "every file is checked against the manifest the conversion wrote.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@_quiet_option
@click.option("--forward", "run_forward", is_flag=True,
              help="After the byte checks, run the reference forward on SOURCE and the sharded forward on "
                   "SHARDS over the same tokens; compare the logits (max abs / rel diff, top-1 agreement) "
                   "against a dtype-aware tolerance (docs/parity.md).")
@click.option("--tokens-file", type=click.Path(path_type=Path), default=None,
              help="With --forward: a LongTensor [B, S] saved with torch.save (default: seeded random, B=2, S=16).")
@_dtype_option
@_device_option
@_base_option
@_adapter_option
def verify_cmd(shards, source, as_json, quiet, run_forward, tokens_file, dtype, device, base, adapter):
    """Prove SHARDS is exactly SOURCE in its layout: structure (a file per rank, meta.json,
    config.json and tokenizer consistent, every shard's keys, shapes and dtypes) and every
    byte of every tensor. Without --source: the same structure checks, then every file's size
    and sha256 against SHARDS/mixtral-convert-manifest.json (no source needed). Exit 0 when all
    is equal, 1 on the first mismatch (named), 2 on bad usage or unreadable input (or no
    manifest and no --source)."""
    from .commands.options import SourceOptions
    from .commands.verdict import ForwardCheck, verify
    check = ForwardCheck(tokens_file, dtype, device) if run_forward else None
    verdict = verify(shards, source, SourceOptions(base, adapter), check, quiet=quiet or as_json)
    lines, problems = verdict.lines(as_json)
    if as_json or not quiet:
        click.echo("\n".join(lines))
    if problems:
        if not as_json:
            click.echo(f"error: {problems[0]}", err=True)
        sys.exit(1)


@cli.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect_cmd(path, as_json):
    """Tell what PATH is: a checkpoint directory (torrent or Accessory base/sparse, its N,
    config, dtypes, tensor count and bytes), a single .pth file, a config or a tokenizer.
    Reads no tensor data and unpickles nothing but tensor descriptions."""
    from .commands.inspect import inspect, lines
    click.echo("\n".join(lines(inspect(path), as_json)))


@cli.command("forward")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--tokens-file", type=click.Path(path_type=Path), default=None,
              help="A LongTensor [B, S] of token ids saved with torch.save (loaded with weights_only=True).")
@click.option("--prompt", default=None, help="Text to encode with PATH's tokenizer.model instead of --tokens-file; "
                                              "prints the most likely next tokens.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Where to torch.save the float32 logits [B, S, V] (required with --tokens-file).")
@_dtype_option
@_device_option
@click.option("--distributed", is_flag=True,
              help="Run a converted layout's N ranks as N processes over torch.distributed (gloo on CPU, NCCL on "
                   "CUDA), each loading only its shard file; under torchrun (WORLD_SIZE set), join its group.")
@click.option("--new-tokens", type=click.IntRange(min=0), default=5, show_default=True,
              help="With --prompt: how many tokens to continue greedily (each reruns the whole forward).")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="With --prompt: how many next-token candidates to print.")
@_force_option
@_base_option
@_adapter_option
def forward_cmd(path, tokens_file, prompt, output, dtype, device, distributed, new_tokens, top, force, base, adapter):
    """Logits of PATH: a source checkpoint (reference forward) or a converted layout directory
    (sharded forward, every rank's share from its own shard file), layer by layer.

    \b
      mixtral-convert forward DIR/converted --tokens-file T.pt --output L.pt
      mixtral-convert forward DIR --prompt "The capital of France is"
      torchrun --nproc-per-node 8 -m mixtral_convert forward DIR/converted --tokens-file T.pt -o L.pt --distributed
    """
    from .forward.job import Job
    from .forward.run import run, write_logits
    if tokens_file is not None and output is None:
        raise click.UsageError("--tokens-file needs --output L.pt for the logits")
    job = Job(str(path), str(tokens_file) if tokens_file else None, prompt, new_tokens, top, dtype, device,
              str(base) if base is not None else None, str(adapter) if adapter is not None else None)
    res = run(job, distributed=distributed)
    if res is None:  # a rank other than 0 of a torchrun group
        return
    if output is not None:
        write_logits(res.logits, output, force=force)
        click.echo(f"wrote logits {list(res.logits.shape)} float32 ({res.how}, {dtype}, {device}) -> {output}")
    if prompt is not None:
        click.echo(f"prompt: {res.tokens.shape[1]} tokens ({res.how}, {dtype}, {device})")
        for i, piece, p in res.top:
            click.echo(f"  {p:8.4f}  {i:>6}  {piece!r}")
        if res.new:
            click.echo(f"greedy continuation: {res.text!r} (ids {res.new})")
