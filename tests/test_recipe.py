"""The recipe schema: the contract validates, mistakes get one line naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support import CONTRACT

from mace_mf.config.loading import dump_recipe, load_recipe
from mace_mf.config.messages import reference_markdown
from mace_mf.config.schema import TIED_STRENGTH, Recipe
from mace_mf.errors import RecipeError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_contract_recipe_validates_and_resolves_paths_against_its_folder(tmp_path):
    recipe = load_recipe(write(tmp_path, CONTRACT))
    assert recipe.target == "dft"
    assert list(recipe.fidelities) == ["pm6", "dft"]
    assert recipe.fidelities["dft"].forces_weight == 0.0
    assert recipe.foundation.model == str((tmp_path / "../shared/models/spice_small_2022.model").resolve())
    assert recipe.data.test == str((tmp_path / "../shared/data/pyseqm_chno/test.xyz").resolve())
    assert recipe.export_fidelities == ["dft", "pm6"]


def test_dump_round_trips_with_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, CONTRACT))
    again = Recipe.model_validate(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe
    assert "ema_decay" in dump_recipe(recipe)


def test_set_overrides_nested_keys_with_yaml_values(tmp_path):
    recipe = load_recipe(write(tmp_path, CONTRACT), ["training.lr=5e-4", "fidelities.dft.label_fraction=0.2"])
    assert recipe.training.lr == 5e-4
    assert recipe.fidelities["dft"].label_fraction == 0.2


@pytest.mark.parametrize(
    "edit,expected",
    [
        (("training: {epochs: 30", "training: {epohcs: 30"), "unknown key 'training.epohcs' (did you mean 'epochs'?)"),
        (("energy_weight: 10.0", "energy_wieght: 10.0"), "did you mean 'energy_weight'?"),
        (("epochs: 30", "epochs: many"), "training.epochs: Input should be a valid integer"),
        (("lr: 0.001", "lr: -1"), "training.lr: Input should be greater than 0"),
        (("target: dft", "target: ccsdt"), "training.target 'ccsdt' is not a declared fidelity"),
        (("fidelities: [dft, pm6]", "fidelities: [dft, mp2]"), "export.fidelities: 'mp2' is not a declared fidelity"),
        (("dtype: float64", "dtype: float16"), "dtype: Input should be 'auto', 'float32' or 'float64'"),
        (("device: cpu", "device: gpu0"), "device: 'gpu0' is not a device"),
        (("mode: disabled", "mode: sometimes"), "wandb.mode: Input should be"),
        (("forces_weight: 0.0}", "forces_weight: 0.0, base: null, coupling: delta}"), "dft: coupling 'delta'"),
        (("forces_weight: 0.0}", "forces_weight: 0.0, base: dft}"), "fidelities.dft.base: 'dft' must be another"),
        (("forces_weight: 0.0}", "forces_weight: 0.0, base: xtb}"), "fidelities.dft.base: 'xtb' must be another"),
        (("forces_weight: 0.0}", "forces_weight: 0.0, coupling: glued}"), "fidelities.dft.coupling: Input should be"),
    ],
)
def test_mistakes_are_one_line_naming_the_key(tmp_path, edit, expected):
    path = write(tmp_path, CONTRACT.replace(*edit))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(RecipeError, match=r"line \d+.*malformed YAML"):
        load_recipe(write(tmp_path, CONTRACT.replace("seed: 0", "seed: [0")))


def test_missing_file_and_missing_section(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="missing required key 'data'"):
        load_recipe(write(tmp_path, CONTRACT.split("data:")[0]))


def test_duplicate_fidelity_names_are_refused(tmp_path):
    text = CONTRACT.replace("  dft: {energy_key: dft_energy", "  pm6: {energy_key: dft_energy")
    with pytest.raises(RecipeError, match="duplicate key 'pm6'"):
        load_recipe(write(tmp_path, text))


def test_fidelity_without_any_key_is_refused(tmp_path):
    text = CONTRACT.replace("pm6: {energy_key: pm6_energy, forces_key: pm6_forces,", "pm6: {")
    with pytest.raises(RecipeError, match="fidelity 'pm6' has neither energy_key nor forces_key"):
        load_recipe(write(tmp_path, text))


def test_reference_lists_every_key():
    reference = reference_markdown()
    for key in (
        "`fidelities.<name>.forces_weight`",
        "`training.freeze_backbone_epochs`",
        "`data.valid_fraction`",
        "`export.torchscript`",
        "`wandb.mode`",
        "`foundation.head`",
        "`fidelities.<name>.label_fraction`",
    ):
        assert key in reference


def test_readme_reference_matches_the_schema():
    from support import ROOT

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- recipe-reference:start -->")[1].split("<!-- recipe-reference:end -->")[0]
    assert block.strip() == reference_markdown().strip(), "regenerate with `mace-mf recipe reference`"


def test_base_cycles_are_refused(tmp_path):
    text = CONTRACT.replace("forces_weight: 0.0}", "forces_weight: 0.0, base: pm6}").replace(
        "forces_weight: 10.0}", "forces_weight: 10.0, base: dft}"
    )
    with pytest.raises(RecipeError, match="cycle pm6 -> dft -> pm6"):
        load_recipe(write(tmp_path, text))


def test_labelled_fidelity_defaults_its_keys_and_resolves_model_paths(tmp_path):
    text = CONTRACT.replace(
        "pm6: {energy_key: pm6_energy, forces_key: pm6_forces,",
        "xtb: {labels: {calculator: gfn2-xtb, kwargs: {accuracy: 0.5}}, forces_key: null,",
    ).replace(
        "dft: {energy_key: dft_energy",
        "fm: {labels: {calculator: 'mace:models/f.model:dft'}}\n  dft: {energy_key: dft_energy",
    )
    text = text.replace("fidelities: [dft, pm6]", "fidelities: [dft, xtb]")
    recipe = load_recipe(write(tmp_path, text))
    xtb, fm = recipe.fidelities["xtb"], recipe.fidelities["fm"]
    assert (xtb.energy_key, xtb.forces_key) == ("xtb_energy", None)  # an explicit null stays null
    assert (fm.energy_key, fm.forces_key) == ("fm_energy", "fm_forces")
    assert xtb.labels.kwargs == {"accuracy": 0.5} and xtb.labels.splits == ["train", "valid", "test"]
    assert fm.labels.calculator == f"mace:{(tmp_path / 'models/f.model').resolve()}:dft"
    assert Recipe.model_validate(yaml.safe_load(dump_recipe(recipe))) == recipe
    misspelt = text.replace("calculator: gfn2-xtb", "calculater: gfn2-xtb")
    with pytest.raises(
        RecipeError, match=r"unknown key 'fidelities.xtb.labels.calculater' \(did you mean 'calculator'"
    ):
        load_recipe(write(tmp_path, misspelt))
    assert "`fidelities.<name>.labels.calculator`" in reference_markdown()


def test_base_auto_leans_a_head_without_trained_forces_on_one_with():
    recipe = load_recipe_text(CONTRACT)
    assert recipe.fidelities["dft"].base == "pm6" and recipe.fidelities["dft"].coupling == "tied"
    # the strength left at null resolves per coupling, and the resolved recipe records the number
    dft, pm6 = recipe.fidelities["dft"], recipe.fidelities["pm6"]
    assert dft.coupling_strength == TIED_STRENGTH and pm6.coupling_strength == 0
    assert load_recipe_text(CONTRACT, ["fidelities.dft.coupling=delta"]).fidelities["dft"].coupling_strength == 0
    assert load_recipe_text(CONTRACT, ["fidelities.dft.coupling_strength=3"]).fidelities["dft"].coupling_strength == 3
    assert recipe.fidelities["pm6"].base is None  # trained on forces: stands on its own
    oracle = load_recipe_text(CONTRACT, ["fidelities.dft.forces_weight=10"])
    assert oracle.fidelities["dft"].base is None
    alone = load_recipe_text(CONTRACT, ["fidelities.pm6.forces_weight=0"])
    assert alone.fidelities["dft"].base is None and alone.fidelities["pm6"].base is None
    assert "base: pm6" in dump_recipe(recipe)  # the resolved recipe says what ran


def load_recipe_text(text, overrides=()):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return load_recipe(write(Path(folder), text), list(overrides))
