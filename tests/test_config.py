import pytest
from hypothesis import given
from hypothesis import strategies as st

from pocketgpt.config import (
    KEY_SECTION, TrainConfig, normalize_key, build_train_config, list_presets, load_preset, parse_cli_overrides, parse_duration,
)
from pocketgpt.errors import PocketError


def test_every_preset_parses_and_validates():
    names = list_presets()
    assert {"demo", "shakespeare-char"} <= set(names)
    for name in names:
        cfg = build_train_config(preset=name)
        assert cfg.model.n_embd % cfg.model.n_head == 0


def test_precedence_defaults_preset_file_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("n_layer = 3\n[optim]\nlearning_rate = 0.002\n")
    cfg = build_train_config("shakespeare-char", str(f), {"learning_rate": "0.005"})
    assert cfg.model.n_embd == 384  # preset over default
    assert cfg.model.n_layer == 3  # file over preset
    assert cfg.optim.learning_rate == 0.005  # flag over file
    assert cfg.run.eval_iters == 200  # preset value untouched
    assert TrainConfig().run.eval_iters == 20


@pytest.mark.parametrize("key,hint", [("n_layers", "n_layer"), ("learning-rat", "learning_rate"), ("batchsize", "batch_size")])
def test_unknown_key_names_the_nearest(key, hint):
    with pytest.raises(PocketError, match=f"did you mean '{hint}'"):
        build_train_config(None, None, {key: "1"})


@pytest.mark.parametrize("overrides,match", [
    ({"n_layer": "two"}, "must be an integer"),
    ({"learning_rate": "-1"}, "learning_rate must be positive"),
    ({"n_embd": "100", "n_head": "3"}, "divisible by n_head"),
    ({"block_size": "0"}, "block_size must be at least 1"),
    ({"dtype": "fp16"}, "dtype must be one of"),
    ({"compile": "maybe"}, "true, false or auto"),
    ({"dropout": "1.5"}, "dropout"),
    ({"qk_norm_gains": "true"}, "qk_norm_gains = true needs qk_norm = true"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be one of none, llama3, got 'yarn'"),
    ({"rope_scaling": "llama3"}, 'needs pos_emb = "rope"'),
    ({"pos_emb": "rope", "rope_scaling": "llama3", "rope_low_freq_factor": "4"}, "must be positive and below"),
    ({"pos_emb": "rope", "rope_scaling": "llama3", "rope_factor": "0"}, "rope_factor must be positive"),
])
def test_bad_values_are_rejected(overrides, match):
    with pytest.raises(PocketError, match=match):
        build_train_config(None, None, overrides)


def test_config_file_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[model]\nn_layr = 2\n")
    with pytest.raises(PocketError, match="did you mean 'n_layer'"):
        build_train_config(None, str(f))
    f.write_text("[model]\nlearning_rate = 0.1\n")
    with pytest.raises(PocketError, match=r"belongs in \[optim\]"):
        build_train_config(None, str(f))
    f.write_text("n_layer = 'x'\n")
    with pytest.raises(PocketError, match="n_layer.*integer"):
        build_train_config(None, str(f))
    f.write_text("n_layer = = 2\n")
    with pytest.raises(PocketError, match="not valid TOML"):
        build_train_config(None, str(f))
    with pytest.raises(PocketError, match="unknown preset 'dem'.*did you mean 'demo'"):
        load_preset("dem")
    with pytest.raises(PocketError, match="unknown preset 'nope'; presets: .*cpu-15min.*also auto"):
        load_preset("nope")  # auto is no file, but the train command takes it: the list names it


def test_cli_override_forms():
    assert parse_cli_overrides(["--n-layer", "4", "--learning_rate=1e-3", "--compile"]) == {
        "n_layer": "4", "learning_rate": "1e-3", "compile": "true"}
    cfg = build_train_config(None, None, parse_cli_overrides(["--n-layer", "4", "--compile"]))
    assert cfg.model.n_layer == 4 and cfg.run.compile == "true"


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_duration():
    with pytest.raises(PocketError, match="duration"):
        parse_duration("ten minutes")


@given(st.dictionaries(st.text(max_size=12), st.one_of(st.text(max_size=8), st.integers(), st.floats(), st.booleans()),
                       max_size=4))
def test_arbitrary_overrides_either_apply_or_raise_pocket_error(d):
    try:
        cfg = build_train_config(None, None, d)
    except PocketError:
        return
    assert all(normalize_key(k) in KEY_SECTION for k in d)
    assert cfg.model.n_embd % cfg.model.n_head == 0
