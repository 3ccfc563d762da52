"""The quickstart: every stage, end to end, on a laptop-sized budget (2 CPU cores; README.md).

  allscope run configs/quickstart.py

Harvests mlp_in/mlp_out of all 18 layers of the bundled Gemma 3 270M on CPython's bundled English
documentation, trains one BatchTopK skip-transcoder per layer (all 18 in one pass, released as
JumpReLU), measures them on 9 144 held-out tokens from the store's held-out split (FVU, L0, dead
latents, and the spliced delta LM loss and KL with their standard error, for every one of the 18)
and writes a release folder with its model card under outputs/quickstart/.
"""

from allscope.launch.config import RunConfig
from allscope.models import ModelConfig
from allscope.pipelines import CorpusConfig, HarvestConfig
from allscope.release import EvalConfig, ReleaseConfig
from allscope.trainers import TrainConfig

LAYERS = tuple(range(18))


def get_config() -> RunConfig:
  return RunConfig(
      output_dir="outputs/quickstart",
      model=ModelConfig(name="gemma3-270m", dtype="float32"),
      harvest=HarvestConfig(
          corpus=CorpusConfig(kind="builtin"),
          sites=("mlp_in", "mlp_out"), layers=LAYERS,
          context_length=128, token_budget=24_576, batch_size=8, heldout_sequences=72),
      # Gemma Scope 2's recipe, as BatchTopK released as JumpReLU (its tracked threshold), so
      # SAELens' Gemma Scope 2 loader and circuit-tracer read the release; capacity 2k keeps the
      # step as fast as TopK's. 150 steps at lr 2e-3 (3 passes over the store) train as well on
      # held-out text as 300 at 1e-3 did, in half the time (README.md, the quickstart's budget).
      train=TrainConfig(
          kind="skip_transcoder", activation="batchtopk", k=16, capacity=32, layers=LAYERS,
          width=1024, batch_size=512, steps=150, lr=2e-3, lr_warmup_steps=10,
          checkpoint_every=75, log_every=15),
      # Every metric on the store's 72 held-out sequences (9 144 next-token targets per layer),
      # in 12 batches of 6: per batch one clean forward, 18 splice tails and one streamed pass
      # over the 262k vocabulary for all 19 (docs/evaluate.md), 24-28 s on 2 AVX-512 cores.
      # No zero-ablation passes: they would double the splices for fraction_loss_recovered only.
      evaluate=EvalConfig(n_sequences=72, seq_len=128, batch_size=6, zero_ablation=False),
      release=ReleaseConfig(name="gemma3-270m-quickstart"),
  )
