"""`reproduce.train --print-config` shows the one resolved run config and trains nothing."""
from __future__ import annotations

import json

from reproduce.training import train as train_cli


def test_print_config_shows_the_resolved_overrides(capsys, tmp_path):
    rc = train_cli.main(["--detector", "dino", "--role", "student", "--print-config", "-S", "train.lr=1e-3"])
    cfg = json.loads(capsys.readouterr().out)
    assert rc == 0 and cfg["train"]["lr"] == 0.001 and cfg["detector"] == "dino"
    assert not list(tmp_path.iterdir())


def test_training_without_out_is_a_one_line_error(capsys):
    assert train_cli.main(["--detector", "dino", "--role", "student"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out is required" in err
