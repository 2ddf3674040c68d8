"""``mace-mf <verb>``: a thin shell over the modules; every user error is one line and exit code 2.

Commands import the heavy modules (torch, mace) inside their bodies so that ``--help`` and
``recipe check`` answer instantly.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from mace_mf.config.schema import MDOptions
from mace_mf.errors import DataError, RunError, UserError
from mace_mf.quiet import silence_known_noise
from mace_mf.run_folder import RunFolder

# Plain click help: it wraps long option names and defaults, where rich's panels cut them at 80
# columns ("zero-shot,sf-high-e,sf-high-e…") in a narrow terminal or a pipe.
HELP = {"rich_markup_mode": None, "context_settings": {"max_content_width": 120}}
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Multi-fidelity fine-tuning of foundation MACE potentials.",
    **HELP,
)
recipe_app = typer.Typer(no_args_is_help=True, help="Inspect recipes.", **HELP)
app.add_typer(recipe_app, name="recipe")
err = Console(stderr=True)
_state = {"debug": False}

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: dotted.key=value.")]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda or cuda:<n> (float32 on a GPU, float64 on a CPU).")]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    _state["debug"] = debug
    level = logging.WARNING if quiet else logging.INFO
    console = RichHandler(console=err, show_path=False, show_time=False, level=level)
    logging.basicConfig(level=level, format="%(message)s", handlers=[console], force=True)
    for noisy in ("matplotlib", "PIL", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def train(
    recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<name>-<timestamp>).")] = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = False,
    wandb: Annotated[str | None, typer.Option(help="W&B mode: online, offline or disabled.")] = None,
) -> None:
    """Fine-tune a foundation on the recipe's fidelities; evaluate, export and report."""
    from mace_mf.config.loading import check_files, load_recipe

    overrides = list(set_ or [])
    if wandb is not None:
        overrides.append(f"wandb.mode={wandb}")
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other; choose one")
    recipe = load_recipe(recipe_file, overrides)
    check_files(recipe)  # before torch and the foundation load: seconds
    if resume and out is None:
        raise RunError("--resume needs --out pointing at the run folder to continue")
    from mace_mf.train.distributed import from_env
    from mace_mf.workflows.run import default_out, train_run

    dist = from_env()
    if dist.enabled and out is None:
        raise RunError("--out: under torchrun every process must name the same folder; give --out")
    target = out or default_out(recipe)
    try:
        train_run(recipe, target, recipe_file=recipe_file, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt:
        if dist.is_main:
            err.print(
                f"interrupted; the last complete epoch is kept: continue with mace-mf train {recipe_file} "
                f"--out {target} --resume" + "".join(f" --set {o}" for o in overrides),
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(130) from None
    if not dist.is_main:  # rank 0 writes and reports
        return
    metrics = RunFolder(target).read_metrics()
    out_console().print(metrics_rich_table(metrics))
    err.print(f"[green]done[/green]: {target}/report.md")


def out_console() -> Console:
    """Standard output for tables: the terminal's width, or 160 columns into a pipe or a log file
    (rich's 80 would cut headers such as "E RMSE (meV/atom)")."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def metrics_rich_table(metrics: dict) -> Table:
    """The metrics of every split and fidelity as a terminal table (cells wrap, never cut)."""
    from rich.table import Column

    from mace_mf.evaluation.metrics import metrics_header, metrics_rows

    table = Table(*(Column(name, overflow="fold") for name in metrics_header(metrics)))
    for row in metrics_rows(metrics):
        table.add_row(*row)
    return table


@app.command()
def sweep(
    recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file every trial starts from.")],
    sweep_file: Annotated[
        Path, typer.Argument(metavar="SWEEP", help="W&B sweep YAML; parameter names are dotted recipe keys.")
    ],
    count: Annotated[int | None, typer.Option(help="Number of trials (default: the whole grid, or run_cap).")] = None,
    set_: SetOption = None,
    out: Annotated[
        Path | None, typer.Option(help="Sweep folder (default runs/<name>-<timestamp>); an existing one continues.")
    ] = None,
    wandb: Annotated[str | None, typer.Option(help="W&B mode: online, offline or disabled.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the local random search.")] = 0,
) -> None:
    """Run a hyperparameter sweep: W&B's agent online, local grid/random search offline; rank the trials."""
    from mace_mf.workflows.sweep import run_sweep, table_rows

    try:
        result = run_sweep(recipe_file, sweep_file, list(set_ or []), out, count, seed, wandb)
    except KeyboardInterrupt:
        err.print("sweep interrupted; run the same command with --out <sweep folder> to continue it", soft_wrap=True)
        raise typer.Exit(130) from None
    header, rows = table_rows(result.trials, result.sweep)
    table = Table(*header, title=f"{result.sweep.method} sweep, ranked by {result.sweep.metric} ({result.sweep.goal})")
    for row in rows:
        table.add_row(*row)
    out_console().print(table)
    if result.stopped:
        err.print(f"sweep stopped early; continue it with the same command and --out {result.folder}", soft_wrap=True)
    err.print(f"[green]done[/green]: {result.folder}/trials.md", soft_wrap=True)


@app.command("eval")
def evaluate(
    model_or_run: Annotated[Path, typer.Argument(metavar="MODEL_OR_RUN", help="A .model file or a run folder.")],
    data: Annotated[list[Path], typer.Argument(help="ASE-readable labelled file(s).")],
    head: Annotated[list[str] | None, typer.Option(help="Head(s) to evaluate (default: all).")] = None,
    energy_key: Annotated[str, typer.Option(help="Energy key; {head} is replaced by the head name.")] = "{head}_energy",
    forces_key: Annotated[str, typer.Option(help="Forces key; {head} is replaced by the head name.")] = "{head}_forces",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the metrics as JSON.")] = None,
    batch_size: Annotated[int, typer.Option(help="Configurations per batch.")] = 32,
    pairs: Annotated[
        list[Path] | None, typer.Option(help="Labelled displacement pairs (mace-mf displace) to score F·u on.")
    ] = None,
    device: DeviceOption = "cpu",
) -> None:
    """Evaluate any MACE model file (or a run's multi-head model) on any labelled data."""
    from mace_mf.evaluation.inference import evaluate_model_file

    files, pair_files = [str(p) for p in data], [str(p) for p in pairs or []]
    metrics = evaluate_model_file(model_or_run, files, head, energy_key, forces_key, batch_size, pair_files, device)
    out_console().print(metrics_rich_table({"data": metrics}))
    if json_out is not None:
        from mace_mf.files import atomic_write_text

        atomic_write_text(json_out, json.dumps(metrics, indent=2))


@app.command()
def export(
    model_or_run: Annotated[Path, typer.Argument(metavar="MODEL_OR_RUN", help="A multi-head .model or a run folder.")],
    out: Annotated[Path, typer.Option(help="Folder for the exported files.")],
    fidelity: Annotated[list[str] | None, typer.Option(help="Head(s) to export (default: all).")] = None,
    torchscript: Annotated[bool, typer.Option(help="Also write TorchScript files.")] = True,
    lammps: Annotated[
        bool, typer.Option(help="Also write <fidelity>.model-lammps.pt for LAMMPS pair_style mace.")
    ] = False,
) -> None:
    """Write single-head, multi-head, TorchScript (and LAMMPS) files from a model or a run."""
    from mace_mf.model.export import export_file

    export_file(model_or_run, out, fidelity, torchscript, lammps)


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{option}: {text!r} is not a comma-separated list of numbers") from None


@app.command()
def bench(
    recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file (the `mf` arm).")],
    out: Annotated[Path, typer.Option(help="Benchmark folder; finished runs in it are not rerun.")],
    arms: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated arms, or mf-low<scale> [default: zero-shot,sf-high-e,sf-high-ef,sf-low,mf,"
            "mf-transfer, less any that trains on labels the training data lacks: the oracle without high-level "
            "training forces]",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    fractions: Annotated[str, typer.Option(help="Fractions of high-level energies for the learning curve.")] = "1",
    fraction_arms: Annotated[
        str | None,
        typer.Option(help="Arms run at every fraction [default: sf-high-e,mf,mf-transfer]", show_default=False),
    ] = None,
    low: Annotated[str | None, typer.Option(help="Low fidelity (default: the first non-target).")] = None,
    high: Annotated[str | None, typer.Option(help="High fidelity (default: training.target).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Runs trained at once, one process each.")] = 1,
    set_: SetOption = None,
) -> None:
    """Train the comparison arms (energies only, oracle, low only, multi-fidelity) and say whether
    multi-fidelity pays on this data (closure on the validation split)."""
    from mace_mf.workflows.bench import run_benchmark

    try:
        run_benchmark(
            recipe_file,
            out,
            None if arms is None else [a for a in arms.split(",") if a],
            [int(x) for x in _floats(seeds, "--seeds")],
            _floats(fractions, "--fractions"),
            None if fraction_arms is None else [a for a in fraction_arms.split(",") if a],
            list(set_ or []),
            low,
            high,
            workers,
        )
    except KeyboardInterrupt:
        err.print(f"bench interrupted; finished arms are kept: run the same command to continue {out}", soft_wrap=True)
        raise typer.Exit(130) from None
    sys.stdout.write((out / "results.md").read_text())


@app.command()
def preprocess(
    files: Annotated[list[Path], typer.Argument(metavar="FILES...", help="Data files (ASE, mace-torch HDF5 or LMDB).")],
    out: Annotated[Path, typer.Option(help="The store folder to write (resumed if it is unfinished).")],
    workers: Annotated[int, typer.Option(min=1, help="Processes converting chunks in parallel.")] = 1,
    data_format: Annotated[str | None, typer.Option("--format", help="ASE format of FILES (default: guessed).")] = None,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip bad configurations (listed in STORE/skipped.tsv) instead of stopping.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished store in --out.")] = False,
    chunk: Annotated[int, typer.Option(min=1, help="Configurations per shard (one process's unit of work).")] = 10_000,
) -> None:
    """Convert data files into a store that every run, bench arm, sweep trial and rank reads from disk."""
    from ase.data import chemical_symbols

    from mace_mf.data.store import preprocess as convert

    try:
        store = convert(files, out, workers, data_format, skip_bad, overwrite, chunk)
    except KeyboardInterrupt:
        err.print(f"interrupted; finished shards are kept: run the same command to complete {out}", soft_wrap=True)
        raise typer.Exit(130) from None
    manifest = store.manifest
    err.print(
        f"{out}: {manifest['configs']} configurations, {manifest['atoms']} atoms, elements "
        f"{' '.join(chemical_symbols[z] for z in manifest['elements'])}, in {manifest['seconds']:.1f} s "
        f"({manifest['configs'] / max(manifest['seconds'], 1e-9):.0f} configurations/s with {workers} worker(s))"
        + (f"; {manifest['skipped']} skipped, listed in {out / 'skipped.tsv'}" if manifest["skipped"] else ""),
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def label(
    input_file: Annotated[Path, typer.Argument(metavar="INPUT", help="ASE-readable file of configurations.")],
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="extxyz file to write (atomically).")],
    fidelity: Annotated[str, typer.Option(help="Labels go to <fidelity>_energy (info) and <fidelity>_forces.")],
    calculator: Annotated[
        str,
        typer.Option(
            help="gfn2-xtb | gfn1-xtb (tblite; atoms.info charge, multiplicity/spin or uhf) | "
            "pyscf:<method>/<basis> (HF, DFT, MP2, CCSD(T); charge and spin as for xTB) | "
            "mace:PATH[:head] | module.path:ClassName"
        ),
    ],
    calc_kwargs: Annotated[
        list[str] | None,
        typer.Option("--calc-kwargs", help="Calculator keyword arguments: a JSON object or key=value (repeatable)."),
    ] = None,
    energies_only: Annotated[
        bool, typer.Option(help="Compute energies only (no forces): the high level on training geometries.")
    ] = False,
    workers: Annotated[int, typer.Option(help="Worker processes (one thread each).")] = 1,
    chunk_size: Annotated[int, typer.Option(help="Configurations per task sent to a worker.")] = 1,
    overwrite_labels: Annotated[bool, typer.Option(help="Replace <fidelity>_* labels already in INPUT.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUTPUT file.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from OUTPUT.partial.jsonl.")] = False,
    data_format: Annotated[str | None, typer.Option("--format", help="ASE format of INPUT (default: guessed).")] = None,
) -> None:
    """Label every configuration of INPUT with a calculator; existing labels are kept."""
    import re

    from mace_mf.config.schema import FIDELITY_NAME_PATTERN
    from mace_mf.labels.calculators import parse_calc_kwargs, parse_calculator_spec
    from mace_mf.labels.labelling import label_file

    if not re.match(FIDELITY_NAME_PATTERN, fidelity):
        raise DataError(f"--fidelity {fidelity!r}: must match {FIDELITY_NAME_PATTERN}")
    spec = parse_calculator_spec(calculator, parse_calc_kwargs(calc_kwargs))
    try:
        report = label_file(
            input_file,
            output,
            spec,
            f"{fidelity}_energy",
            None if energies_only else f"{fidelity}_forces",
            workers=workers,
            resume=resume,
            overwrite=overwrite,
            overwrite_labels=overwrite_labels,
            fmt=data_format,
            chunk_size=chunk_size,
        )
    except KeyboardInterrupt:
        err.print("interrupted; the results so far are kept: run the same command with --resume")
        raise typer.Exit(130) from None
    for index, reason in report.failures[:5]:
        err.print(f"[yellow]failed[/yellow] configuration {index}: {reason}", highlight=False, soft_wrap=True)
    err.print(report.summary(), highlight=False, soft_wrap=True)


@app.command()
def displace(
    input_file: Annotated[Path, typer.Argument(metavar="INPUT", help="Geometries to displace (e.g. valid.xyz).")],
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="extxyz file of the pairs to write.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of pairs (directions); 2 energies each.")] = 20,
    delta: Annotated[float, typer.Option(help="Norm of the whole displacement (Å).")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed of the geometries and directions chosen.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUTPUT.")] = False,
    data_format: Annotated[str | None, typer.Option("--format", help="ASE format of INPUT (default: guessed).")] = None,
) -> None:
    """Write ± displacements of validation geometries along seeded random directions: label them with
    the high level (energies only) and set data.valid_pairs, to score forces with no force labels."""
    from mace_mf.data.pairs import displace_file

    geometries = displace_file(input_file, output, n, delta, seed, overwrite, data_format)
    err.print(
        f"{output}: {n} pairs ({2 * n} configurations) from {geometries} geometries of {input_file}, δ = {delta} Å. "
        f"Next: mace-mf label {output} <labelled.xyz> --fidelity <high> --calculator <...> --energies-only, "
        "then data.valid_pairs: <labelled.xyz> in the recipe",
        highlight=False,
        soft_wrap=True,
    )


@app.command("select")
def select_command(
    pool: Annotated[Path, typer.Argument(metavar="POOL", help="Geometries to choose from (low-level labels).")],
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="extxyz file of the chosen geometries.")],
    budget: Annotated[float, typer.Option(help="Geometries to choose: a fraction of the pool (< 1) or a count.")],
    model: Annotated[
        Path | None, typer.Option(help="MACE .model file or run folder whose descriptors/forces guide the choice.")
    ] = None,
    method: Annotated[str, typer.Option(help="kmeans (default), fps, disagreement or random.")] = "kmeans",
    head: Annotated[str | None, typer.Option(help="Head of a multi-head model (disagreement).")] = None,
    forces_key: Annotated[
        str | None, typer.Option(help="Low-level forces in the pool (atoms.arrays), for disagreement.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of fps's first pick, the k-means start or the random draw.")] = 0,
    rest: Annotated[Path | None, typer.Option(help="Also write the geometries not chosen here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    data_format: Annotated[str | None, typer.Option("--format", help="ASE format of POOL (default: guessed).")] = None,
    device: DeviceOption = "cpu",
) -> None:
    """Choose the geometries of POOL that should get expensive high-level labels."""
    from mace_mf.data.selection import select_file

    chosen = select_file(
        pool, output, budget, model, method, head, forces_key, seed, rest, overwrite, data_format, device
    )
    err.print(
        f"{output}: {chosen.count} of {chosen.pool} geometries of {pool} chosen by {method} in {chosen.seconds:.1f} s",
        highlight=False,
        soft_wrap=True,
    )


def _md_default(name: str) -> float:
    """An MD-check threshold's default, from the recipe schema that defines it."""
    return MDOptions.model_fields[name].default


@app.command("md-check")
def md_check_command(
    model_or_run: Annotated[Path, typer.Argument(metavar="MODEL", help="A .model file or a run folder.")],
    structures: Annotated[Path, typer.Argument(help="ASE-readable file of starting geometries.")],
    head: Annotated[str | None, typer.Option(help="Head of a multi-head model.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Velocity-Verlet steps per structure.")] = _md_default("steps"),
    dt: Annotated[float, typer.Option(min=0.01, help="Time step (fs).")] = _md_default("dt_fs"),
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Initial Maxwell-Boltzmann temperature (K).")
    ] = _md_default("temperature_K"),
    limit: Annotated[int | None, typer.Option(min=1, help="Check only the first N structures.")] = None,
    max_drift: Annotated[float, typer.Option(help="Largest |energy drift| that passes (eV/atom/ps).")] = _md_default(
        "max_drift"
    ),
    max_bond_stretch: Annotated[
        float, typer.Option(help="Largest relative bond elongation that passes.")
    ] = _md_default("max_bond_stretch"),
    max_force: Annotated[float, typer.Option(help="Largest force that passes (eV/Å).")] = _md_default("max_force"),
    min_distance: Annotated[float, typer.Option(help="Closest approach of two atoms that passes (Å).")] = _md_default(
        "min_distance"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the initial velocities.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for torch; 1 is fastest for small molecules.")] = 1,
    out: Annotated[Path, typer.Option(help="Where to write the JSON record.")] = Path("md_check.json"),
    device: DeviceOption = "cpu",
) -> None:
    """Short NVE MD from each structure: energy drift, forces, bond stretch, atoms flying apart; PASS/FAIL.

    Exit code 0 on PASS, 1 on FAIL (2 for bad input), so scripts can gate on it.
    """
    import torch

    from mace_mf.evaluation.md_check import md_check_file, md_check_markdown

    torch.set_num_threads(threads)
    options = MDOptions(
        steps=steps,
        dt_fs=dt,
        temperature_K=temperature,
        max_drift=max_drift,
        max_bond_stretch=max_bond_stretch,
        max_force=max_force,
        min_distance=min_distance,
    )
    record = md_check_file(model_or_run, structures, head, options, seed, limit, out, device)
    out_console().print("\n".join(md_check_markdown(record)[4:]))
    passed = record["passed"]
    err.print(f"[{'green' if passed else 'red'}]{escape(record['summary'])}[/]", highlight=False, soft_wrap=True)
    if not passed:
        raise typer.Exit(1)


@recipe_app.command("check")
def recipe_check(recipe_file: Annotated[Path, typer.Argument(metavar="RECIPE")], set_: SetOption = None) -> None:
    """Validate a recipe (its keys, and that the files it names exist) and print it resolved, with
    every default filled in."""
    from mace_mf.config.loading import check_files, dump_recipe, load_recipe

    recipe = load_recipe(recipe_file, list(set_ or []))
    check_files(recipe)
    sys.stdout.write(dump_recipe(recipe))


@recipe_app.command("reference")
def recipe_reference() -> None:
    """Print the recipe reference (every key, type, default, meaning) as Markdown."""
    from mace_mf.config.messages import reference_markdown

    sys.stdout.write(reference_markdown() + "\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn user errors into one line and exit code 2."""
    silence_known_noise()
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="mace-mf", standalone_mode=False)
    except UserError as exc:
        if _state["debug"]:
            raise
        err.print(f"[red]error[/red]: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        err.print(f"[red]error[/red]: {escape(exc.format_message())}", highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.Abort:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    # In non-standalone mode click returns a command's typer.Exit(code) instead of raising it.
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
