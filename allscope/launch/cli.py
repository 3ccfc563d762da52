"""The `allscope` command.

Every subcommand takes a config (`--config <name or file>`, or a .py file as the first argument)
followed by dotted overrides, e.g. `allscope sample model.dtype=bfloat16 --prompt "Hi"`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

from allscope.launch import config as config_lib


def sample(cfg: config_lib.RunConfig, args: argparse.Namespace) -> None:
  """Prints a greedy continuation, so a user can see that the model loaded right."""
  from allscope import models

  start = time.perf_counter()
  model, tokenizer = models.load(cfg.model.name, dtype=cfg.model.dtype)
  print(f"loaded {cfg.model.name} ({cfg.model.dtype}) in {time.perf_counter() - start:.1f}s",
        file=sys.stderr)
  prompt = tokenizer.encode(args.prompt, add_bos=True)
  if len(prompt) + args.tokens > model.config.max_context:
    raise ValueError(f"prompt + --tokens exceeds the model's context of {model.config.max_context}")
  start = time.perf_counter()
  out = models.generate(model, prompt, args.tokens)
  print(args.prompt + tokenizer.decode(out))
  print(f"{args.tokens} tokens in {time.perf_counter() - start:.1f}s", file=sys.stderr)


COMMANDS: dict[str, tuple[Callable, str]] = {
    "sample": (sample, "print a greedy continuation of --prompt"),
}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="allscope", description="Sparse dictionaries on every layer of Gemma 3.")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (_, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", help="config name in configs/ or path to a .py config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dtype=bfloat16")
    if name == "sample":
      p.add_argument("--prompt", default="The capital of France is")
      p.add_argument("--tokens", type=int, default=16, help="tokens to generate")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  overrides = list(args.overrides)
  if args.config is None and overrides and overrides[0].endswith(".py"):
    args.config = overrides.pop(0)  # `allscope run configs/quickstart.py`
  try:
    cfg = config_lib.load(args.config, overrides)
    COMMANDS[args.command][0](cfg, args)
  except (config_lib.ConfigError, ValueError, FileNotFoundError) as e:
    print(f"allscope {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
