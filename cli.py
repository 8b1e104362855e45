"""fsar command line: one typer app per stage, plus the umbrella `fsar`.

Each command imports its stage lazily, so `fsar-store info` starts fast and `fsar-train`
never imports the CLIP encoder. Errors users can fix exit with code 2 and one line.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    help="fsar: offline CLIP feature store for few-shot action recognition.", no_args_is_help=True
)
store_app = typer.Typer(help="Inspect, verify and share feature stores.", no_args_is_help=True)
extract_app = typer.Typer(help="Stage 1: extract CLIP features from videos into a store.")
train_app = typer.Typer(help="Stage 2: train a reasoning head from a store.")
eval_app = typer.Typer(help="Stage 2: evaluate a head on few-shot episodes from a store.")
synth_app = typer.Typer(help="Generate a synthetic video dataset (time-reversal class pairs).")
app.add_typer(store_app, name="store")


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# ---------------------------------------------------------------- store (issue 2, 5)
# STORE-COMMANDS-BEGIN
def _open_for_cli(path: str):
    from store import StoreError, open_store

    try:
        return open_store(path)
    except StoreError as exc:
        fail(str(exc))


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


@store_app.command("info")
def store_info(
    path: str = typer.Argument(..., help="Store directory (e.g. stores/hmdb51)."),
    json_out: bool = typer.Option(False, "--json", help="Print the full info as JSON."),
) -> None:
    """Spec, counts per split and status, size on disk, bytes per video and fingerprint."""
    import json

    info = _open_for_cli(path).info()
    if json_out:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    spec = info["spec"]
    typer.echo(f"store        {info['location']}  (schema {info['schema_version']})")
    typer.echo(f"dataset      {info['dataset']}  splits from {info['split_source']}")
    typer.echo(f"fingerprint  {info['fingerprint']}")
    typer.echo(
        f"model        {spec['model']}  pretrained={spec['pretrained']}  "
        f"weights sha256={str(spec['weights_sha256'])[:16]}"
    )
    typer.echo(
        f"recipe       {spec['recipe']}  layers={spec['layers']}  T={spec['frames']} V={spec['views']}  "
        f"L={spec['tokens']} D={spec['dim']}  {spec['dtype']}  codec={spec.get('codec')}"
    )
    typer.echo(f"preprocess   {spec['preprocess'].get('name')}  image {spec['image_size']}")
    typer.echo(f"classes      {info['classes']}   rows {info['rows']}")
    for split, counts in info["counts"].items():
        parts = "  ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        typer.echo(f"  {split:<6} {parts}")
    if info["errors"]:
        typer.echo("failed       " + ", ".join(f"{k}: {v}" for k, v in info["errors"].items()))
    typer.echo(
        f"size         {_human_bytes(info['bytes_on_disk'])} on disk, "
        f"{_human_bytes(info['bytes_per_video'])} per video "
        f"({_human_bytes(info['raw_bytes_per_video'])} uncompressed)"
    )
    if info["text"]:
        typer.echo(
            "text         "
            + ", ".join(f"text/{k} ({n} templates)" for k, n in info["text"].items())
        )
    if info["weights"]:
        typer.echo("weights      " + ", ".join(info["weights"]))


@store_app.command("verify")
def store_verify(
    path: str = typer.Argument(..., help="Store to check."),
) -> None:
    """Re-hash every ok row of every tensor; exit 1 listing the bad rows and tensors."""
    s = _open_for_cli(path)
    problems = s.verify(progress=sys.stderr.isatty())
    if problems:
        for p in problems:
            typer.echo(f"BAD {p}")
        typer.echo(f"verify: {len(problems)} problem(s) in {path}", err=True)
        raise typer.Exit(1)
    n = len(s.select(status="ok"))
    typer.echo(
        f"verify: ok ({n} rows x {len(s.row_tensors)} tensors, fingerprint {s.fingerprint()})"
    )


# STORE-COMMANDS-END


# ---------------------------------------------------------------- extract (issue 3)
# EXTRACT-COMMANDS-BEGIN
# EXTRACT-COMMANDS-END


# ---------------------------------------------------------------- train / eval (issue 4)
# HEADS-COMMANDS-BEGIN
# HEADS-COMMANDS-END


if __name__ == "__main__":
    sys.exit(app())
