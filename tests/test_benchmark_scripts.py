"""benchmarks/gpu_check.py at toy sizes on CPU, and bench_scale's formulas."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(
    name, ROOT / "benchmarks" / f"{name}.py"
  )
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_gpu_check_runs_tiny_and_writes_its_section(tmp_path):
  out = tmp_path / "gpu.json"
  page = tmp_path / "page.md"
  page.write_text("# Benchmarks\n\n## GPU check\n\nnot run\n\n## After\n\nkept\n")
  proc = subprocess.run(
    [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--json", str(out),
     "--write", str(page)],
    cwd=ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["tiny"] and r["matmul_flops_per_s"] > 0
  assert set(r["step_s"]) == {"muon", "namo_d", "normuon", "optax.contrib.muon"}
  assert all(v > 0 for v in r["step_s"].values())
  assert r["step_over_optax"]["optax.contrib.muon"] == 1.0
  for v in r["newton_schulz"].values():
    assert v["flops_per_s"] > 0 and v["of_matmul"] > 0
  text = page.read_text()
  assert "not run" not in text and "## After\n\nkept" in text
  assert f"**{r['device']}**" in text


def test_bench_scale_trees_and_specs():
  bench = _load("bench_scale")
  llama = bench.leaves("llama3-8b")
  matrices = sum(math.prod(s) for s, a in llama.values() if a)
  assert 6.9e9 < matrices < 7.0e9  # Llama-3-8B without embeddings and head
  moe = bench.leaves("mixtral-8x7b")
  assert moe["w1"] == ((32, 8, 4096, 14336), (2, 3))
  # Fan-in over fsdp; fan-out over model on the 2-D mesh.
  assert bench.spec_for((32, 4096, 14336), (1, 2), "fsdp", 64) == (None, "fsdp", None)
  assert bench.spec_for((32, 4096, 14336), (1, 2), "fsdp_tp", 64) == (
    None,
    "fsdp",
    "model",
  )
  # 1600 does not divide over 1024 devices: the other axes are tried.
  assert bench.spec_for((48, 1600, 6400), (1, 2), "fsdp", 1024) == (None, None, None)
  assert bench.spec_for((48, 1600, 6400), (1, 2), "fsdp", 256) == (None, None, "fsdp")


def test_bench_scale_owner_minimum():
  bench = _load("bench_scale")
  m8 = bench.owner_minimum_bytes("llama3-8b", 8, "fsdp")
  ns_bytes = 2 * sum(math.prod(s) for s, a in bench.leaves("llama3-8b").values() if a)
  assert m8["split"] == 0  # every group's count divides 8
  assert m8["owner"] == pytest.approx(2 * 7 / 8 * ns_bytes / 8)
  m64 = bench.owner_minimum_bytes("llama3-8b", 64, "fsdp")
  assert m64["plans"]["14336x4096"]["g"] == 2 and m64["split"] > 0


def test_bench_scale_report_renders():
  bench = _load("bench_scale")
  minimum = bench.owner_minimum_bytes("llama3-8b", 8, "fsdp")
  cell = {
    "flops": 2.0, "ideal_flops": 1.9, "bytes_accessed": 1e9, "moved_bytes": 3e9,
    "collectives": {"collective-permute": 0}, "temp_bytes": 2**30,
    "adamw_state_bytes": 2**31, "param_bytes": 16e9, "compile_s": 3.0,
    "devices": 8, "minimum": minimum, "machine": "test",
  }  # fmt: skip
  results = {
    "llama3-8b/8/fsdp/muon": cell,
    "llama3-8b/8/fsdp/optax_muon": dict(cell, compile_s=1.5, minimum=None),
    "llama3-8b/64/fsdp/muon": {"timeout": 360},
  }
  text = bench.report(results)
  assert text.startswith(bench.BEGIN) and text.endswith(bench.END)
  assert "| llama3-8b | 8 | 8 | 1.053 |" in text
  assert "| llama3-8b | 64 | 64 | > 360 s |" in text
  hw = bench.HARDWARE["H100 SXM"]
  assert bench.roofline(cell, hw) == pytest.approx(
    max(2.0 / hw["flops"], 1e9 / hw["hbm"]) + 3e9 / hw["link_in_node"]
  )


@pytest.mark.slow
def test_bench_scale_normuon_moves_results_back_without_gathers(tmp_path):
  """NorMuon on the Mixtral-shaped tree, 64 devices, FSDP x TP (AOT): the
  per-neuron statistics must not make the compiler gather the owners'
  results whole (it did: 2.3x muon's bytes and 4x its temporary memory)."""
  results = tmp_path / "scale.json"
  proc = subprocess.run(
    [sys.executable, "benchmarks/bench_scale.py", "--models", "mixtral-8x7b",
     "--devices", "64", "--layouts", "fsdp_tp", "--optimizers", "muon", "normuon",
     "--limit", "600", "--results", str(results)],
    cwd=ROOT, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  cells = json.loads(results.read_text())
  muon = cells["mixtral-8x7b/64/fsdp_tp/muon"]
  normuon = cells["mixtral-8x7b/64/fsdp_tp/normuon"]
  assert "flops" in normuon, normuon
  assert normuon["moved_by_kind"]["all-gather"] <= 0.01 * muon["moved_bytes"]
  assert normuon["moved_bytes"] <= 1.05 * muon["moved_bytes"]
  assert normuon["temp_bytes"] <= 1.1 * muon["temp_bytes"]
