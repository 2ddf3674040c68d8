"""Reading a recipe: YAML (duplicate keys refused), ``--set`` overrides, validation, paths.

Relative paths are resolved against the folder of the recipe file, so a recipe can be moved
together with its data. Validation errors become one line naming the file, the dotted key and the
fix (:mod:`mace_mf.config.messages`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mace_mf.config.messages import format_validation_error
from mace_mf.config.schema import NAMED_FOUNDATIONS, Recipe
from mace_mf.errors import DataError, RecipeError


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r}; each key (and fidelity name) may appear once",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# pydantic appends the tried union member or a mapping-key marker to a location: not recipe keys.
def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c = value`` in nested dicts, creating sections on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``dotted.key=value``; the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected dotted.key=value, e.g. training.lr=0.0005")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {text!r}: value is not valid YAML ({exc.problem})") from None


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    def resolve(path: str) -> str:
        return str((base / path).resolve()) if not Path(path).is_absolute() else path

    def resolve_many(value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return None
        return [resolve(p) for p in value] if isinstance(value, list) else resolve(value)

    model = recipe.foundation.model
    if not model.startswith(NAMED_FOUNDATIONS):
        recipe.foundation.model = resolve(model)
    recipe.data.train = resolve_many(recipe.data.train)  # type: ignore[assignment]
    recipe.data.valid = resolve_many(recipe.data.valid)
    recipe.data.test = resolve_many(recipe.data.test)
    recipe.data.valid_pairs = resolve_many(recipe.data.valid_pairs)
    if recipe.replay is not None:
        recipe.replay.pool = resolve_many(recipe.replay.pool)
    if recipe.data.label_cache is not None:
        recipe.data.label_cache = resolve(recipe.data.label_cache)
    if recipe.data.store_cache is not None:
        recipe.data.store_cache = resolve(recipe.data.store_cache)
    for spec in recipe.fidelities.values():
        calculator = spec.labels.calculator if spec.labels is not None else ""
        if spec.labels is not None and calculator.startswith("mace:"):
            spec.labels.calculator = "mace:" + resolve(calculator[len("mace:") :])
    return recipe


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), values: dict[str, Any] | None = None
) -> Recipe:
    """Read, override (``--set`` texts, then already parsed ``values`` by dotted key), validate and
    path-resolve a recipe file. Sweeps pass their parameters as ``values`` so that a number stays the
    number the sweep file gave (``1e-3`` read back as YAML text would be a string)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found; check the path") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror}); check the path and its permissions") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}:{where}: malformed YAML ({problem}); fix the syntax") from None
    if tree is None:
        raise RecipeError(f"{path}: the recipe is empty; see recipes/quickstart.yaml for an example")
    if not isinstance(tree, dict):
        raise RecipeError(
            f"{path}: a recipe must be a mapping of sections, got {type(tree).__name__}; write "
            "`section: {key: value}` lines (see recipes/quickstart.yaml)"
        )
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(tree, key, value)
    for key, value in (values or {}).items():
        set_dotted(tree, key, value)
    return recipe_from_dict(tree, source=str(path), base=path.resolve().parent)


def recipe_from_dict(tree: dict[str, Any], source: str, base: Path) -> Recipe:
    """Validate an already parsed recipe; ``base`` resolves relative paths."""
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(source, exc)) from None
    return _resolve_paths(recipe, base)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe, defaults included, as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def recipe_changes(before: Recipe, after: Recipe) -> list[str]:
    """The dotted keys whose resolved values differ, as ``key: old -> new`` (empty when equal).

    Used wherever a run folder is reused (resume, the benchmark's finished arms): a folder trained
    with other settings, or under an older default, must be named, not silently taken as this run.
    """

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict) and tree:
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): tree}

    old, new = flat(before.model_dump(mode="json")), flat(after.model_dump(mode="json"))
    unset = "(unset)"
    keys = sorted(old.keys() | new.keys())
    return [f"{k}: {old.get(k, unset)} -> {new.get(k, unset)}" for k in keys if old.get(k, unset) != new.get(k, unset)]


def check_files(recipe: Recipe) -> None:
    """Every file a recipe names exists (data, pairs, a local foundation): what `recipe check` and the
    start of a run say before anything is loaded."""
    for key in ("train", "valid", "test", "valid_pairs"):
        value = getattr(recipe.data, key)
        for path in [value] if isinstance(value, str) else value or []:
            if not Path(path).exists():
                raise DataError(f"data.{key}: {path} not found; check data.* in the recipe")
    pool = recipe.replay.pool if recipe.replay is not None else None
    for path in [pool] if isinstance(pool, str) else pool or []:
        if not Path(path).exists():
            raise DataError(f"replay.pool: {path} not found; check replay.pool in the recipe (null: generated)")
    model = recipe.foundation.model
    named = model.startswith(NAMED_FOUNDATIONS) or re.fullmatch(r"[A-Za-z_]+:[\w.\-]+", Path(model).name)
    if not named and not Path(model).exists():  # a name is the foundation loader's to judge
        raise DataError(f"foundation.model: {model} not found; give a MACE .model file or a named foundation")
