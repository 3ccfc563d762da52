"""The `allscope` command.

Every subcommand takes a config (`--config <name or file>`, or a .py file as the first argument)
followed by dotted overrides, e.g. `allscope sample model.dtype=bfloat16 --prompt "Hi"`.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import re
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from allscope.launch import config as config_lib
from allscope.launch import distributed, host_memory


def sample(cfg: config_lib.RunConfig, args: argparse.Namespace) -> None:
  """Prints a greedy continuation, so a user can see that the model loaded right."""
  from allscope import models

  if args.tokens < 1:
    raise config_lib.ConfigError(f"--tokens {args.tokens}: give a number of tokens >= 1")
  arch, tokenizer = models.describe(cfg.model.name)  # metadata only: checks before the load
  prompt = tokenizer.encode(args.prompt, add_bos=True)
  if len(prompt) + args.tokens > arch.max_context:
    raise config_lib.ConfigError(
        f"the prompt ({len(prompt)} tokens) + --tokens {args.tokens} exceeds the model's context "
        f"of {arch.max_context}; lower --tokens")
  print(f"loading {cfg.model.name} ({cfg.model.dtype}) ...", file=sys.stderr)
  start = time.perf_counter()
  model, tokenizer = models.load(cfg.model.name, dtype=cfg.model.dtype)
  print(f"loaded {cfg.model.name} ({cfg.model.dtype}) in {time.perf_counter() - start:.1f}s",
        file=sys.stderr)
  start = time.perf_counter()
  out = models.generate(model, prompt, args.tokens)
  print(args.prompt + tokenizer.decode(out))
  print(f"{args.tokens} tokens in {time.perf_counter() - start:.1f}s", file=sys.stderr)


def harvest(cfg: config_lib.RunConfig, args: argparse.Namespace) -> None:
  from allscope.launch import stages

  layers = ",".join(map(str, cfg.harvest.layers)) or "all"
  print(f"harvest: {', '.join(cfg.harvest.sites)} of layers {layers} of {cfg.model.name}: "
        "checking the inputs, then loading the model in each worker ...", file=sys.stderr)
  manifest = stages.harvest(cfg)
  print(f"activation store: {stages.Paths(Path(cfg.output_dir)).store} "
        f"({manifest.get('num_tokens')} tokens)")
  print(f"next: {_again(args, 'train')}")


def train(cfg: config_lib.RunConfig, args: argparse.Namespace) -> None:
  from allscope.launch import stages

  result = stages.train(cfg)
  if _primary():
    print(f"checkpoints and TensorBoard logs: {stages.Paths(Path(cfg.output_dir)).train}")
    print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items()))
    print(f"curves: tensorboard --logdir {cfg.output_dir}")
    print(f"next: {_again(args, 'evaluate')}")


def evaluate(cfg: config_lib.RunConfig, args: argparse.Namespace) -> None:
  """Evaluates the latest checkpoint (never trains) or, with --release, a release folder."""
  from allscope import release
  from allscope.launch import stages

  dictionaries = release.load(args.release).dictionaries if args.release else None
  output = stages.evaluation_path(cfg, args.release)  # --release: never the run's evaluation.json
  evaluations = stages.evaluate(cfg, dictionaries, allow_partial=args.allow_partial, output=output)
  if _primary():
    _print_metrics(evaluations)
    print(f"metrics: {output}")
    if not args.release:
      print(f"next: {_again(args, 'release')}")


def release_(cfg: config_lib.RunConfig, args: argparse.Namespace) -> None:
  from allscope.launch import stages

  if args.to or args.dry_run:
    cfg = dataclasses.replace(cfg, release=dataclasses.replace(
        cfg.release, publish_to=args.to or cfg.release.publish_to,
        dry_run=args.dry_run or cfg.release.dry_run))
    config_lib.validate(cfg)
  root = stages.release_stage(cfg, allow_partial=args.allow_partial)
  if _primary() and not cfg.release.dry_run:
    print(f"release: {root}  (model card: {root}/README.md)")
    if not cfg.release.publish_to:
      print(f"next: {_again(args, 'release')} --to hf://<org>/<repo>  (or gs://..., a folder)")


def browse(cfg: config_lib.RunConfig, args: argparse.Namespace) -> None:
  from allscope.launch import stages

  release = Path(args.release) if args.release else None
  store = args.store
  if store is None and release is not None and (release.parent / "store" / "manifest.json").exists():
    store = release.parent / "store"  # the run folder layout: <output_dir>/{store,release}
  out = stages.browse(cfg, release, store)
  if out is not None:
    print(f"browser: {out['path']}/index.html ({out['units']} dictionaries, {out['tokens']} tokens "
          f"at {out['tokens_per_s']:.0f} tokens/s, {out['bytes'] / 1e6:.1f} MB)")


def run(cfg: config_lib.RunConfig, args: argparse.Namespace) -> None:
  from allscope.launch import stages

  out = stages.run(cfg)
  if not _primary():
    return
  _print_metrics(out["evaluations"])
  print(f"\nactivation store : {out['store']} ({out['tokens']} tokens)")
  print(f"checkpoints, logs: {out['train']}  (tensorboard --logdir {cfg.output_dir})")
  print(f"release          : {out['release']}  (model card: {out['release']}/README.md)")
  print("stage seconds    : " + ", ".join(f"{k} {v:.0f}" for k, v in out["seconds"].items()))
  print(f"next: {_again(args, 'release')} --to hf://<org>/<repo>  (or gs://..., a folder)")


def launch(cfg: config_lib.RunConfig, args: argparse.Namespace) -> None:
  """Writes a job script that runs `allscope <stage>` on every host of a cluster."""
  from allscope.launch import clusters

  config = str(config_lib.resolve_path(args.config).resolve()) if args.config else None
  overrides = [o for o in args.overrides if not o.startswith("output_dir=")]
  text = clusters.job_script(
      args.cluster, args.stage, config, overrides, output_dir=str(Path(cfg.output_dir).resolve()),
      nodes=args.nodes, gpus_per_node=args.gpus_per_node, tpu_name=args.tpu_name, zone=args.zone)
  path = clusters.write_job_script(text, cfg.output_dir, args.cluster, args.stage)
  print(f"job script: {path}")
  print(f"submit with: {'sbatch' if args.cluster == 'slurm' else 'bash'} {path}")


def _again(args: argparse.Namespace, command: str) -> str:
  """The command line running `command` on the same config and overrides."""
  parts = ["allscope", command] + (["--config", args.config] if args.config else [])
  return " ".join(shlex.quote(p) for p in parts + list(args.overrides))


def _primary() -> bool:
  import jax

  return jax.process_index() == 0


def _print_metrics(evaluations) -> None:
  columns = {"L0": "l0", "FVU": "fvu", "dead": "dead_fraction", "dLM spliced": "delta_lm_loss",
             "dLM stderr": "delta_lm_loss_stderr", "dLM zero-abl": None,
             "loss recov.": "fraction_loss_recovered"}
  if not any("ce_zero_ablation" in e.metrics for e in evaluations):  # evaluate.zero_ablation off
    del columns["dLM zero-abl"], columns["loss recov."]
  print(f"{'dictionary':44s}" + "".join(f"{c:>13s}" for c in columns))
  for e in evaluations:
    m = dict(e.metrics)
    m["dLM zero-abl"] = m.get("ce_zero_ablation", float("nan")) - m.get("ce_clean", float("nan"))
    values = [m.get(key or name, float("nan")) for name, key in columns.items()]
    print(f"{e.path:44s}" + "".join(f"{v:13.4g}" for v in values))
  if evaluations:
    from allscope.launch import stages
    print("tokens: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                 for k, v in stages.token_counts(evaluations).items()))


COMMANDS: dict[str, tuple[Callable, str]] = {
    "sample": (sample, "print a greedy continuation of --prompt"),
    "harvest": (harvest, "capture activations into a sharded store (Apache Beam)"),
    "train": (train, "train dictionaries on the store; resumes from the latest checkpoint"),
    "evaluate": (evaluate, "FVU, L0, dead/dense latents and spliced delta LM loss"),
    "release": (release_, "write (and with --to, publish) the release folder"),
    "browse": (browse, "write the offline feature browser into a release (<release>/browser/)"),
    "run": (run, "harvest, train, evaluate and release in one go"),
    "launch": (launch, "write a multi-host job script (SLURM or Cloud TPU) for a stage"),
}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="allscope", description="Sparse dictionaries on every layer of Gemma 3.")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (_, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", help="config name in configs/ or path to a .py config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dtype=bfloat16")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    if name == "sample":
      p.add_argument("--prompt", default="The capital of France is")
      p.add_argument("--tokens", type=int, default=16, help="tokens to generate")
    if name == "evaluate":
      p.add_argument("--release", help="evaluate this release folder instead of the checkpoint")
    if name in ("evaluate", "release"):
      p.add_argument("--allow-partial", action="store_true",
                     help="use the latest checkpoint of an unfinished run (else: stop and say so)")
    if name == "launch":
      p.add_argument("--stage", default="run", help="harvest, train, evaluate, release or run")
      p.add_argument("--cluster", default="slurm", choices=("slurm", "tpu"))
      p.add_argument("--nodes", type=int, default=1, help="hosts (SLURM nodes)")
      p.add_argument("--gpus-per-node", type=int, default=8)
      p.add_argument("--tpu-name", default="", help="TPU VM name (--cluster=tpu)")
      p.add_argument("--zone", default="", help="TPU VM zone (--cluster=tpu)")
    if name == "browse":
      p.add_argument("--release", help="release folder (default: the run's); also the first argument")
      p.add_argument("--store", help="activation store (default: the run's, or <release>/../store)")
    if name == "release":
      p.add_argument("--to", help="publish to hf://org/repo, gs://bucket/prefix or a local folder")
      p.add_argument("--dry-run", action="store_true", help="list what would be uploaded")
  return parser


# Exit codes (README.md lists them): each kind of expected error has its own, and its message
# (one or two lines, no traceback unless --debug) names the input and the fix.
EXIT_OK = 0
EXIT_BUG = 1  # an unexpected error: the traceback is printed, please report it
EXIT_INPUT = 2  # a config value, argument, corpus, checkpoint or folder that cannot be used
EXIT_STORE = 3  # the activation store is incomplete or corrupt
EXIT_RELEASE = 4  # a release folder exists already, or a release file is unreadable
EXIT_DISK_FULL = 5  # no space left on a device
EXIT_DIVERGED = 6  # training hit NaN/inf (the last good checkpoint is kept)
EXIT_INTERRUPTED = 130  # Ctrl-C outside training (training itself checkpoints and exits 75)
# 75 (trainers.preemption.EXIT_CODE): training preempted after a checkpoint; rerun to resume.

# Our errors by class name: a Beam worker process returns them only as text inside a RuntimeError.
_KINDS = {"ConfigError": EXIT_INPUT, "CorpusError": EXIT_INPUT, "HarvestError": EXIT_INPUT,
          "UnfinishedRun": EXIT_INPUT, "ValueError": EXIT_INPUT,
          "FileNotFoundError": EXIT_INPUT, "NotADirectoryError": EXIT_INPUT,
          "IsADirectoryError": EXIT_INPUT, "PermissionError": EXIT_INPUT,
          "IncompleteStoreError": EXIT_STORE, "CorruptShardError": EXIT_STORE,
          "StoreError": EXIT_STORE, "ReleaseError": EXIT_RELEASE,
          "FileExistsError": EXIT_RELEASE, "SafetensorError": EXIT_RELEASE,
          "TrainingDiverged": EXIT_DIVERGED}
_FIXES = {
    "CorruptShardError": "fix: re-run `allscope harvest` with this run's config: it checks every "
                         "shard against its receipt and rewrites the damaged ones",
    "IncompleteStoreError": "fix: re-run `allscope harvest` with this run's config: it resumes "
                            "the unfinished store",
    "SafetensorError": "fix: the file is damaged or not safetensors; re-write the release "
                       "(allscope release ... release.overwrite=true) or fetch it again",
    "TrainingDiverged": "fix: lower train.lr (or raise train.lr_warmup_steps) and run train "
                        "again; it resumes from the last good checkpoint",
}
_OURS = re.compile(r"^(?:[\w.]+\.)?(\w+): (.+)$", re.M)  # `pkg.module.SomeError: message`


def classify(error: BaseException) -> tuple[int, str, str] | None:
  """(exit code, message, fix or "") of an expected error; None for an unexpected one."""
  from allscope.trainers import preemption

  if isinstance(error, preemption.Preempted):
    return preemption.EXIT_CODE, str(error), ""
  if isinstance(error, KeyboardInterrupt):
    return EXIT_INTERRUPTED, "interrupted", ("finished stages are kept; run the same command "
                                             "again to resume")
  beam_enospc = isinstance(error, RuntimeError) and f"[Errno {errno.ENOSPC}]" in str(error)
  if isinstance(error, OSError) and error.errno == errno.ENOSPC or beam_enospc:
    where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
    return EXIT_DISK_FULL, f"no space left on the device{where}", (
        "fix: free space (or point output_dir elsewhere) and run the same command again; "
        "finished stages and checkpoints are kept")
  names = [cls.__name__ for cls in type(error).__mro__]
  code = next((_KINDS[n] for n in names if n in _KINDS), None)
  if code is not None:
    return code, str(error), _fix(str(error), names)
  if isinstance(error, RuntimeError):  # a Beam worker's failure: our error, as text
    found = [m for m in _OURS.finditer(str(error)) if m.group(1) in _KINDS]
    if found:
      name, message = found[-1].group(1), found[-1].group(2)
      message = re.sub(r" \[while running '[^']*'\]$", "", message)
      return _KINDS[name], message, _fix(message, [name])
  return None


def _fix(message: str, names: Sequence[str]) -> str:
  """The fix for an error kind, unless its message already says what to re-run."""
  fix = next((_FIXES[n] for n in names if n in _FIXES), "")
  return "" if "re-run" in message else fix


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  flags = [a for a in extra if a.startswith("-")]
  if flags:
    parser.error(f"unrecognized arguments: {' '.join(flags)}")
  overrides = list(args.overrides) + extra  # overrides may also follow the flags
  if args.config is None and overrides and overrides[0].endswith(".py"):
    args.config = overrides.pop(0)  # `allscope run configs/quickstart.py`
  if args.command == "browse" and args.release is None and overrides and "=" not in overrides[0]:
    args.release = overrides.pop(0)  # `allscope browse outputs/quickstart/release`
  args.overrides = overrides
  try:
    cfg = config_lib.load(args.config, overrides)
    if args.command not in ("sample", "launch"):
      distributed.initialize()
    COMMANDS[args.command][0](cfg, args)
  except (Exception, KeyboardInterrupt) as e:
    known = classify(e)
    if args.debug or known is None:
      traceback.print_exc()
      if known is None:
        print(f"allscope {args.command}: unexpected error (a bug; please report it with the "
              "traceback above)", file=sys.stderr)
        return EXIT_BUG
    code, message, fix = known
    print(f"allscope {args.command}: error: {message}", file=sys.stderr)
    if fix:
      print(f"  {fix}", file=sys.stderr)
    return code
  return EXIT_OK


def entry_point() -> None:
  """The `allscope` command: one workload per process, so freed host memory is kept for reuse
  (host_memory). `main` leaves the allocator alone: a caller's process may run many workloads."""
  host_memory.keep_freed_memory()  # before JAX starts its threads
  sys.exit(main())


if __name__ == "__main__":
  entry_point()
