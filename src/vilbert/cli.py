"""The `vilbert-cli` command line: one click group, one command per stage action."""

from __future__ import annotations

import json
import logging
import sys

import click

from vilbert import __version__
from vilbert.errors import VilbertError

logger = logging.getLogger(__name__)
MAX_LISTED_FAILURES = 20


class _Group(click.Group):
    """A click group that prints a VilbertError as one line (`error: ...`) and exits 1, unless --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VilbertError as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="vilbert-cli")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False), help="Logging level.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None, help="Also write the log to this file.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; warnings and errors only.")
@click.pass_context
def cli(ctx: click.Context, log_level: str, log_file: str | None, debug: bool, quiet: bool) -> None:
    """ViLBERT from images to results: region features, feature stores, training and evaluation."""
    from vilbert._logging import setup_logging

    setup_logging("WARNING" if quiet and log_level.upper() in ("DEBUG", "INFO") else log_level, log_file)
    ctx.obj = {"debug": debug, "quiet": quiet}


def _show_progress(ctx: click.Context) -> bool:
    return not ctx.obj.get("quiet") and sys.stderr.isatty()


# ---------------------------------------------------------------------------------------------- pack
@cli.command()
@click.option("--format", "fmt", type=click.Choice(["arrow", "lmdb", "hdf5"]), default="arrow", show_default=True,
              help="Shard storage of the output store.")
@click.option("--from", "sources", multiple=True, required=True, metavar="PATH",
              help="Input: a store directory, a volta-layout .h5 file or a legacy dump. Repeat it, or list "
                   "several paths after one --from.")
@click.argument("more_sources", nargs=-1, type=click.Path(), metavar="[PATH]...")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output store directory.")
@click.option("--dtype", "feature_dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="dtype the features are stored in.")
@click.option("--on-duplicate", type=click.Choice(["error", "keep-first", "keep-last"]), default="error",
              show_default=True, help="What a repeated image id does.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow inputs that must be unpickled. Unpickling runs code from the file: trusted files only.")
@click.option("--source-format", default=None, metavar="NAME",
              help="Force the input format (store, hdf5, butd_tsv, lxmert_tsv, bua_npz, vilbert_lmdb, tensorpack_lmdb).")
@click.option("--allow-mixed-detectors", is_flag=True, help="Allow inputs made by different or unknown detectors.")
@click.option("--shard-size-mb", type=float, default=1024, show_default=True, help="Start a new shard after this many MiB.")
@click.option("--lmdb-map-size-mb", type=float, default=1 << 20, show_default=True, help="LMDB map size per shard (MiB).")
@click.option("--max-failures", type=int, default=0, show_default=True,
              help="Bad input records tolerated: more makes the command exit 1 (the store keeps the good "
                   "ones either way); -1: no limit.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store or another command's partial output.")
@click.pass_context
def pack(ctx, fmt, sources, more_sources, out, feature_dtype, on_duplicate, trust_pickle, source_format,
         allow_mixed_detectors, shard_size_mb, lmdb_map_size_mb, max_failures, overwrite):
    """Convert and merge stores, HDF5 files and legacy dumps into one feature store.

    A pack that was killed resumes when the same command is run again.
    """
    from vilbert.datasets.pack import pack as run_pack
    from vilbert.datasets.writer import PackConfig

    config = PackConfig(format=fmt, feature_dtype=feature_dtype, shard_size_bytes=max(int(shard_size_mb * (1 << 20)), 1),
                        on_duplicate=on_duplicate, allow_mixed_detectors=allow_mixed_detectors,
                        lmdb_map_size=max(int(lmdb_map_size_mb * (1 << 20)), 1), max_failures=max_failures)
    result = run_pack(list(sources) + list(more_sources), out, config, trust_pickle=trust_pickle,
                      source_format=source_format, progress=_show_progress(ctx), overwrite=overwrite)
    m = result.manifest
    rate = result.num_written / result.elapsed_s if result.elapsed_s > 0 else 0.0
    click.echo(f"packed {result.num_written} records into {out} ({m.storage}, {len(m.shards)} shard(s), "
               f"{sum(s.size_bytes for s in m.shards) / (1 << 20):.1f} MiB) in {result.elapsed_s:.1f} s "
               f"({rate:.0f} records/s); {result.num_failures} bad record(s) skipped")
    if result.num_failures:
        examples = [str(f) for f in result.failures] or [
            f"{e.get('source')}: record {e.get('image_id')!r}: {e.get('reason')}" for e in m.failures.get("examples", [])]
        for line in examples[:MAX_LISTED_FAILURES]:
            click.echo(f"  failed: {line}", err=True)
        if result.num_failures > MAX_LISTED_FAILURES:
            click.echo(f"  ... and {result.num_failures - MAX_LISTED_FAILURES} more (see manifest.json)", err=True)
        if 0 <= max_failures < result.num_failures:
            click.echo(f"error: {result.num_failures} bad record(s) skipped (allowed: {max_failures}); "
                       "the store holds the good ones", err=True)
            ctx.exit(1)


# ---------------------------------------------------------------------------------------------- inspect
@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(store, as_json):
    """Summarise STORE: counts, boxes-per-image histogram, dtypes, size on disk, provenance."""
    from vilbert.datasets.summary import format_summary, summarize_store

    summary = summarize_store(store)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


# ---------------------------------------------------------------------------------------------- validate
@cli.command()
@click.argument("store", type=click.Path())
@click.option("--quick", is_flag=True, help="Hashes and index only; do not decode every record.")
@click.pass_context
def validate(ctx, store, quick):
    """Re-hash STORE's shards and check its schema, index and every record; exit 1 naming what is damaged."""
    from vilbert.datasets.validate import validate_store

    report = validate_store(store, check_records=not quick)
    if report.ok:
        click.echo(f"ok: {store}: {report.num_records} records in {report.num_shards} shard(s) verified"
                   + ("" if quick else f", {report.records_checked} records decoded"))
        return
    for line in report.problems:
        click.echo(f"damaged: {line}", err=True)
    click.echo(f"error: {store}: {len(report.problems)} problem(s) in {len(report.damaged_shards)} shard(s)"
               + (f" ({', '.join(report.damaged_shards)})" if report.damaged_shards else ""), err=True)
    ctx.exit(1)


def main(argv=None) -> None:
    """Console-script entry point (`vilbert-cli`)."""
    cli.main(args=argv, prog_name="vilbert-cli")


if __name__ == "__main__":
    main()
