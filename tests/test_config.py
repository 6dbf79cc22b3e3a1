import pytest

from stamen import config as C


def test_defaults_are_the_embedded_digits_run():
    cfg = C.load()
    assert (cfg.task.dataset, cfg.federation.clients, cfg.task.model, cfg.strategy.name) == ("digits", 20, "mlp", "fedavg")
    assert cfg.compression.codec == "dense"


@pytest.mark.parametrize("override, key", [
    ("task.alpha=0", "task.alpha"),
    ("task.alpha=-1", "task.alpha"),
    ("federation.fraction_train=0", "federation.fraction_train"),
    ("federation.fraction_train=1.5", "federation.fraction_train"),
    ("task.bogus=1", "task.bogus"),
    ("run.rounds=0", "run.rounds"),
    ("task.optimizer='lbfgs'", "task.optimizer"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load(overrides=[override])


def test_unknown_section_is_named():
    with pytest.raises(C.ConfigError, match="unknown config section 'tsk'"):
        C.validate({"tsk": {"alpha": 1}})


def test_overrides_parse_toml_literals_and_strings():
    cfg = C.load(overrides=["run.seed=7", "task.lr=0.5", "task.dataset=synthetic", "strategy.proximal_mu=1.0"])
    assert cfg.run.seed == 7 and cfg.task.lr == 0.5 and cfg.task.dataset == "synthetic"
    assert cfg.strategy.options() == {"proximal_mu": 1.0}


def test_whole_section_override_replaces_plugin_options(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[strategy]\nname = "fedprox"\nproximal_mu = 1.0\n')
    cfg = C.load(f, ['strategy={name="fedavg"}'])
    assert cfg.strategy.name == "fedavg" and cfg.strategy.options() == {}


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(C.ConfigError, match="section.key"):
        C.load(overrides=["rounds=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nseed=1")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load(bad)
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "missing.toml")


def test_toml_and_flat_round_trips(tmp_path):
    cfg = C.load(overrides=["run.seed=3", "strategy.name=fedprox", "strategy.proximal_mu=0.5", "task.alpha=0.1"])
    f = tmp_path / "c.toml"
    f.write_text(cfg.to_toml())
    assert C.load(f) == cfg
    assert C.from_flat(C.to_flat(cfg)) == cfg
    # Flower's run_config form: a config file plus flattened overrides
    assert C.from_flat({"config-file": str(f), "run.seed": 9}).run.seed == 9
