"""Real clients load our release: SAELens and circuit-tracer reproduce our encodings and
reconstructions (relative error <= 1e-5 against a float64 numpy reference), offline; for every
activation x kind the trainer exports, each loader either reads it exactly or refuses it (a TopK
is never read as a ReLU).

Each client runs in a subprocess of its own Python environment (circuit-tracer 0.5.0 pins
transformers<=4.57.3, which cannot share our test environment):
  ALLSCOPE_SAELENS_PYTHON         default: this Python when it can import sae_lens
  ALLSCOPE_CIRCUIT_TRACER_PYTHON  default: <repo>/.venv-circuit-tracer/bin/python
A missing client skips its test, unless ALLSCOPE_REQUIRE_CLIENTS=1 (CI), where it fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import allscope.release as rel
from allscope.release import ReleaseConfig

from .local_hub import LocalHub
from .reference import ref_clt, ref_decode, ref_encode, rel_err, well_posed_inputs

HERE = Path(__file__).parent / "clients"
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5
D, N = 16, 96


def _client_python(env: str, module: str, venv: str) -> str:
  if os.environ.get(env):
    return os.environ[env]
  if module == "sae_lens" and importlib.util.find_spec("sae_lens") is not None:
    return sys.executable
  candidate = REPO / venv / "bin" / "python"
  if candidate.exists():
    return str(candidate)
  message = f"{module} client environment not found: set {env} or create {candidate}"
  if os.environ.get("ALLSCOPE_REQUIRE_CLIENTS") == "1":
    pytest.fail(message)
  pytest.skip(message)


def _run_client(python: str, script: str, jobs: list, inputs: dict, tmp_path: Path,
                env_extra: dict | None = None):
  jobs_path, in_path, out_path = tmp_path / "jobs.json", tmp_path / "in.npz", tmp_path / "out.npz"
  jobs_path.write_text(json.dumps(jobs))
  np.savez(in_path, **inputs)
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
         "HF_HOME": str(tmp_path / "hf_home"), "WANDB_MODE": "disabled", **(env_extra or {})}
  proc = subprocess.run([python, str(HERE / script), str(jobs_path), str(in_path), str(out_path)],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  with np.load(out_path, allow_pickle=False) as f:
    return report, {k: f[k] for k in f.files}


@pytest.fixture
def release(tmp_path, make_dict, make_clt):
  """One release holding every kind the clients read."""
  dicts = {
      "sae": make_dict("sae", "resid_post", layer=1),
      "sae_relu": make_dict("sae", "attn_out", layer=1, architecture="relu", l0=30.0),
      "sae_topk": make_dict("sae", "mlp_out", layer=1, architecture="topk", k=5, l0=5.0),
      **{f"tc{l}": make_dict("transcoder", layer=l) for l in range(3)},
      **{f"skip{l}": make_dict("transcoder", layer=l, affine=True) for l in range(3)},
      "clt": make_clt(n_layers=3),
      "clt_skip": make_clt(n_layers=3, affine=True),
  }
  names = list(dicts)
  root = rel.write_release(ReleaseConfig(directory=str(tmp_path / "rel"), saelens_format=True,
                                         model_card=False), list(dicts.values()), tmp_path)
  manifest = json.loads((root / "manifest.json").read_text())
  entries = dict(zip(names, manifest["dictionaries"]))
  return root, dicts, entries


def test_saelens_loads_and_reproduces(release, tmp_path, rng):
  python = _client_python("ALLSCOPE_SAELENS_PYTHON", "sae_lens", ".venv-saelens")
  root, dicts, entries = release
  names = ["sae", "sae_relu", "sae_topk", "tc1", "skip1"]
  inputs = {n: well_posed_inputs(rng, [dicts[n].params], N, D) for n in names}
  jobs = [{"name": n, "loader": "load_from_disk", "path": str(root / entries[n]["saelens_path"]),
           "input": n} for n in names]
  report, out = _run_client(python, "saelens_check.py", jobs, inputs, tmp_path)

  expected_class = {"sae": "JumpReLUSAE", "sae_relu": "StandardSAE", "sae_topk": "TopKSAE",
                    "tc1": "JumpReLUTranscoder", "skip1": "JumpReLUSkipTranscoder"}
  errors = {}
  for n in names:
    d = dicts[n]
    f = ref_encode(d.params, inputs[n], d.architecture, d.k)
    y = ref_decode(d.params, f, inputs[n])
    errors[n] = (rel_err(out[f"{n}/features"], f), rel_err(out[f"{n}/reconstruction"], y))
    assert report[n]["class"] == expected_class[n]
    assert np.mean(f != 0) > 0.02  # the comparison covers active latents
  print("saelens relative errors (features, reconstruction):", errors)
  assert max(max(e) for e in errors.values()) <= TOL, errors
  assert report["tc1"]["hf_hook_name"] == "model.layers.1.pre_feedforward_layernorm.output"
  assert report["sae"]["hook_name"] == "blocks.1.hook_resid_post"


def test_saelens_gemma_3_loader_reads_the_release_layout(release, tmp_path, rng):
  """SAELens' own Gemma Scope 2 loader (`from_pretrained(..., converter=gemma_3)`) on our folders,
  served from a loopback Hub endpoint: no SAELens-format copy involved."""
  python = _client_python("ALLSCOPE_SAELENS_PYTHON", "sae_lens", ".venv-saelens")
  root, dicts, entries = release
  repo = "allscope/gemma-scope-2-test"
  jobs, inputs, refs = [], {}, {}
  for n in ("sae", "tc1", "skip1"):
    inputs[n] = well_posed_inputs(rng, [dicts[n].params], N, D)
    jobs.append({"name": n, "loader": "gemma_3_hub", "repo": repo, "folder": entries[n]["path"],
                 "input": n})
    f = ref_encode(dicts[n].params, inputs[n])
    refs[n] = (f, ref_decode(dicts[n].params, f, inputs[n]))
  for n in ("clt", "clt_skip"):
    # Quirk: SAELens reads one CLT layer as a transcoder whose decoder is w_dec summed over all
    # target layers: f_l @ sum_t w_dec[:, t] + b_dec_l (+ x @ skip_l).
    p = dict(dicts[n].layer_params[1])
    p["w_dec"] = p["w_dec"].astype(np.float64).sum(axis=1)
    name = f"{n}_layer1"
    inputs[name] = well_posed_inputs(rng, [p], N, D)
    jobs.append({"name": name, "loader": "gemma_3_hub", "repo": repo,
                 "folder": f"{entries[n]['path']}/params_layer_1", "input": name})
    f = ref_encode(p, inputs[name])
    refs[name] = (f, ref_decode(p, f, inputs[name]))
  with LocalHub(root, repo) as hub:
    env = {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_ENDPOINT": hub.endpoint, "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    report, out = _run_client(python, "saelens_check.py", jobs, inputs, tmp_path, env)
  # SAELens read the safetensors header through HTTP range requests, then downloaded the file
  assert any(r[2] == "bytes=0-7" for r in hub.requests), hub.requests
  errors = {n: (rel_err(out[f"{n}/features"], f), rel_err(out[f"{n}/reconstruction"], y))
            for n, (f, y) in refs.items()}
  print("saelens gemma_3 loader relative errors (features, reconstruction):", errors)
  assert max(max(e) for e in errors.values()) <= TOL, errors
  assert report["skip1"]["class"] == "JumpReLUSkipTranscoder"
  assert report["clt_skip_layer1"]["class"] == "JumpReLUSkipTranscoder"
  assert report["tc1"]["hook_name"] == "blocks.1.hook_mlp_in"


def test_circuit_tracer_loads_and_reproduces(release, tmp_path, rng):
  python = _client_python("ALLSCOPE_CIRCUIT_TRACER_PYTHON", "circuit_tracer", ".venv-circuit-tracer")
  root, dicts, entries = release
  file = lambda n: str(root / entries[n]["path"] / "params.safetensors")
  clt_files = lambda n: [str(root / entries[n]["path"] / f"params_layer_{l}.safetensors")
                         for l in range(3)]
  inputs, jobs, refs = {}, [], {}
  for n in ("tc1", "skip1"):
    inputs[n] = well_posed_inputs(rng, [dicts[n].params], N, D)
    jobs.append({"name": n, "loader": "transcoder", "path": file(n), "layer": 1, "input": n})
    f = ref_encode(dicts[n].params, inputs[n])
    refs[n] = (f, ref_decode(dicts[n].params, f, inputs[n]))
  for set_name, prefix in (("tc_set", "tc"), ("skip_set", "skip")):
    members = [dicts[f"{prefix}{l}"] for l in range(3)]
    x = np.stack([well_posed_inputs(rng, [m.params], N, D) for m in members])
    inputs[set_name] = x
    jobs.append({"name": set_name, "loader": "transcoder_set", "input": set_name,
                 "paths": [file(f"{prefix}{l}") for l in range(3)]})
    fs = [ref_encode(m.params, x[l]) for l, m in enumerate(members)]
    refs[set_name] = (np.stack(fs), np.stack([ref_decode(m.params, fs[l], x[l])
                                              for l, m in enumerate(members)]))
  for n in ("clt", "clt_skip"):
    lp = dicts[n].layer_params
    x = np.stack([well_posed_inputs(rng, [lp[l]], N, D) for l in range(3)])
    inputs[n] = x
    jobs.append({"name": n, "loader": "clt", "paths": clt_files(n), "input": n, "pad_key": True})
    refs[n] = ref_clt(lp, x)
  jobs.append({"name": "clt_as_documented", "loader": "clt", "paths": clt_files("clt"),
               "input": "clt", "pad_key": False, "expect_error": True})
  report, out = _run_client(python, "circuit_tracer_check.py", jobs, inputs, tmp_path)

  errors = {n: (rel_err(out[f"{n}/features"], f), rel_err(out[f"{n}/reconstruction"], y))
            for n, (f, y) in refs.items()}
  print("circuit-tracer relative errors (features, reconstruction):", errors)
  assert max(max(e) for e in errors.values()) <= TOL, errors
  # Quirk: load_gemma_scope_2_clt loads range(max(paths)) layers, one short of a 0..L-1 map.
  assert "error" in report["clt_as_documented"], report["clt_as_documented"]


# Every activation x kind, as the trainer exports them (allscope.trainers.export.release_arrays on
# a train state), through every client that has a loader for it. Dictionaries a client cannot
# represent must make its loader fail; none may load as something else.
ACTIVATIONS = ("jumprelu", "topk", "batchtopk", "relu")
KINDS = ("sae", "transcoder", "skip_transcoder", "clt")
M_LAYERS, M_F = (0, 1, 2), 64


def _trained_release_dictionaries(kind, activation, rng):
  """Release dictionaries of a randomized train state, through the trainer's own export."""
  import jax
  import jax.numpy as jnp

  from allscope.trainers import dictionaries, export, state as state_lib
  from allscope.trainers.config import TrainConfig

  cfg = TrainConfig(kind=kind, activation=activation, layers=M_LAYERS, width=M_F, k=6,
                    capacity=M_F if activation != "topk" else 0)
  params = dictionaries.init_params(cfg, D, D, jax.random.key(int(rng.integers(1 << 30))))
  params = {k: v + 0.05 * jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
            for k, v in params.items()}
  if "log_threshold" in params:
    params["log_threshold"] = jnp.log(jnp.asarray(rng.uniform(0.05, 0.4, (cfg.n_groups, M_F)),
                                                  jnp.float32))
  state = state_lib.init_state(cfg, params, jax.random.key(0)).replace(
      l0=jnp.full((cfg.n_groups,), 6.0), batch_thr=jnp.asarray(rng.uniform(0.1, 0.3, cfg.n_groups),
                                                               jnp.float32))
  site_in, site_out = cfg.sites
  norm = {site_in: rng.uniform(0.5, 2.0, len(M_LAYERS)),
          site_out: rng.uniform(0.5, 2.0, len(M_LAYERS))}
  return rel.from_exported(export.release_arrays(cfg, state, norm))


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
  """{activation: {kind: (dictionaries, manifest entries)}}, one release per activation under
  one base folder (served whole by the loopback Hub)."""
  rng = np.random.default_rng(99)
  base = tmp_path_factory.mktemp("matrix")
  out = {}
  for act in ACTIVATIONS:
    per_kind = {kind: _trained_release_dictionaries(kind, act, rng) for kind in KINDS}
    flat = [d for kind in KINDS for d in per_kind[kind]]
    root = rel.write_release(ReleaseConfig(directory=str(base / act), saelens_format=True,
                                           model_card=False), flat, base)
    entries = iter(json.loads((root / "manifest.json").read_text())["dictionaries"])
    out[act] = {kind: (ds, [next(entries) for _ in ds]) for kind, ds in per_kind.items()}
  return base, out


