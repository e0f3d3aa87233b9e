"""The CPU kernel level a regression check runs at (invarbench.kernels and `invarbench check`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from invarbench import cli
from invarbench.kernels import entry_levels, kernel_environment, level_groups, recorded_level


def test_the_level_is_read_from_the_recorded_cpu():
    assert recorded_level("AMD EPYC (AVX2)") == "AVX2"
    assert recorded_level("Intel(R) Xeon(R) Processor (AVX512)") == "AVX512"
    assert recorded_level(None) is None
    assert recorded_level("Apple M2 (NEON)") is None  # not a level these variables can set
    with pytest.raises(ValueError, match="unknown kernel level 'SSE9'"):
        kernel_environment("SSE9")


def test_entries_without_a_level_go_with_the_one_level_recorded(tmp_path):
    def entry(stem, model, cpu=None, device="cpu"):
        machine = {"cpu": cpu, "threads": 1} if cpu else None
        (tmp_path / f"{stem}.json").write_text(json.dumps({"model": model, "device": device, "machine": machine}))

    entry("a__mnist__perturbation", "a", "AMD EPYC (AVX2)")
    entry("b__mnist__perturbation", "b")
    entry("c__mnist__invariance", "c", "Intel Xeon (AVX512)")
    entry("d__mnist__invariance", "d", "AMD EPYC (AVX2)", device="cuda:0")
    assert entry_levels(tmp_path, ["a", "d__mnist__invariance"]) == {
        "a__mnist__perturbation": "AVX2",
        "d__mnist__invariance": None,
    }
    assert level_groups(entry_levels(tmp_path, ["a", "b"])) == {
        "AVX2": ["a__mnist__perturbation", "b__mnist__perturbation"]
    }
    assert level_groups(entry_levels(tmp_path, ["b", "d"])) == {
        None: ["b__mnist__perturbation", "d__mnist__invariance"]
    }
    assert level_groups(entry_levels(tmp_path)) == {
        "AVX2": ["a__mnist__perturbation"],
        None: ["b__mnist__perturbation", "d__mnist__invariance"],
        "AVX512": ["c__mnist__invariance"],
    }


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="needs an x86 CPU with AVX2"
)
def test_torch_runs_at_the_level_the_variables_ask_for():
    code = "import torch; x = torch.ones(64); (x * 2).sum(); print(torch.backends.cpu.get_cpu_capability())"
    env = {**os.environ, **kernel_environment("AVX2")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "AVX2"


def test_entries_of_two_levels_are_checked_in_one_child_process_each(tmp_path, monkeypatch, capsys):
    for stem, cpu in (("a__mnist__perturbation", "AMD EPYC (AVX2)"), ("b__mnist__perturbation", "Xeon (AVX512)")):
        (tmp_path / f"{stem}.json").write_text(json.dumps({"model": stem[0], "machine": {"cpu": cpu}}))
    calls = []

    def run(command, env, check):
        calls.append((command, {name: env.get(name) for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}))
        return subprocess.CompletedProcess(command, 1 if "a__mnist__perturbation" in command else 0)

    monkeypatch.setattr(cli.subprocess, "run", run)
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh `invarbench check`, where torch is not loaded yet
    try:
        assert cli.main(["check", "--entries", str(tmp_path), "--points", "20"]) == 1  # the worst child's exit
    finally:
        sys.modules["torch"] = torch
    assert [(command[-6:], env) for command, env in calls] == [
        (
            ["check", "a__mnist__perturbation", "--entries", str(tmp_path), "--points", "20"],
            {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
        ),
        (
            ["check", "b__mnist__perturbation", "--entries", str(tmp_path), "--points", "20"],
            {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
        ),
    ]
    assert "checking 1 entries with AVX2's kernels" in capsys.readouterr().out
