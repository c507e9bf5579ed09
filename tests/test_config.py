import datetime

from m2das import config


def paper_cfg(runs_dir, **overrides):
    cfg = config.parse_args(["--runs_dir", str(runs_dir), "--data_path", "data"])
    cfg.update(overrides)
    return cfg


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
