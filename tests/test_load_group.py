"""``load_group``: one group's preset, typed, as a run would see it (benches use it)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from privimage import compose, group_options, load_group, load_run_config
from privimage.config.schema import Config, DataConfig
from privimage.config.store import config_dir, save_run_config
from privimage.errors import ConfigError

# Each group with a schema -> its dataclass (the field type of Config).
SCHEMAS = {
    f.name: hint
    for f in dataclasses.fields(Config)
    if dataclasses.is_dataclass(hint := typing.get_type_hints(Config)[f.name])
}
PRESETS = [(group, name) for group in SCHEMAS for name in group_options(group)]


def test_every_group_with_a_schema_has_presets():
    assert SCHEMAS["public"] is DataConfig and SCHEMAS["data"] is DataConfig
    assert {group for group, _ in PRESETS} == set(SCHEMAS)
    assert "tiny28" in group_options("model") and "glyphs" in group_options("public")


@pytest.mark.parametrize(("group", "name"), PRESETS, ids=[f"{g}={n}" for g, n in PRESETS])
def test_a_preset_has_the_values_of_its_yaml_file(group, name):
    loaded = load_group(group, name)
    assert type(loaded) is SCHEMAS[group]
    yaml = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / group / f"{name}.yaml"))
    values = dataclasses.asdict(loaded)
    assert {key: values[key] for key in yaml} == yaml


def test_a_preset_keeps_the_schema_defaults_of_its_field():
    # public's field defaults to the glyphs; keys a preset leaves out keep the field's value.
    assert load_group("public", "glyphs") == Config().public
    assert load_group("model", "tiny28").dropout == Config().model.dropout


def test_a_preset_is_what_compose_gives_for_that_group():
    assert load_group("model", "small32") == compose(["model=small32"]).model


def test_a_missing_preset_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError, match=r"no model preset 'huge'.*tiny28") as err:
        load_group("model", "huge")
    assert "\n" not in str(err.value)


def test_a_group_without_a_schema_is_refused():
    with pytest.raises(ConfigError, match=r"no config group 'experiment'.*'model'"):
        load_group("experiment", "demo")


def test_a_preset_that_does_not_fit_its_schema_names_its_file(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bad.yaml").write_text("layers_per_block: 1\nbogus: 3\n")
    monkeypatch.setenv("PRIVIMAGE_CONF", str(tmp_path))
    with pytest.raises(ConfigError, match=r"bad\.yaml: .*bogus") as err:
        load_group("model", "bad")
    assert "\n" not in str(err.value)


def test_a_run_folder_gives_back_the_config_it_ran_with(tmp_path):
    cfg = compose(["experiment=smoke", "sample.images_per_class=3"])
    save_run_config(cfg, tmp_path)  # as run_pipeline does at the start of every run
    assert load_run_config(tmp_path) == cfg
    changed = load_run_config(tmp_path, ["sample.batch_size=8"])
    assert changed.sample.batch_size == 8 and changed.sample.images_per_class == 3
    with pytest.raises(ConfigError, match="has no config.yaml or .hydra/config.yaml"):
        load_run_config(tmp_path / "empty")


def test_hydras_copy_serves_when_the_run_folder_has_none(tmp_path):
    cfg = compose(["experiment=smoke", "sample.images_per_class=3"])
    other = compose(["experiment=smoke", "sample.images_per_class=5"])
    save_run_config(cfg, tmp_path / ".hydra")  # Hydra's copy has the same file name
    assert load_run_config(tmp_path) == cfg
    # Both: the pipeline's own (resolved) copy wins.
    save_run_config(other, tmp_path)
    assert load_run_config(tmp_path).sample.images_per_class == 5
    (tmp_path / "config.yaml").write_text("sample: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yaml: "):
        load_run_config(tmp_path)
