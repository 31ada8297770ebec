"""Flags, YAML and validation: fast, in-process (no torch needed)."""
import pytest
import yaml

from distributed_step.config import ConfigError, TrainConfig, build_parser, parse_args, save_yaml


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"lr": "1e-3", "global-batch-size": 32, "sync_bn": True, "epochs": 3}))
    cfg = parse_args(["--config", str(cfg_file), "--global-batch-size", "64"])
    assert cfg.lr == pytest.approx(1e-3)      # YAML's "1e-3" string is cast to float
    assert cfg.global_batch_size == 64        # the flag wins over the file
    assert cfg.sync_bn is True and cfg.epochs == 3
    assert cfg.momentum == 0.9                # untouched default


@pytest.mark.parametrize("content, fragment", [
    ({"learning_rate": 0.1}, "unknown key 'learning_rate'"),
    ({"sync_bn": "yes"}, "sync_bn: expected bool"),
    ({"steps": "many"}, "steps: expected int"),
    ({"steps": True}, "steps: expected int, got True"),
    ({"out": None}, "out: expected str, got null"),
    ({"lr": False}, "lr: expected float"),
])
def test_bad_yaml_names_the_key(tmp_path, content, fragment):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=fragment):
        parse_args(["--config", str(cfg_file)])


@pytest.mark.parametrize("overrides, world, flag", [
    ({"global_batch_size": 15}, 2, "--global-batch-size 15 is not divisible by the world size 2"),
    ({"global_batch_size": 16, "grad_accum": 3}, 2, "--grad-accum 3"),
    ({"data": "mnist"}, 1, "--data 'mnist'"),
    ({"data": "imagefolder"}, 1, "--data imagefolder needs a directory"),
    ({"precision": "fp8"}, 1, "--precision 'fp8'"),
    ({"resume": "/no/such.pt"}, 1, "--resume /no/such.pt"),
    ({"weights": "/no/such.pt"}, 1, "--weights /no/such.pt"),
    ({"momentum": 1.0}, 1, "--momentum"),
    ({"global_batch_size": 16, "grad_accum": 8}, 2, "--grad-accum 8: micro-batches of 1 sample"),
])
def test_validate_names_the_flag(overrides, world, flag):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**overrides).validate(world)
    assert flag in str(err.value)


def test_steps_and_epochs_together_is_an_error():
    with pytest.raises(ConfigError, match="--steps or --epochs"):
        parse_args(["--steps", "3", "--epochs", "2"])


def test_unknown_flag_is_one_line_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--learning-rate", "0.1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--learning-rate" in err


def test_every_field_has_a_flag_and_help_but_debug_flags_stay_hidden():
    help_text = build_parser().format_help()
    for name, f in TrainConfig.__dataclass_fields__.items():
        flag = "--" + name.replace("_", "-")
        assert (flag not in help_text) if f.metadata["debug"] else (flag in help_text), flag
    assert "--fail-once-at-step" not in help_text
    assert parse_args(["--fail-once-at-step", "5"]).fail_once_at_step == 5  # hidden, not gone


def test_epochs_flag_wins_over_yaml_steps_and_run_facts_are_ignored(tmp_path):
    cfg_file = tmp_path / "config.yaml"  # as a run directory writes it, with every run fact
    save_yaml(TrainConfig(steps=100), str(cfg_file), {"world_size": 4, "numerics": {"tf32": False},
                                                     "comm_hook_chosen": "bf16", "link": {"hook": "bf16"}})
    assert parse_args(["--config", str(cfg_file)]).steps == 100
    cfg = parse_args(["--config", str(cfg_file), "--epochs", "3"])
    assert cfg.steps == 0 and cfg.epochs == 3


def test_broken_yaml_is_one_line_with_the_place(tmp_path):
    cfg_file = tmp_path / "broken.yaml"
    cfg_file.write_text("lr: 0.1\nsteps: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(cfg_file)])
    message = str(err.value)
    assert message.startswith(f"--config {cfg_file}: not valid YAML at line") and "\n" not in message


def test_yaml_cannot_construct_objects(tmp_path):
    cfg_file = tmp_path / "evil.yaml"
    marker = tmp_path / "ran"
    cfg_file.write_text(f"out: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(["--config", str(cfg_file)])
    assert not marker.exists()


def test_the_platforms_metrics_port_sits_below_yaml_and_flags(tmp_path, monkeypatch):
    """$DS_METRICS_PORT (set by k8s/components/prometheus for every container) turns the
    endpoint on; a --config key or a flag still wins, and a non-number names the variable."""
    monkeypatch.setenv("DS_METRICS_PORT", "9500")
    assert parse_args([]).metrics_port == 9500
    cfg = tmp_path / "c.yaml"
    cfg.write_text("metrics_port: 9600\n")
    assert parse_args(["--config", str(cfg)]).metrics_port == 9600
    assert parse_args(["--config", str(cfg), "--metrics-port", "0"]).metrics_port == 0
    monkeypatch.setenv("DS_METRICS_PORT", "metrics")
    with pytest.raises(ConfigError, match=r"\$DS_METRICS_PORT='metrics': expected int \(it sets --metrics-port\)"):
        parse_args([])
