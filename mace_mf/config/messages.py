"""What a user reads about the recipe: one-line validation errors and the generated reference.

Both walk the schema's pydantic fields (:mod:`mace_mf.config.schema`), so an error names the dotted
key, what is wrong, the expected type and default, and a did-you-mean for a misspelt key; and the
README's recipe reference is the same fields' types, defaults and descriptions.
"""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from mace_mf.config.schema import FidelitySpec, Recipe

# Names users bring from mace_run_train flags, mapped to ours, for did-you-mean hints.
FAMILIAR_NAMES = {
    "learning_rate": "lr",
    "max_num_epochs": "epochs",
    "ema": "ema_decay",
    "default_dtype": "dtype",
    "foundation_model": "foundation",
    "clip_grad": "clip_grad_norm",
    "patience": "early_stopping_patience",
    "valid_file": "valid",
    "train_file": "train",
    "test_file": "test",
}


_LOC_TAGS = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|\[key\])$")


def _key_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(part for part in loc if not (isinstance(part, str) and _LOC_TAGS.match(part)))


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _suggest(loc: tuple[Any, ...]) -> str:
    """A did-you-mean for an unknown key, drawn from the fields of the section it sits in."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            # Inside a mapping (fidelities.<name>): the value type is the next model.
            if model is Recipe:
                return ""
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif _optional_model(annotation) is not None:
            model = _optional_model(annotation)  # type: ignore[assignment]
        elif str(part) == "fidelities":
            model = FidelitySpec
    familiar = FAMILIAR_NAMES.get(str(loc[-1]))
    if familiar in model.model_fields:
        return f" (did you mean {familiar!r}?)"
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(model.model_fields)})"


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line for the first problem: file, dotted key, what is wrong and how to fix it."""
    errors = error.errors()
    # A misspelt key also makes the intended one "missing": name the misspelling, with a did-you-mean.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = _key_path(tuple(first["loc"]))
    key = _dotted(loc)
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}{_suggest(loc)}"
    if first["type"] == "missing":
        return f"{source}: missing required key {key!r}; add it (every key: `mace-mf recipe reference`)"
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = "" if isinstance(given, dict | list) or given is None else f" (got {given!r})"
    return f"{source}: {key + ': ' if key else ''}{message}{shown}{_expected(loc)}"


def _field_at(loc: tuple[Any, ...]) -> Any:
    """The pydantic field a validation error's location points at, or None (mapping entries, unions)."""
    model: type[BaseModel] = Recipe
    field = None
    parts = [str(p) for p in loc]
    i = 0
    while i < len(parts):
        field = model.model_fields.get(parts[i])
        if field is None:
            return None
        if model is Recipe and parts[i] == "fidelities":
            if len(parts) < 3:
                return field
            model, i = FidelitySpec, i + 2
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif i < len(parts) - 1:
            return None  # inside a list or dict value
        i += 1
    return field


def _expected(loc: tuple[Any, ...]) -> str:
    """ "; expected <type> (default <value>)" for a scalar key, so the message says what to write."""
    if len(loc) == 2 and loc[0] == "fidelities":
        return "; expected a mapping such as {energy_key: dft_energy, forces_key: dft_forces}"
    field = _field_at(loc)
    if field is None or (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
        return ""
    if field.is_required():
        default = "required"
    elif field.default_factory is not None:
        default = f"default {field.default_factory()}"
    else:
        default = f"default {'null' if field.default is None else field.default}"
    return f"; expected {_type_name(field.annotation).replace(chr(92), '')} ({default}; see `mace-mf recipe reference`)"


def dotted_key_problem(recipe: Recipe, dotted: str) -> str | None:
    """Why ``dotted`` names no value of ``recipe`` (None when it does): what sweeps check before
    running a single trial, with the same did-you-mean hints as recipe files."""
    model: type[BaseModel] | None = Recipe
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        part = parts[i]
        if model is None:
            return f"{'.'.join(parts[:i])!r} is a value, not a section"
        if model is Recipe and part == "fidelities":
            if i + 1 >= len(parts) or parts[i + 1] not in recipe.fidelities:
                return f"{dotted!r}: give a declared fidelity after `fidelities.` ({', '.join(recipe.fidelities)})"
            model, i = FidelitySpec, i + 2
            continue
        field = model.model_fields.get(part)
        if field is None:
            return f"unknown key {dotted!r}{_suggest(tuple(parts[: i + 1]))}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif str(annotation).startswith("dict[") and i + 2 == len(parts):
            return None  # one entry of a mapping such as training.lr_factors.readouts
        else:
            model = None
        i += 1
    if model is not None:
        return f"{dotted!r} is a section; name one of its keys ({', '.join(model.model_fields)})"
    return None


def reference_markdown() -> str:
    """The recipe reference (every key, type, default, meaning) generated from the schema."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            key = f"{prefix}{name}"
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{key}.")
                continue
            optional_model = _optional_model(annotation)
            if optional_model is not None:
                doc = (field.description or "").replace("|", "\\|")
                lines.append(f"| `{key}` | {optional_model.__name__} \\| null | `null` | {doc} |")
                walk(optional_model, f"{key}.")
                continue
            if name == "fidelities" and model is Recipe:
                walk(FidelitySpec, f"{key}.<name>.")
                continue
            type_name = _type_name(annotation)
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = f"`{field.default_factory()}`"
            else:
                default = f"`{field.default}`" if field.default is not None else "`null`"
            doc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | {type_name} | {default} | {doc} |")

    walk(Recipe, "")
    return "\n".join(lines)


def _optional_model(annotation: Any) -> type[BaseModel] | None:
    """The model of an optional section (``LabelSpec | None``), else None."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
        return members[0]
    return None


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "null")
    text = text.replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")
