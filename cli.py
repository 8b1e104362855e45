"""fsar command line: one typer app per stage, plus the umbrella `fsar`.

Each command imports its stage lazily, so `fsar-store info` starts fast and `fsar-train`
never imports the CLIP encoder. Errors users can fix exit with code 2 and one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
import typer
from typer.core import TyperCommand, TyperGroup

# torch's OpenMP threads sleep between parallel regions instead of spinning: on a busy machine
# spinning threads made training several times slower (docs/performance.md). Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Help texts are plain text: rich markup would swallow defaults written as [runs/latest].
PLAIN = dict(rich_markup_mode=None)


class _ListsHeads:
    """--help ends with the heads available here, read from package metadata when help is shown
    (no head, plugin or torch is imported for it)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from heads import registry

        super().format_epilog(ctx, formatter)  # type: ignore[misc]
        rows = [(s.name, "built in" if s.builtin else s.describe()) for s in registry.sources()]
        with formatter.section("Heads (fsar.heads entry points add more)"):
            formatter.write_dl(rows + [("refused", line) for line in registry.problems()])


class HeadsCommand(_ListsHeads, TyperCommand):
    pass


class HeadsGroup(_ListsHeads, TyperGroup):
    pass


app = typer.Typer(
    help="fsar: offline CLIP feature store for few-shot action recognition.",
    no_args_is_help=True,
    **PLAIN,
)
store_app = typer.Typer(
    help="Inspect, verify and share feature stores.", no_args_is_help=True, **PLAIN
)
extract_app = typer.Typer(help="Stage 1: extract CLIP features from videos into a store.", **PLAIN)
train_app = typer.Typer(help="Stage 2: train a reasoning head from a store.", **PLAIN)
eval_app = typer.Typer(help="Stage 2: evaluate a head on few-shot episodes from a store.", **PLAIN)
synth_app = typer.Typer(
    help="Generate a synthetic video dataset (time-reversal class pairs).", **PLAIN
)
study_app = typer.Typer(
    help="Studies: a plan of heads trained and tested on identical episodes, as Dask tasks.",
    no_args_is_help=True,
    cls=HeadsGroup,
    **PLAIN,
)
app.add_typer(store_app, name="store")
app.add_typer(study_app, name="study")


# ---------------------------------------------------------------- shared option and error helpers
def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


@contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Errors of `kinds` (ones users can fix) print their first line and exit 2."""
    try:
        yield
    except kinds as error:
        fail(first_line(error))


def check_output_file(option: str, path: str) -> None:
    """Refuse an output path that cannot be written, before any long work starts."""
    import os
    from pathlib import Path

    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        fail(f"{option} {path} is a directory; give a file name")
    if not parent.is_dir():
        fail(f"{option} {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        fail(f"{option} {path} cannot be written (permission denied)")


def check_counts(**counts: float | None) -> None:
    """Options that count episodes, classes or videos must be positive."""
    for name, value in counts.items():
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} {value}: use a positive number")


def comma_list(text: str | None) -> list[str] | None:
    """`a,b,c` -> ["a", "b", "c"] (None stays None; an empty list is refused)."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        fail(f"empty list {text!r}")
    return items


def key_values(pairs: list[str]) -> dict:
    """--option KEY=VALUE pairs -> {key: JSON value, or the text when it is not JSON}."""
    import json

    options = {}
    for pair in pairs:
        if "=" not in pair:
            fail(f"--option takes KEY=VALUE (got {pair!r})")
        key, value = pair.split("=", 1)
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    return options


def heads_errors() -> tuple[type[Exception], ...]:
    """What stage-2 commands report in one line: store, episodes, options, heads and plugins."""
    from heads.config import ConfigError
    from heads.episodes import EpisodeError
    from heads.registry import HeadError
    from runtime.errors import FsarError
    from store import StoreError

    return (
        StoreError,
        EpisodeError,
        ConfigError,
        HeadError,
        FileNotFoundError,
        ValueError,
        FsarError,
    )


def warn_refused_heads() -> None:
    """One line on stderr per installed plugin head that fsar refuses (a clash over its name)."""
    from heads.registry import problems

    for line in problems():
        typer.echo(f"warning: {line}", err=True)


