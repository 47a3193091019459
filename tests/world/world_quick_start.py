"""The tiny world's quick start and its checker scores, in a process of its own.

`python tests/world/world_quick_start.py WORKDIR EVAL_DIR` trains `configs/object.py:world` into
WORKDIR on one device, as the README's quick start trains it, and scores the run and the
initializer word with the world's checker (`PROTOCOL`, the edit prompts `EDIT_PROMPTS`) into
EVAL_DIR/report.json. `tests/world/test_world_textual_inversion.py` starts it with XLA's default
optimisation level: the run's 400 steps and its 32-sample scoring are long loops, which the
tests' level (-O0, see `conftest.TEST_XLA_OPTIONS`) runs several times slower.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # conftest

import jax  # noqa: E402
from conftest import world_config  # noqa: E402

from ti_jax.evaluation import evaluator  # noqa: E402
from ti_jax.training import trainer  # noqa: E402

# One edit prompt per kind of attribute (`world_scores.OBJECT_PROMPTS` has ten): the
# editability target is the paper's claim for each kind. 32 samples a prompt: at 16 the
# same run measured editability 0.703, a single image above the target.
EDIT_PROMPTS = """\
background\ta photo of {} on a green background
colour\ta photo of a red {}
size\ta photo of a large {}
position\ta photo of {} on the left
"""
PROTOCOL = evaluator.Protocol(num_samples=32, num_inference_steps=25, guidance_scale=7.0,
                              scorer="checker")


def main(workdir: str, eval_dir: str) -> None:
  devices = jax.local_devices()[:1]
  trainer.run(world_config("object", "world"), workdir, devices=devices, progress=False)
  os.makedirs(eval_dir, exist_ok=True)
  prompts = os.path.join(eval_dir, "edits.txt")
  with open(prompts, "w", encoding="utf-8") as f:
    f.write(EDIT_PROMPTS)
  evaluator.run(workdirs=[workdir], protocol=PROTOCOL, prompts_file=prompts,
                output_dir=eval_dir, devices=devices, words=["object"])


if __name__ == "__main__":
  main(*sys.argv[1:3])