def _allscope(d, x):
  """allscope's own release math (allscope.release.dictionary), float64."""
  from allscope.release import dictionary as math_
  p = {k: v.astype(np.float64) for k, v in d.params.items()}
  f = math_.encode(p, np.asarray(x, np.float64), d.architecture, d.k)
  return f, math_.decode(p, f, np.asarray(x, np.float64))


def _check(out, refs, what):
  errors = {}
  for n, (f, y) in refs.items():
    assert np.mean(f != 0) > 0.02, (n, "the comparison must cover active latents")
    errors[n] = (rel_err(out[f"{n}/features"], f), rel_err(out[f"{n}/reconstruction"], y))
  print(f"{what} relative errors (features, reconstruction):", errors)
  assert max(max(e) for e in errors.values()) <= TOL, errors


def test_matrix_files_never_hold_a_zero_threshold_for_a_non_relu(matrix):
  """Gemma Scope 2 folders: TopK carries no threshold (a JumpReLU-only reader fails on it),
  BatchTopK carries its positive trained threshold as JumpReLU, ReLU is JumpReLU at exactly 0."""
  import safetensors.numpy

  base, m = matrix
  for act in ACTIVATIONS:
    for kind in KINDS:
      _, entries = m[act][kind]
      for e in entries:
        folder = base / act / e["path"]
        config = json.loads((folder / "config.json").read_text())
        for file in sorted(folder.glob("*.safetensors")):
          tensors = safetensors.numpy.load_file(str(file))
          if act == "topk":
            assert config["architecture"] == "topk" and config["k"] == 6
            assert "threshold" not in tensors, file
            with pytest.raises(KeyError):  # what any JumpReLU-only reader does first
              tensors["threshold"]
          else:
            assert config["architecture"] == "jump_relu", (act, kind)
            thr = tensors["threshold"]
            assert np.all(thr == 0) if act == "relu" else np.all(thr > 0), (act, kind, file)