# ---------------------------------------------------------------- fsar-store
CACHE_HELP = "Keep a remote store's fetched chunks in DIR (default: env FSAR_CACHE)."


def _open_for_cli(path: str, cache: str | None = None):
    from store import StoreError, open_store

    with user_errors(StoreError):
        return open_store(path, cache=cache)


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
    path: str = typer.Argument(..., help="Store: directory, packed file or URL."),
    json_out: bool = typer.Option(False, "--json", help="Print the full info as JSON."),
    cache: str = typer.Option(None, "--cache", metavar="DIR", help=CACHE_HELP),
) -> None:
    """Spec, counts per split and status, size on disk, bytes per video and fingerprint."""
    import json

    from store import StoreError
    from store.layout import recipe_sizes
    from store.sizes import size_lines, taps_text

    with user_errors(StoreError):
        info = _open_for_cli(path, cache).info()
    info["recipe_sizes"] = recipe_sizes(info["spec"])
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
    if spec.get("taps"):
        typer.echo(f"taps         {taps_text(spec['taps'])}  W={spec['width']}  (resid/layerKK)")
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
    typer.echo("per video, every recipe at this model, T and V:")
    for line in size_lines(spec):
        typer.echo(f"  {line}")


@store_app.command("verify")
def store_verify(
    path: str = typer.Argument(..., help="Store to check: directory, packed file or URL."),
    cache: str = typer.Option(None, "--cache", metavar="DIR", help=CACHE_HELP),
) -> None:
    """Re-hash every ok row of every tensor; exit 1 listing the bad rows and tensors."""
    from store import StoreError

    s = _open_for_cli(path, cache)
    with user_errors(StoreError):
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


@store_app.command("pack")
def store_pack(
    path: str = typer.Argument(..., help="Store directory to pack."),
    out: str = typer.Argument(..., help="Packed file to write (e.g. hmdb51.fsar.zip)."),
) -> None:
    """Pack a store into one zip file (uncompressed members) that opens without unpacking."""
    from store import StoreError
    from store.pack import pack

    with user_errors(StoreError):
        size = pack(path, out)
    typer.echo(f"pack: {out} ({_human_bytes(size)})")


@store_app.command("unpack")
def store_unpack(
    file: str = typer.Argument(..., help="Packed store file."),
    directory: str = typer.Argument(..., metavar="DIR", help="New (or empty) directory."),
) -> None:
    """Restore a packed store into a directory; members that would land outside DIR are refused."""
    from store import StoreError
    from store.pack import unpack

    with user_errors(StoreError):
        s = unpack(file, directory)
    typer.echo(f"unpack: {directory} ({s.n_rows} rows, fingerprint {s.fingerprint()})")


@store_app.command("merge")
def store_merge(
    a: str = typer.Argument(..., help="First store (A)."),
    b: str = typer.Argument(..., help="Second store (B)."),
    out: str = typer.Option(..., "--out", help="New store directory to write."),
    prefer: str = typer.Option(
        None,
        "--prefer",
        metavar="A|B",
        help="Resolve conflicts (a video, class text or weights file both stores hold with "
        "different values) by taking A's copies or B's.",
    ),
    cache: str = typer.Option(None, "--cache", metavar="DIR", help=CACHE_HELP),
) -> None:
    """Merge two stores of the same spec (videos de-duplicated, classes unioned)."""
    from store import StoreError
    from store.merge import describe_report, merge

    if prefer is not None and prefer.upper() not in ("A", "B"):
        fail(f"--prefer must be A or B, not {prefer!r}")
    with user_errors(StoreError):
        report = merge(
            a,
            b,
            out,
            prefer=prefer.upper() if prefer else None,  # type: ignore[arg-type]
            cache=cache,
            progress=sys.stderr.isatty(),
        )
    typer.echo(describe_report(report, "merge"))
    for note in report.notes:
        typer.echo(f"  note: {note}")


