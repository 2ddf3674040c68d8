"""The human-readable run report: ``report.md`` with tables and plots beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mace_mf.config.schema import REPLAY_FIDELITY as REPLAY
from mace_mf.config.schema import Recipe
from mace_mf.evaluation.md_check import md_check_markdown
from mace_mf.evaluation.metrics import metrics_table
from mace_mf.evaluation.plots import curve_plot
from mace_mf.files import atomic_write_text
from mace_mf.model.foundation import FoundationInfo
from mace_mf.run_folder import RunFolder
from mace_mf.train.trainer import History


def _pairs_note(metrics: dict[str, Any]) -> list[str]:
    """What the pair columns mean, where validation pairs were scored."""
    scored = {name: m for name, m in metrics.get("valid", {}).items() if m.get("n_pairs")}
    if not scored:
        return []
    parts = ", ".join(f"`{name}` on {m['n_pairs']} pairs" for name, m in scored.items())
    return [
        f"F·u RMSE, pairs: the directional force F·u of each head against −(E(x+δu) − E(x−δu))/2δ of "
        f"the level's own energies on displaced validation geometries (`data.valid_pairs`; {parts}): an "
        "estimate of the force RMSE made without force labels. F·u 95 % low / high: the 95 % bootstrap interval of "
        "that estimate over the pairs; pairs for ±5 %: how many pairs would narrow it to ±5 % (it narrows as "
        "1/sqrt(pairs)).",
        "",
    ]


def _forgetting(recipe: Recipe, forgetting: dict[str, Any] | None) -> list[str]:
    """Beyond the fine-tuning data (``forgetting.json``, mace_mf.workflows.run.forgetting_check)."""
    if forgetting is None or recipe.replay is None:
        return []
    spec, drift = recipe.replay, forgetting["drift"]
    what = (
        f"the `{REPLAY}` head, trained on the foundation's labels of the other chosen geometries (weights E "
        f"{spec.energy_weight:g}, F {spec.forces_weight:g}),"
        if forgetting["replayed"]
        else "the foundation's readout on the fine-tuned backbone (replay weights 0: nothing replayed)"
    )
    source = (
        "from `" + "`, `".join([spec.pool] if isinstance(spec.pool, str) else spec.pool) + "`"
        if spec.pool
        else "MD frames of g2 molecules"
    )
    lines = [
        "## Forgetting",
        "",
        f"On {forgetting['held_out']} held-out replay geometries ({source}, chosen by {spec.selection}), "
        f"{what} is {drift['f_rmse_meV_A']:.1f} meV/Å (force RMSE) and "
        f"{drift['e_rmse_meV_atom']:.2f} meV/atom (energy RMSE) from the foundation itself: how far fine-tuning "
        "moved the foundation's level outside the fine-tuning data (0 before training).",
        "",
    ]
    if forgetting["md_check"]:
        target, foundation = forgetting["md_check"]["target"], forgetting["md_check"]["foundation"]
        lines += [
            f"MD beyond the fine-tuning data (`md_check` options, from the first {target['structures']} of them): "
            f"the target head `{recipe.target}` stable in {target['passed']}/{target['structures']}, the "
            f"foundation in {foundation['passed']}/{foundation['structures']}.",
            "",
        ]
    return lines


def _sample_note(recipe: Recipe, n_train: int) -> list[str]:
    """Where the statistics of the training split came from a sample (``data.statistics_sample``)."""
    size = recipe.data.statistics_sample
    if size is None or n_train <= size:
        return []
    return [
        f"- the E0 fit, the label variances and the train rows of the tables read a seeded sample of {size:,} "
        f"of the {n_train:,} training configurations (`data.statistics_sample`)"
    ]


def write_report(
    out: Path,
    recipe: Recipe,
    info: FoundationInfo,
    splits: Any,
    metrics: dict[str, Any],
    zero_shot: dict[str, Any],
    history: History,
    e0s: dict[str, dict[str, float]],
    files: list[Path],
    wall_time_s: float,
    md_record: dict[str, Any] | None = None,
    forgetting: dict[str, Any] | None = None,
) -> Path:
    """Write ``report.md`` (atomically) and the learning-curve plot."""
    lines = [f"# mace_mf run `{recipe.name}`", ""]
    lines += [
        f"- foundation: `{info.source}` (head `{info.head}`, {info.num_parameters:,} parameters, "
        f"r_max {info.r_max:.2f} Å, elements {' '.join(info.elements)})",
        f"- fidelities: {', '.join(f'`{n}`' for n in recipe.fidelities)}; target `{recipe.target}`",
        f"- data: {len(splits.train)} train, {len(splits.valid)} valid, "
        f"{len(splits.test) if splits.test else 0} test configurations",
        f"- epochs run: {len(history.epochs)} (best epoch {history.best_epoch}); wall time {wall_time_s:.0f} s",
        f"- dtype {recipe.dtype}, device {recipe.device}, seed {recipe.seed}",
        *_sample_note(recipe, len(splits.train)),
        "",
        "## Errors after fine-tuning",
        "",
        metrics_table(metrics),
        "",
        *_pairs_note(metrics),
        *_forgetting(recipe, forgetting),
        "## Zero-shot (foundation with per-fidelity E0s, before training)",
        "",
        metrics_table(zero_shot),
        "",
    ]
    folder = RunFolder(out)
    if curve_plot(history.epochs, history.best_epoch, list(recipe.fidelities), folder.plots / "learning_curve.png"):
        lines += ["## Learning curve", "", "![learning curve](plots/learning_curve.png)", ""]
    plots = sorted(folder.plots.glob("parity_*.png"))
    if plots:
        lines += ["## Parity plots", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
        lines.append("")
    lines += [
        "## Atomic reference energies (eV)",
        "",
        "| fidelity | " + " | ".join(next(iter(e0s.values()))) + " |",
        "|---|" + "---|" * len(next(iter(e0s.values()))),
    ]
    for name, values in e0s.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values.values()) + " |")
    if md_record is not None:
        lines += ["", "## MD stability check (`md_check.json`)", "", *md_check_markdown(md_record)]
    lines += ["", "## Exported files", ""]
    lines += [f"- `{p.relative_to(out)}`" for p in files]
    names = {p.name for p in files}
    single = f"{recipe.target}.model" if f"{recipe.target}.model" in names else None
    if single or "multihead.model" in names:
        lines += ["", "Load in ASE without mace_mf:", ""]
        if single:
            lines.append(f"- `MACECalculator(model_paths='models/{single}')` (the target, `{recipe.target}`)")
        if "multihead.model" in names:
            lines.append("- `MACECalculator(model_paths='models/multihead.model', head='<fidelity>')` (target first)")
        lines.append("")
    path = folder.report
    atomic_write_text(path, "\n".join(lines))
    return path