def test_matrix_saelens_own_format(matrix, tmp_path):
  """SAE.load_from_disk on the saelens/ copies; TopK transcoders get none (SAELens has no class)."""
  python = _client_python("ALLSCOPE_SAELENS_PYTHON", "sae_lens", ".venv-saelens")
  base, m = matrix
  rng = np.random.default_rng(7)
  classes = {"sae": "JumpReLUSAE", "transcoder": "JumpReLUTranscoder",
             "skip_transcoder": "JumpReLUSkipTranscoder"}
  jobs, inputs, refs, want = [], {}, {}, {}
  for act in ACTIVATIONS:
    for kind in ("sae", "transcoder", "skip_transcoder"):
      ds, entries = m[act][kind]
      d, e = ds[1], entries[1]
      name = f"{act}/{kind}"
      if act == "topk" and kind != "sae":
        assert "saelens_path" not in e and "no architecture for a topk" in e["saelens_unsupported"]
        continue
      inputs[name] = well_posed_inputs(rng, [d.params], N, D)
      jobs.append({"name": name, "loader": "load_from_disk",
                   "path": str(base / act / e["saelens_path"]), "input": name})
      refs[name] = _allscope(d, inputs[name])
      want[name] = "TopKSAE" if act == "topk" else classes[kind]
  report, out = _run_client(python, "saelens_check.py", jobs, inputs, tmp_path)
  assert {n: report[n]["class"] for n in want} == want
  _check(out, refs, "saelens load_from_disk")


