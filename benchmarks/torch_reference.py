"""The same textual-inversion step the way diffusers' `textual_inversion.py` does it, timed.

  python benchmarks/torch_reference.py --model small --batch 1

Per step: VAE-encode the images and sample the posterior, text encoder and
UNet forward/backward (frozen weights, gradient only for the token table),
AdamW over the whole token table, then restore every row but the
placeholder's. On CUDA it runs under bf16 autocast with PyTorch SDPA; on CPU
in float32. Random weights of the same shapes as benchmarks/train_step.py.
"""

from __future__ import annotations

import common  # benchmarks/common.py: a script's own folder is on sys.path
from absl import app, flags

common.define_model_flags(dtype=None, batch_help="Batch.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import torch
  from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
  from torch.utils.flop_counter import FlopCounterMode
  from transformers import CLIPTextConfig, CLIPTextModel

  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  cfg = common.model_configs(FLAGS.model)
  res = common.RESOLUTION[FLAGS.model]
  torch.manual_seed(0)
  unet = UNet2DConditionModel(**cfg["unet"]).to(device)
  vae = AutoencoderKL(**cfg["vae"]).to(device)
  text_cfg = {k: v for k, v in cfg["text_encoder"].items() if k not in ("architectures", "model_type")}
  text = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(device)
  sched = DDPMScheduler.from_config(cfg["scheduler"])
  for m in (unet, vae, text):
    m.requires_grad_(False)
  table = text.get_input_embeddings().weight
  table.requires_grad_(True)  # as diffusers: the whole token table trains, other rows restored
  opt = torch.optim.AdamW([table], lr=5e-3)
  original = table.detach().clone()
  placeholder = cfg["text_encoder"]["vocab_size"] - 1
  keep = torch.ones(table.shape[0], dtype=torch.bool, device=device)
  keep[placeholder] = False
  b = FLAGS.batch
  pixels = torch.randn(b, 3, res, res, device=device).clamp(-1, 1)
  ids = torch.randint(0, placeholder - 1, (b, 77), device=device)
  ids[:, 5] = placeholder
  unet.train(); text.train()

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
      latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
      noise = torch.randn_like(latents)
      t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=device)
      noisy = sched.add_noise(latents, noise, t)
      context = text(ids)[0]
      pred = unet(noisy, t, context).sample
      loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
      table[keep] = original[keep]
    return loss

  sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
  counter = FlopCounterMode(display=False)
  with counter:
    step()
  flops = counter.get_total_flops()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times = common.timed(step, FLAGS.steps, FLAGS.warmup, sync)
  step_s = common.median(times)
  memory = torch.cuda.max_memory_allocated() if cuda else common.max_rss_bytes()
  common.report({
      "impl": "diffusers-style PyTorch", "model": FLAGS.model, "resolution": res,
      "dtype": "bf16 autocast" if cuda else "float32",
      "device": torch.cuda.get_device_name() if cuda else "cpu", "per_device_batch": b,
      "step_s_median": step_s, "images_per_s": b / step_s, "gflop_per_image": flops / b / 1e9,
      "peak_memory_gib": memory / 2**30,
      "memory_kind": "cuda max_memory_allocated" if cuda else "host max RSS",
  }, FLAGS.json_out)


if __name__ == "__main__":
  app.run(main)