@store_app.command("subset")
def store_subset(
    path: str = typer.Argument(..., help="Source store: directory, packed file or URL."),
    out: str = typer.Option(..., "--out", help="New store directory to write."),
    splits: str = typer.Option(None, "--splits", help="Comma list, e.g. test or val,test."),
    tensors: str = typer.Option(
        None, "--tensors", help="Comma list, e.g. tokens/layer12,cls/layer12."
    ),
    ok_only: bool = typer.Option(False, "--ok-only", help="Leave out pending and failed rows."),
    cache: str = typer.Option(None, "--cache", metavar="DIR", help=CACHE_HELP),
) -> None:
    """Copy some splits and/or tensors of a store into a new, complete store."""
    from store import StoreError
    from store.merge import describe_report, subset

    with user_errors(StoreError):
        report = subset(
            path,
            out,
            splits=comma_list(splits),
            tensors=comma_list(tensors),
            ok_only=ok_only,
            cache=cache,
            progress=sys.stderr.isatty(),
        )
    typer.echo(describe_report(report, "subset"))


# ---------------------------------------------------------------- fsar-synth, fsar-extract
@synth_app.command("synth")
def synth_command(
    out: str = typer.Option(..., help="Directory to write {train,val,test}/<class>/<video> into."),
    classes: int = typer.Option(20, help="Number of classes (even: time-reversal pairs), 6 to 24."),
    videos_per_class: int = typer.Option(6, help="Videos per class."),
    seed: int = typer.Option(0, help="Random seed (same seed, same dataset)."),
) -> None:
    """Write a synthetic `folder` dataset of moving shapes whose classes are time-reversal pairs."""
    import shlex
    from pathlib import Path

    from pipeline.synth import make_synthetic_dataset

    if classes % 2 or not 6 <= classes <= 24:
        fail(f"--classes {classes}: use an even number from 6 to 24 (reversal pairs)")
    if videos_per_class < 1:
        fail(f"--videos-per-class {videos_per_class}: use at least 1")
    target = Path(out)
    if target.exists() and not target.is_dir():
        fail(f"--out {out} is a file; give a new directory")
    if target.is_dir() and any(target.iterdir()):
        fail(f"--out {out} exists and is not empty; give a new directory (datasets are not mixed)")
    description = make_synthetic_dataset(out, classes, videos_per_class, seed)
    counts = ", ".join(f"{len(v)} {k}" for k, v in description["classes"].items())
    typer.echo(
        f"wrote {description['videos']} videos of {classes} classes ({counts}) to {out}; "
        f"extract with: make extract DATASET=folder DATA_ROOT={shlex.quote(out)} "
        'ARGS="--model fsar-tiny-vit --pretrained none"'
    )


app.command("synth")(synth_command)