def test_matrix_saelens_gemma_scope_2_loader(matrix, tmp_path):
  """SAELens' Gemma Scope 2 loader reads every JumpReLU form (JumpReLU, BatchTopK, ReLU) exactly,
  and refuses TopK: by its architecture, and where it reads no config.json (a CLT layer, or a
  folder whose config.json was lost: SAELens then assumes jump_relu) by the missing threshold."""
  import shutil

  python = _client_python("ALLSCOPE_SAELENS_PYTHON", "sae_lens", ".venv-saelens")
  base, m = matrix
  rng = np.random.default_rng(8)
  repo = "allscope/gemma-scope-2-matrix"
  jobs, inputs, refs, refused = [], {}, {}, []
  for act in ACTIVATIONS:
    for kind in KINDS:
      ds, entries = m[act][kind]
      name = f"{act}/{kind}"
      if kind == "clt":  # SAELens quirk 5: one CLT layer, decoder summed over target layers
        d, folder = ds[0], f"{act}/{entries[0]['path']}/params_layer_1"
        p = dict(d.layer_params[1])
        p["w_dec"] = p["w_dec"].sum(axis=1, dtype=np.float64).astype(np.float32)
        d = rel.Dictionary(p, "transcoder", d.architecture, d.model_name, 1, "mlp_in", "mlp_out",
                           k=d.k)
      else:
        d, folder = ds[1], f"{act}/{entries[1]['path']}"
      inputs[name] = well_posed_inputs(rng, [d.params], N, D)
      job = {"name": name, "loader": "gemma_3_hub", "repo": repo, "folder": folder, "input": name}
      if act == "topk":
        job["expect_error"] = True
        if kind != "clt":
          refused.append(name)
      else:
        refs[name] = _allscope(d, inputs[name])
      jobs.append(job)
  # A TopK folder whose config.json was lost: SAELens infers jump_relu from the folder name.
  src = base / "topk" / m["topk"]["transcoder"][1][1]["path"]
  bare = base / "bare" / "transcoder" / src.name
  bare.mkdir(parents=True)
  shutil.copy(src / "params.safetensors", bare / "params.safetensors")
  jobs.append({"name": "topk/no_config", "loader": "gemma_3_hub", "repo": repo,
               "folder": f"bare/transcoder/{src.name}", "input": "topk/transcoder",
               "expect_error": True})
  with LocalHub(base, repo) as hub:
    env = {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_ENDPOINT": hub.endpoint,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    report, out = _run_client(python, "saelens_check.py", jobs, inputs, tmp_path, env)
  for n in refused:
    assert "Unexpected architecture in Gemma 3 config: topk" in report[n]["error"], report[n]
  # No config to refuse by: SAELens never reads a CLT's config.json (it looks for one inside
  # `params_layer_<i>/`) and assumes jump_relu; the missing threshold is what stops it.
  for n in ("topk/clt", "topk/no_config"):
    assert report[n]["error"] == "KeyError: 'threshold'", report[n]
  assert report["batchtopk/skip_transcoder"]["class"] == "JumpReLUSkipTranscoder"
  _check(out, refs, "saelens gemma_3 loader")


def test_matrix_circuit_tracer(matrix, tmp_path):
  """circuit-tracer's Gemma Scope 2 transcoder, transcoder-set and CLT loaders read every JumpReLU
  form exactly; it has no TopK loader (0.5.0), and its JumpReLU loaders fail on a TopK release
  (no threshold) instead of reading it as a ReLU."""
  python = _client_python("ALLSCOPE_CIRCUIT_TRACER_PYTHON", "circuit_tracer",
                          ".venv-circuit-tracer")
  base, m = matrix
  rng = np.random.default_rng(9)
  jobs, inputs, refs, refused = [], {}, {}, []
  for act in ACTIVATIONS:
    for kind in ("transcoder", "skip_transcoder", "clt"):
      ds, entries = m[act][kind]
      if kind == "clt":
        (clt,), folder = ds, base / act / entries[0]["path"]
        name = f"{act}/clt"
        x = np.stack([well_posed_inputs(rng, [p], N, D) for p in clt.layer_params])
        job = {"name": name, "loader": "clt", "input": name, "pad_key": True,
               "paths": [str(folder / f"params_layer_{l}.safetensors") for l in range(3)]}
        from allscope.release import dictionary as math_
        lp = tuple({k: v.astype(np.float64) for k, v in p.items()} for p in clt.layer_params)
        feats, outs = math_.clt_forward(clt, [x[l].astype(np.float64) for l in range(3)],
                                        params=lp)
        ref = (np.stack(feats), np.stack(outs))
        new = [(name, job, x, ref)]
      else:
        files = [str(base / act / e["path"] / "params.safetensors") for e in entries]
        x1 = well_posed_inputs(rng, [ds[1].params], N, D)
        xs = np.stack([well_posed_inputs(rng, [d.params], N, D) for d in ds])
        set_ref = [_allscope(d, xs[l]) for l, d in enumerate(ds)]
        new = [(f"{act}/{kind}", {"loader": "transcoder", "path": files[1], "layer": 1}, x1,
                _allscope(ds[1], x1)),
               (f"{act}/{kind}_set", {"loader": "transcoder_set", "paths": files}, xs,
                (np.stack([f for f, _ in set_ref]), np.stack([y for _, y in set_ref])))]
      for name, job, x, ref in new:
        job = {**job, "name": name, "input": name}
        inputs[name] = x
        if act == "topk":
          job["expect_error"] = True
          refused.append(name)
        else:
          refs[name] = ref
        jobs.append(job)
  report, out = _run_client(python, "circuit_tracer_check.py", jobs, inputs, tmp_path)
  for n in refused:
    assert "KeyError" in report[n]["error"] and "threshold" in report[n]["error"], report[n]
  _check(out, refs, "circuit-tracer")
