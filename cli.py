"""fsar command line: one typer app per stage, plus the umbrella `fsar`.

Each command imports its stage lazily, so `fsar-store info` starts fast and `fsar-train`
never imports the CLIP encoder; options take their defaults from the stage's options dataclass
(`ExtractOptions`, `TrainConfig`, `EvalOptions`), which the help shows. fsar's own errors exit with
code 2 and one line; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from heads.config import MAX_RAM_GB, PRESETS, EvalOptions, TrainConfig
from pipeline.datasets import DATASETS
from pipeline.options import ExtractOptions
from runtime.commands import (
    App,
    Command,
    Group,
    check_output_file,
    check_output_place,
    comma_list,
    fail,
    given,
    key_values,
    option_values,
)
from runtime.threads import sleep_idle_threads

sleep_idle_threads()  # before any command loads torch


class _ListsHeads:
    """--help ends with the heads available here, read from package metadata when help is shown
    (no head, plugin or torch is imported for it)."""

    def format_epilog(self, ctx: typer.Context, formatter: Any) -> None:
        from heads import registry

        super().format_epilog(ctx, formatter)  # type: ignore[misc]
        rows = [(s.name, "built in" if s.builtin else s.describe()) for s in registry.sources()]
        with formatter.section("Heads (fsar.heads entry points add more)"):
            formatter.write_dl(rows + [("refused", line) for line in registry.problems()])


class HeadsCommand(_ListsHeads, Command):
    pass


class HeadsGroup(_ListsHeads, Group):
    pass


app = App(
    help="fsar: offline CLIP feature store for few-shot action recognition.",
    no_args_is_help=True,
)
store_app = App(help="Inspect, verify and share feature stores.", no_args_is_help=True)
extract_app = App(help="Stage 1: extract CLIP features from videos into a store.")
train_app = App(help="Stage 2: train a reasoning head from a store.")
eval_app = App(help="Stage 2: evaluate a head on few-shot episodes from a store.")
synth_app = App(help="Generate a synthetic video dataset (time-reversal class pairs).")
study_app = App(
    help="Studies: a plan of heads trained and tested on identical episodes, as Dask tasks.",
    no_args_is_help=True,
    cls=HeadsGroup,
)
app.add_typer(store_app, name="store")
app.add_typer(study_app, name="study")


def warn_refused_heads() -> None:
    """One line on stderr per installed plugin head that fsar refuses (a clash over its name)."""
    from heads.registry import problems

    for line in problems():
        typer.echo(f"warning: {line}", err=True)


# ---------------------------------------------------------------- fsar-store
CACHE_HELP = "Keep a remote store's fetched chunks in DIR (default: env FSAR_CACHE)."


@store_app.command("info")
def store_info(
    path: str = typer.Argument(..., help="Store: directory, packed file or URL."),
    json_out: bool = typer.Option(False, "--json", help="Print the full info as JSON."),
    cache: str = typer.Option(None, "--cache", metavar="DIR", help=CACHE_HELP),
) -> None:
    """Spec, counts per split and status, size on disk, bytes per video and fingerprint."""
    import json

    from store import open_store
    from store.describe import info_lines
    from store.layout import recipe_sizes

    info = open_store(path, cache=cache).info()
    info["recipe_sizes"] = recipe_sizes(info["spec"])
    if json_out:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    for line in info_lines(info):
        typer.echo(line)


@store_app.command("verify")
def store_verify(
    path: str = typer.Argument(..., help="Store to check: directory, packed file or URL."),
    cache: str = typer.Option(None, "--cache", metavar="DIR", help=CACHE_HELP),
) -> None:
    """Re-hash every ok row of every tensor; exit 1 listing the bad rows and tensors."""
    from store import open_store

    s = open_store(path, cache=cache)
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
    from store.describe import human_bytes
    from store.pack import pack

    check_output_place("OUT", out)
    size = pack(path, out)
    typer.echo(f"pack: {out} ({human_bytes(size)})")


@store_app.command("unpack")
def store_unpack(
    file: str = typer.Argument(..., help="Packed store file."),
    directory: str = typer.Argument(..., metavar="DIR", help="New (or empty) directory."),
) -> None:
    """Restore a packed store into a directory; members that would land outside DIR are refused."""
    from store.pack import unpack

    check_output_place("DIR", directory)
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
    from store.merge import describe_report, merge

    if prefer is not None and prefer.upper() not in ("A", "B"):
        fail(f"--prefer must be A or B, not {prefer!r}")
    check_output_place("--out", out)
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
    from store.merge import describe_report, subset

    check_output_place("--out", out)
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

    from pipeline.synth import make_synthetic_dataset

    check_output_place("--out", out)
    description = make_synthetic_dataset(out, classes, videos_per_class, seed)
    counts = ", ".join(f"{len(v)} {k}" for k, v in description["classes"].items())
    typer.echo(
        f"wrote {description['videos']} videos of {classes} classes ({counts}) to {out}; "
        f"extract with: make extract DATASET=folder DATA_ROOT={shlex.quote(out)} "
        'ARGS="--model fsar-tiny-vit --pretrained none"'
    )


app.command("synth")(synth_command)


E = ExtractOptions  # its defaults are the options' defaults


@extract_app.command("extract")
def extract_command(
    ctx: typer.Context,
    dataset: str | None = typer.Option(None, help=f"{', '.join(DATASETS)}."),
    data_root: str | None = typer.Option(None, help="Dataset directory (see README: Datasets)."),
    store: str = typer.Option(..., help="Store directory to create or resume (stores/<dataset>)."),
    model: str | None = typer.Option(
        None, help="open_clip model (default ViT-B-16, or the store's)."
    ),
    pretrained: str | None = typer.Option(
        None,
        help="open_clip tag, none (random init) or a weights file (default openai, or the store's).",
    ),
    frames: int = typer.Option(E.frames, help="Frames per view (T), one per TSN segment."),
    views: int = typer.Option(
        E.views,
        help="Views per video (V): centre frames, then seeded random frames (emp: train augmented).",
    ),
    recipe: str = typer.Option(
        E.recipe,
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
        E.preprocess,
        help="openclip (the model's), emp (EMP-Net's and TS-FSAR's) or emp-noflip (no training "
        "flip: TS-FSAR's SSv2 recipe).",
    ),
    splits: str | None = typer.Option(None, help="Only these splits, e.g. train,val."),
    part: str | None = typer.Option(None, help="Only part I/N of the videos (by video_id hash)."),
    workers: int | None = typer.Option(
        None, help="Local Dask worker processes (default: cores/4 on CPU, one per GPU)."
    ),
    scheduler: str | None = typer.Option(None, help="Address of an existing Dask scheduler."),
    device: str = typer.Option(E.device, help="auto, cpu or cuda."),
    batch_size: int | None = typer.Option(
        None, help="Frames per forward (default V*T on CPU, 256 on CUDA)."
    ),
    timeout: float = typer.Option(E.timeout, help="Seconds one video may take to decode."),
    decode: str = typer.Option(
        E.decode, help="seek (keyframe-aware, exact, else sequential) or sequential (from frame 0)."
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
    from pipeline.descriptions import add_descriptions
    from pipeline.extract import run_extraction
    from pipeline.text import add_text_embeddings

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
    check_output_place("--store", store)
    values = option_values(ctx, ExtractOptions)
    values["class_descriptions"] = tuple(class_descriptions)
    try:
        summary = run_extraction(ExtractOptions(**values))
    except KeyboardInterrupt:
        fail(f"interrupted; finished rows are saved: rerun the same command to resume {store}", 130)
    for line in summary.lines():
        typer.echo(line)


app.command("extract")(extract_command)


# ---------------------------------------------------------------- fsar-train, fsar-eval
T = TrainConfig  # its defaults are the options' defaults; only options given on the command line
# go to config_from_options, so a --config file or --preset sets the others
TRAIN_OPTIONS = (
    "store", "preset", "head", "way", "shot", "query", "episodes", "episodes_per_step", "lr",
    "decay_groups", "val_every", "val_episodes", "val_way", "out", "seed", "device", "max_ram",
    "progress",
)  # fmt: skip
HEAD_FLAGS = (
    "levels", "loss", "temperature", "strategy", "no_text", "no_skip_fusion", "layer_weights",
    "score_weights",
)  # fmt: skip


@train_app.command("train", cls=HeadsCommand)
def train_command(
    ctx: typer.Context,
    store: str | None = typer.Option(None, help="Store path (stores/<dataset>)."),
    config: str | None = typer.Option(
        None, help="JSON file of training options (CLI options win)."
    ),
    preset: str | None = typer.Option(
        None,
        help=f"{'|'.join(PRESETS)}: the released recipe of --head (tsfsar: TS-FSAR's, per --shot; "
        "other heads: EMP-Net's schedule).",
    ),
    head: str = typer.Option(T.head, help="Head to train: a trainable one of those listed below."),
    way: int = typer.Option(T.way, help="Classes per episode."),
    shot: int = typer.Option(T.shot, help="Support videos per class."),
    query: int = typer.Option(T.query, help="Query videos per class in training."),
    episodes: int = typer.Option(T.episodes, help="Training episodes."),
    episodes_per_step: int = typer.Option(
        T.episodes_per_step, help="Episodes per optimiser step (gradient accumulation)."
    ),
    lr: float = typer.Option(T.lr, help="Peak learning rate."),
    decay_groups: str = typer.Option(
        T.decay_groups,
        help="Weight decay on: matrices (not norms, biases, scalars) | released (EMP-Net's names) "
        "| all.",
    ),
    val_every: int = typer.Option(T.val_every, help="Validate every N episodes."),
    val_episodes: int = typer.Option(T.val_episodes, help="Validation episodes."),
    val_way: int | None = typer.Option(None, help="Classes per validation episode [--way]."),
    out: str | None = typer.Option(None, help="Run directory [runs/<head>-<store>-<time>]."),
    seed: int = typer.Option(T.seed, help="Seed of episodes and initialisation."),
    device: str = typer.Option(T.device, help="auto, cpu, cuda, cuda:1 ..."),
    max_ram: float = typer.Option(
        T.max_ram, help="GB a split may take in RAM; larger splits stream."
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

    if resume and overwrite:
        fail("give --resume or --overwrite, not both")
    warn_refused_heads()
    if keep_freed_memory_:
        keep_freed_memory()
    if resume:
        more = given(ctx, ("episodes",)).get("episodes")
        cfg = resume_config(Path(out or "runs/latest"), more, progress)
    else:
        flags = {name: ctx.params[name] for name in HEAD_FLAGS}
        cfg = config_from_options(given(ctx, TRAIN_OPTIONS), key_values(option), flags, config)
        check_output_place("--out", cfg.out or "runs")
    run_dir = train(cfg, resume=resume, overwrite=overwrite)
    typer.echo(f"run: {run_dir}")


V = EvalOptions  # its defaults are the options' defaults


@eval_app.command("eval", cls=HeadsCommand)
def eval_command(
    ctx: typer.Context,
    store: str | None = typer.Option(None, help="Store path [the store the run's config names]."),
    checkpoint: str | None = typer.Option(None, help="Run directory [runs/latest]."),
    head: str | None = typer.Option(
        None,
        help="A head instead of a run: any listed below (a trainable one untrained).",
    ),
    episodes: int = typer.Option(V.episodes, help="Test episodes."),
    way: int = typer.Option(V.way, help="Classes per episode."),
    shot: int = typer.Option(V.shot, help="Support videos per class."),
    query: int = typer.Option(V.query, help="Query videos per class."),
    split: str = typer.Option(V.split, help="Split to evaluate."),
    view: str = typer.Option(
        V.view, help="centre (view 0), random (one of views 1..V-1 per video per episode) or N."
    ),
    seed: int = typer.Option(V.seed, help="Episode seed (same seed, same episodes, any machine)."),
    device: str = typer.Option(V.device, help="auto, cpu, cuda ..."),
    max_ram: float = typer.Option(
        V.max_ram, help="GB the split may take in RAM; larger splits stream."
    ),
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
    from heads.eval_run import run_evaluation
    from runtime.memory import keep_freed_memory

    options = EvalOptions(**option_values(ctx, EvalOptions), head_options=key_values(option))
    options.validate()
    warn_refused_heads()
    for name, path in (("--json", json_out), ("--per-episode", per_episode)):
        if path is not None:
            check_output_file(name, path)
    keep_freed_memory()
    typer.echo(run_evaluation(options).summary())


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
    episodes: int | None = typer.Option(
        None, help=f"Test episodes per cell [the plan's, {V.episodes}]."
    ),
    train: list[str] = typer.Option(
        [], help="Training option KEY=VALUE for every trained cell (repeatable)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the study in --out, even with a changed plan."
    ),
    device: str = typer.Option("cpu", help="cpu, cuda ... (on the workers)."),
    max_ram: float = typer.Option(MAX_RAM_GB, help="GB a split may take in a worker's RAM."),
    progress: bool = typer.Option(True, help="Progress bar over cells."),
) -> None:
    """Run a study: every cell trains (selection on val) and is tested on the same episodes."""
    if ctx.invoked_subcommand is not None:
        return
    from heads.study import (
        StudyInterrupted,
        StudyOptions,
        load_plan,
        run_study,
    )

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
        chosen = load_plan(plan)
        options = StudyOptions(
            store=store, out=out or f"studies/{chosen.name}", scheduler=scheduler,
            workers=workers, seeds=seed_list, episodes=episodes, train=key_values(train, "--train"),
            resume=resume, device=device, max_ram=max_ram, progress=progress,
        )  # fmt: skip
        check_output_place("--out", options.out)
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
    from heads.study import paired_comparison, read_pair

    acc_a, acc_b, note = read_pair(a, b)
    if note:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"A {a}: {acc_a.mean() * 100:.2f}%   B {b}: {acc_b.mean() * 100:.2f}%")
    typer.echo(paired_comparison(acc_a, acc_b).summary("A", "B"))


if __name__ == "__main__":
    sys.exit(app())