@extract_app.command("extract")
def extract_command(
    dataset: str | None = typer.Option(
        None, help="hmdb51, ucf101, kinetics100, ssv2_small, ssv2_full or folder."
    ),
    data_root: str | None = typer.Option(None, help="Dataset directory (see README: Datasets)."),
    store: str = typer.Option(..., help="Store directory to create or resume (stores/<dataset>)."),
    model: str | None = typer.Option(
        None, help="open_clip model (default ViT-B-16, or the store's)."
    ),
    pretrained: str | None = typer.Option(
        None,
        help="open_clip tag, none (random init) or a weights file (default openai, or the store's).",
    ),
    frames: int = typer.Option(8, help="Frames per view (T), one per TSN segment."),
    views: int = typer.Option(
        1,
        help="Views per video (V): centre frames, then seeded random frames (emp: train augmented).",
    ),
    recipe: str = typer.Option(
        "emp",
        help="emp (layers 4/8/12), emp+last (+ last block input), ts (residual stream at --taps, "
        "for tsfsar), emp+ts or emp+last+ts; sizes: fsar-store info, docs/extraction.md.",
    ),
    taps: str | None = typer.Option(
        None, help="Recipes with ts: taps to cache, e.g. 0,4,8,12 (0 = ln_pre output) [all]."
    ),
    class_descriptions: list[str] = typer.Option(
        [],
        metavar="FILE",
        help="TS-FSAR prompts/*.json files {class: [sentences]} -> text/descriptions (repeatable: "
        "train and test files); undescribed classes use EMP-Net's 16 templates.",
    ),
    side_pca: str | None = typer.Option(
        None,
        help="Recipes with ts: PCA of the side-network init, released (the released run's "
        "seeded randomized solver) or exact [released].",
    ),
    preprocess: str = typer.Option(
        "openclip",
        help="openclip (the model's), emp (EMP-Net's and TS-FSAR's) or emp-noflip (no training "
        "flip: TS-FSAR's SSv2 recipe).",
    ),
    splits: str | None = typer.Option(None, help="Only these splits, e.g. train,val."),
    part: str | None = typer.Option(None, help="Only part I/N of the videos (by video_id hash)."),
    workers: int | None = typer.Option(
        None, help="Local Dask worker processes (default: cores/4 on CPU, one per GPU)."
    ),
    scheduler: str | None = typer.Option(None, help="Address of an existing Dask scheduler."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int | None = typer.Option(
        None, help="Frames per forward (default V*T on CPU, 256 on CUDA)."
    ),
    timeout: float = typer.Option(120.0, help="Seconds one video may take to decode."),
    decode: str = typer.Option(
        "seek", help="seek (keyframe-aware, exact, else sequential) or sequential (from frame 0)."
    ),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry failed rows too."),
    text_only: bool = typer.Option(
        False,
        "--text-only",
        help="Only add text to an existing store: text/<name> for --templates, text/descriptions "
        "for --class-descriptions.",
    ),
    templates: str | None = typer.Option(None, help="Template file (one per line, with {})."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    allow_torchscript: bool = typer.Option(
        False,
        "--allow-torchscript",
        help="Accept a TorchScript --pretrained file (loading one runs its code: trusted files only).",
    ),
) -> None:
    """Extract CLIP features of a dataset's videos into a feature store (resumable)."""
    from pipeline.datasets import DatasetError
    from pipeline.descriptions import add_descriptions
    from pipeline.errors import EncoderError, ExtractError
    from pipeline.extract import ExtractOptions, run_extraction
    from pipeline.text import add_text_embeddings
    from store import StoreError

    try:
        if text_only or templates:
            if not text_only or not (templates or class_descriptions):
                fail("--text-only goes with --templates FILE or --class-descriptions FILE")
            if templates:
                name, shape = add_text_embeddings(
                    store, templates, model, pretrained, device, allow_torchscript
                )
                typer.echo(f"{store}: wrote text/{name} {shape}")
            if class_descriptions:
                for line in add_descriptions(
                    store, class_descriptions, model, pretrained, device, allow_torchscript
                ):
                    typer.echo(line)
            return
        if dataset is None or data_root is None:
            fail("--dataset and --data-root are required (or --text-only --templates FILE)")
        options = ExtractOptions(
            dataset=dataset,
            data_root=data_root,
            store=store,
            model=model,
            pretrained=pretrained,
            frames=frames,
            views=views,
            recipe=recipe,
            taps=taps,
            class_descriptions=tuple(class_descriptions),
            side_pca=side_pca,
            preprocess=preprocess,
            splits=splits,
            part=part,
            workers=workers,
            scheduler=scheduler,
            device=device,
            batch_size=batch_size,
            timeout=timeout,
            decode=decode,
            retry_failed=retry_failed,
            progress=progress,
            allow_torchscript=allow_torchscript,
        )
        summary = run_extraction(options)
    except (DatasetError, ExtractError, StoreError, EncoderError) as error:
        fail(first_line(error))
    except KeyboardInterrupt:
        fail(f"interrupted; finished rows are saved: rerun the same command to resume {store}", 130)
    for line in summary.lines():
        typer.echo(line)


app.command("extract")(extract_command)


# ---------------------------------------------------------------- fsar-train, fsar-eval
@train_app.command("train", cls=HeadsCommand)
def train_command(
    store: str | None = typer.Option(None, help="Store path (stores/<dataset>)."),
    config: str | None = typer.Option(
        None, help="JSON file of training options (CLI options win)."
    ),
    preset: str | None = typer.Option(
        None,
        help="hmdb51|ucf101|kinetics100|ssv2_small|ssv2_full: the released recipe of --head "
        "(tsfsar: TS-FSAR's, per --shot; other heads: EMP-Net's schedule).",
    ),
    head: str | None = typer.Option(
        None, help="Head to train: a trainable one of those listed below [emp]."
    ),
    way: int | None = typer.Option(None, help="Classes per episode [5]."),
    shot: int | None = typer.Option(None, help="Support videos per class [1]."),
    query: int | None = typer.Option(None, help="Query videos per class in training [5]."),
    episodes: int | None = typer.Option(None, help="Training episodes [2000]."),
    episodes_per_step: int | None = typer.Option(
        None, help="Episodes per optimiser step (gradient accumulation) [1]."
    ),
    lr: float | None = typer.Option(None, help="Peak learning rate [1e-3]."),
    decay_groups: str | None = typer.Option(
        None,
        help="Weight decay on: matrices (not norms, biases, scalars) | released (EMP-Net's names) "
        "| all [matrices].",
    ),
    val_every: int | None = typer.Option(None, help="Validate every N episodes [500]."),
    val_episodes: int | None = typer.Option(None, help="Validation episodes [1000]."),
    val_way: int | None = typer.Option(None, help="Classes per validation episode [--way]."),
    out: str | None = typer.Option(None, help="Run directory [runs/<head>-<store>-<time>]."),
    seed: int | None = typer.Option(None, help="Seed of episodes and initialisation [0]."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:1 ... [auto]."),
    max_ram: float | None = typer.Option(
        None, help="GB a split may take in RAM; larger splits stream [8]."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out (default runs/latest)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh in an --out that holds a run (replaces it)."
    ),
    levels: str | None = typer.Option(None, help="emp: token | token,patch | token,patch,frame."),
    no_text: bool = typer.Option(
        False, "--no-text", help="emp: no text-visual scores, no text fusion."
    ),
    no_skip_fusion: bool = typer.Option(False, "--no-skip-fusion", help="emp: layer 12 only."),
    loss: str | None = typer.Option(
        None,
        help="emp: ce (cross-entropy on scores with learnable scales) or released (the released "
        "double softmax) [ce; released with --preset].",
    ),
    temperature: float | None = typer.Option(
        None, help="emp, loss ce: initial temperature of the matching scores [1]."
    ),
    layer_weights: bool = typer.Option(
        False, "--layer-weights", help="emp: learnable skip-fusion weights (paper)."
    ),
    score_weights: bool = typer.Option(
        False, "--score-weights", help="emp: learnable score weights (paper)."
    ),
    strategy: str | None = typer.Option(None, help="lastlayer: meta | finetune | novel."),
    option: list[str] = typer.Option([], help="Other head option KEY=VALUE (repeatable)."),
    progress: bool = typer.Option(True, help="Progress bar."),
    keep_freed_memory_: bool = typer.Option(
        True,
        "--keep-freed-memory/--return-freed-memory",
        help="Reuse freed memory instead of returning it to the OS: faster steps on CPU "
        "(no page faults), a higher peak RSS (see docs/performance.md).",
    ),
) -> None:
    """Train a head episodically from a store (never runs the CLIP encoder)."""
    from pathlib import Path

    from heads.config import config_from_options, resume_config
    from heads.train import train
    from runtime.memory import keep_freed_memory

    if keep_freed_memory_:
        keep_freed_memory()
    if resume and overwrite:
        fail("give --resume or --overwrite, not both")
    warn_refused_heads()
    with user_errors(*heads_errors()):
        if resume:
            cfg = resume_config(Path(out or "runs/latest"), episodes, progress)
        else:
            options = dict(
                store=store, preset=preset, head=head, way=way, shot=shot, query=query,
                episodes=episodes, episodes_per_step=episodes_per_step, lr=lr,
                decay_groups=decay_groups, val_every=val_every, val_episodes=val_episodes,
                val_way=val_way, out=out, seed=seed, device=device, max_ram=max_ram,
                progress=progress,
            )  # fmt: skip
            flags = dict(
                levels=levels, loss=loss, temperature=temperature, strategy=strategy,
                no_text=no_text, no_skip_fusion=no_skip_fusion, layer_weights=layer_weights,
                score_weights=score_weights,
            )  # fmt: skip
            cfg = config_from_options(options, key_values(option), flags, config)
        run_dir = train(cfg, resume=resume, overwrite=overwrite)
    typer.echo(f"run: {run_dir}")


@eval_app.command("eval", cls=HeadsCommand)
def eval_command(
    store: str | None = typer.Option(None, help="Store path [the store the run's config names]."),
    checkpoint: str | None = typer.Option(None, help="Run directory [runs/latest]."),
    head: str | None = typer.Option(
        None,
        help="A head instead of a run: any listed below (a trainable one untrained).",
    ),
    episodes: int = typer.Option(10_000, help="Test episodes."),
    way: int = typer.Option(5, help="Classes per episode."),
    shot: int = typer.Option(1, help="Support videos per class."),
    query: int = typer.Option(1, help="Query videos per class."),
    split: str = typer.Option("test", help="Split to evaluate."),
    view: str = typer.Option(
        "centre", help="centre (view 0), random (one of views 1..V-1 per video per episode) or N."
    ),
    seed: int = typer.Option(0, help="Episode seed (same seed, same episodes, any machine)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    max_ram: float = typer.Option(8.0, help="GB the split may take in RAM; larger splits stream."),
    json_out: str | None = typer.Option(None, "--json", help="Write the result as JSON."),
    per_episode: str | None = typer.Option(None, help="Write each episode's accuracy (parquet)."),
    option: list[str] = typer.Option(
        [],
        help="Head option KEY=VALUE (repeatable): for --head, or a run's test-time options "
        "(e.g. tsfsar's fuse_vision, fuse_clip, fuse_side).",
    ),
    progress: bool = typer.Option(True, help="Progress bar."),
) -> None:
    """Evaluate a trained run or a training-free head on few-shot episodes."""
    import json
    import warnings
    from pathlib import Path

    import torch

    from heads.evaluate import evaluate, load_run, store_of_run
    from heads.train import build_head
    from runtime.device import pick_device
    from runtime.memory import keep_freed_memory
    from store import open_store

    check_counts(episodes=episodes, way=way, shot=shot, query=query)
    if max_ram < 0:
        fail(f"--max-ram {max_ram}: use a number of GB >= 0")
    for option_name, path in (("--json", json_out), ("--per-episode", per_episode)):
        if path is not None:
            check_output_file(option_name, path)
    warn_refused_heads()
    with user_errors(*heads_errors()):
        target = pick_device(device)
        keep_freed_memory()
        if head is not None and checkpoint is not None:
            fail("give --checkpoint or --head, not both")
        run_dir = None
        if head is None:
            run_dir = Path(checkpoint) if checkpoint else Path("runs") / "latest"
            if not (run_dir / "config.json").exists():
                fail(f"no run at {run_dir} (train one with fsar-train, or pass --head proto)")
        store_path = store or (store_of_run(run_dir) if run_dir is not None else None)
        if store_path is None:
            fail("--store is required with --head")
        s = open_store(store_path)
        if run_dir is not None:
            with warnings.catch_warnings(record=True) as caught:  # e.g. another plugin version
                warnings.simplefilter("always")
                model = load_run(run_dir, s, target, key_values(option))
            for warning in caught:
                typer.echo(f"warning: {warning.message}", err=True)
        else:  # untrained: built at the store's dim, the same weights every time
            torch.manual_seed(seed)
            model = build_head(head, key_values(option), s, target)
        result = evaluate(
            model, s, split, way, shot, query, episodes, seed, target, max_ram, progress=progress,
            view=view,
        )  # fmt: skip
        typer.echo(result.summary())
        if json_out is not None:
            Path(json_out).write_text(json.dumps(result.to_json(), indent=2))
        if per_episode is not None:
            import pandas as pd

            pd.DataFrame({"episode": range(episodes), "accuracy": result.per_episode}).to_parquet(
                per_episode
            )


app.command("train", cls=HeadsCommand)(train_command)
app.command("eval", cls=HeadsCommand)(eval_command)


# ---------------------------------------------------------------- fsar-study
def study_command(
    ctx: typer.Context,
    store: str | None = typer.Option(
        None, help="Store: directory, packed file or URL (workers read it too)."
    ),
    plan: str | None = typer.Option(
        None, help="Built-in plan (ablation, baselines, shots, tsfsar) or a plan .json file."
    ),
    out: str | None = typer.Option(None, help="Study folder [studies/<plan>]."),
    scheduler: str | None = typer.Option(
        None, help="Address of a Dask scheduler [a LocalCluster]."
    ),
    workers: int | None = typer.Option(
        None, help="LocalCluster worker processes [cores, one torch thread each]."
    ),
    seeds: str | None = typer.Option(None, help="Training seeds, e.g. 0,1,2 [the plan's]."),
    episodes: int | None = typer.Option(None, help="Test episodes per cell [the plan's, 10000]."),
    train: list[str] = typer.Option(
        [], help="Training option KEY=VALUE for every trained cell (repeatable)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the study in --out, even with a changed plan."
    ),
    device: str = typer.Option("cpu", help="cpu, cuda ... (on the workers)."),
    max_ram: float = typer.Option(8.0, help="GB a split may take in a worker's RAM."),
    progress: bool = typer.Option(True, help="Progress bar over cells."),
) -> None:
    """Run a study: every cell trains (selection on val) and is tested on the same episodes."""
    if ctx.invoked_subcommand is not None:
        return
    from heads.study import (
        PlanError,
        StudyError,
        StudyInterrupted,
        StudyOptions,
        load_plan,
        run_study,
    )
    from store import StoreError

    if not store or not plan:
        fail(
            "--store and --plan are required (e.g. fsar-study --store stores/hmdb51 --plan ablation)"
        )
    try:
        seed_list = [int(s) for s in comma_list(seeds)] if seeds is not None else None
    except ValueError:
        fail(f"--seeds {seeds!r}: give integers, e.g. 0,1,2")
    warn_refused_heads()
    try:
        with user_errors(PlanError, StudyError, StoreError):
            chosen = load_plan(plan)
            options = StudyOptions(
                store=store, out=out or f"studies/{chosen.name}", scheduler=scheduler,
                workers=workers, seeds=seed_list, episodes=episodes, train=key_values(train),
                resume=resume, device=device, max_ram=max_ram, progress=progress,
            )  # fmt: skip
            summary = run_study(chosen, options)
    except StudyInterrupted as stop:
        fail(str(stop), 130)
    for line in summary.lines():
        typer.echo(line)
    if summary.failed:
        raise typer.Exit(1)


study_app.callback(invoke_without_command=True)(study_command)
study_app.command("run", cls=HeadsCommand)(study_command)


@study_app.command("compare")
def study_compare(
    a: str = typer.Argument(
        ..., help="Per-episode file A (fsar-eval --per-episode, or a study cell's)."
    ),
    b: str = typer.Argument(..., help="Per-episode file B, scored on the same episodes."),
) -> None:
    """Paired comparison B - A of two per-episode files: mean, 95% CI and paired t-test."""
    from heads.study import StudyError, paired_comparison, read_per_episode

    with user_errors(StudyError):
        (ep_a, acc_a, meta_a), (ep_b, acc_b, meta_b) = read_per_episode(a), read_per_episode(b)
    if len(ep_a) != len(ep_b) or not (ep_a == ep_b).all():
        fail(
            f"{a} and {b} score different episodes ({len(ep_a)} and {len(ep_b)}): pair files of one evaluation setting"
        )
    keys = ("store_fingerprint", "split", "way", "shot", "query", "seed")
    if meta_a and meta_b:
        differ = [k for k in keys if meta_a.get(k) != meta_b.get(k)]
        if differ:
            fail(f"{a} and {b} come from different episodes ({', '.join(differ)} differ)")
    else:
        typer.echo("note: no episode metadata in both files; pairing by episode index", err=True)
    typer.echo(f"A {a}: {acc_a.mean() * 100:.2f}%   B {b}: {acc_b.mean() * 100:.2f}%")
    typer.echo(paired_comparison(acc_a, acc_b).summary("A", "B"))


if __name__ == "__main__":
    sys.exit(app())
