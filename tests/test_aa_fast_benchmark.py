"""benchmarks/aa_fast_vs_autoattack.py: aa-fast's options on the command line reach the attack, bad ones stop
the run before any model runs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location(
        "aa_fast_vs_autoattack", ROOT / "benchmarks" / "aa_fast_vs_autoattack.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Points:
    def evaluation_subset(self, count):
        return torch.zeros(count, 1, 28, 28), torch.zeros(count, dtype=torch.long)


def test_options_reach_aa_fast_and_are_recorded(monkeypatch, tmp_path):
    module = _module()
    seen = []

    def compare(model_name, threat, images, labels, *, fast_options, **_):
        seen.append(fast_options)
        return {
            "model": model_name,
            "threat": str(threat),
            "aa_fast_options": {**fast_options, "implementation": "stand-in"},
            "autoattack_seconds": 2.0,
            "aa_fast_seconds": 1.0,
            "speedup": 2.0,
            "only_autoattack_broke": [],
        }

    monkeypatch.setattr(module, "compare", compare)
    monkeypatch.setattr(module, "load_dataset", lambda name: _Points())
    monkeypatch.setattr(module, "table", lambda rows: "row")
    out = tmp_path / "aa_fast.json"
    argv = ["aa_fast_vs_autoattack.py", "--n", "4", "--models", "mnist-cnn-pgd-linf-0.3", "--threats", "l2:2.0"]
    argv += ["--option", "restart_decay=0.8", "--option", "square_restarts=1", "--targets", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    assert seen == [{"targets": 2, "restart_decay": 0.8, "square_restarts": 1}]
    assert json.loads(out.read_text())["rows"][0]["aa_fast_options"]["restart_decay"] == 0.8


def test_an_unknown_option_stops_before_any_model_runs(monkeypatch, capsys):
    module = _module()
    monkeypatch.setattr(module, "compare", lambda *args, **kwargs: pytest.fail("a model ran"))
    monkeypatch.setattr(sys, "argv", ["aa_fast_vs_autoattack.py", "--option", "restart_dekay=0.8"])
    with pytest.raises(SystemExit) as stopped:
        module.main()
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "--option" in error and "restart_dekay" in error and "restart_decay" in error
