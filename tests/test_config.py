import dataclasses
import datetime

import pytest

from m2das import config


def paper_cfg(runs_dir, **overrides):
    return dataclasses.replace(config.parse_args(["--runs_dir", str(runs_dir), "--data_path", "data"]), **overrides)


def test_run_name_is_what_the_published_runtime_parses(tmp_path):
    name = config.run_name(paper_cfg(tmp_path), 4, datetime.date(2024, 2, 13))
    model, sizes, date, short = name.split("-")
    assert (model, sizes, date) == ("m2d_as_vit_base", "80x608p16x16p16k", "240213")
    assert short.startswith("M2DASe300b2048s3")


def test_a_rerun_without_output_dir_finds_the_unfinished_run(tmp_path):
    cfg = paper_cfg(tmp_path)
    earlier = tmp_path / config.run_name(cfg, 4, datetime.date(2024, 2, 13))
    earlier.mkdir()
    assert config.default_output_dir(cfg, 4) == earlier  # not a new folder dated today
    # Another configuration never picks it up.
    assert config.default_output_dir(paper_cfg(tmp_path, seed=4), 4) != earlier
    # Once finished, a rerun starts a new dated folder.
    (earlier / "checkpoint-300.pth").write_bytes(b"")
    assert config.default_output_dir(cfg, 4) == tmp_path / config.run_name(cfg, 4)


def test_only_training_relevant_flags_make_a_different_run():
    a = config.parse_args([])
    b = config.parse_args(["--num_workers", "2", "--log_every", "5", "--data_path", "/fast/copy"])
    assert config.config_differences(a, b) == ([], [])
    assert config.config_differences(a, config.parse_args(["--epochs", "100"])) == (["epochs: 300 -> 100"], [])
    # The cures for a diverged run may change on resume (on purpose, with --output_dir).
    assert config.config_differences(a, config.parse_args(["--blr", "1e-4", "--bf16"])) == \
        ([], ["blr: 0.0003 -> 0.0001", "bf16: False -> True"])


def test_the_configuration_is_a_frozen_dataclass_of_the_parsers_flags():
    cfg = config.parse_args(["--batch_size", "64"])
    assert cfg.batch_size == 64 and cfg.csv_main == "data/files_as_weighted.csv"
    with pytest.raises(AttributeError):
        cfg.batch_sise  # a typo fails where it is read, not silently
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 32
    dests = [a.dest for a in config.build_parser()._actions if a.dest != "help"]
    assert [f.name for f in dataclasses.fields(config.TrainConfig)] == dests  # config.json keeps its keys and order
    assert list(cfg.asdict()) == dests


@pytest.mark.parametrize("given, canonical", [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"),
                                              ("cuda:1", "cuda:1"), ("gpu", "cuda"), ("GPU", "cuda")])
def test_one_device_parser(given, canonical):
    assert config.parse_args(["--device", given]).device == canonical


def test_an_unknown_device_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_args(["--device", "tpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "'tpu'" in err and "cuda:N" in err


def test_a_negative_verify_shards_is_refused_not_read_as_0(capsys):
    from m2das.runfolder import EXIT_BAD_INPUT

    assert config.parse_args(["--verify_shards", "3"]).verify_shards == 3
    with pytest.raises(SystemExit) as e:
        config.parse_args(["--verify_shards", "-1"])
    err = capsys.readouterr().err
    assert e.value.code == EXIT_BAD_INPUT and len(err.strip().splitlines()) == 1, err
    assert "--verify_shards" in err and "0 or more, got -1" in err, err


@pytest.mark.parametrize("flag,bad,want", [("--epochs", "0", "1 or more, got 0"), ("--batch_size", "-4", "0 or more"),
                                           ("--accum_iter", "0", "1 or more"), ("--save_freq", "0", "1 or more"),
                                           ("--log_every", "0", "1 or more"), ("--keep_epochs", "-1", "0 or more"),
                                           ("--num_workers", "-2", "0 or more"), ("--stats_files", "-5", "0 or more"),
                                           ("--batch_size", "many", "a whole number")])
def test_counting_flags_refuse_what_would_fail_hours_later(flag, bad, want, capsys):
    """--save_freq 0 divided by zero at the first epoch's end, --log_every 0 at the first step; a negative
    worker or file count was taken as is. Each is now the flag's one-line usage error, before any work."""
    from m2das.runfolder import EXIT_BAD_INPUT

    with pytest.raises(SystemExit) as e:
        config.parse_args([flag, bad])
    err = capsys.readouterr().err
    assert e.value.code == EXIT_BAD_INPUT and len(err.strip().splitlines()) == 1, err
    assert flag in err and want in err, err
    assert config.parse_args([flag, "1"]) is not None  # the smallest value that works is taken
