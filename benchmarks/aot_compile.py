"""Compiles ti_jax's training step and sampling loop for TPUs or GPUs ahead of time, on a CPU host.

  python benchmarks/aot_compile.py --topology v5e:1x1 --model sd15 --batch 8
  python benchmarks/aot_compile.py --topology v5e:1x1 --model sd21 --batch 4 --program train
  python benchmarks/aot_compile.py --topology v5e:2x2 --model sd15 --sweep_batch
  python benchmarks/aot_compile.py --topology v5e:2x2 --model sd15 --program train --shard_weights true
  python benchmarks/aot_compile.py --topology v4:2x2x1 --model tiny --attention_impl xla
  python benchmarks/aot_compile.py --topology h100:1 --model sd15 --batch 8
  python benchmarks/aot_compile.py --topology h100:8 --model sdxl --batch 4 --remat auto
  python benchmarks/aot_compile.py --topology a100-80g:1 --model sd15 --attention_impl cudnn

Needs the target's compiler, not the chip: libtpu (`pip install "jax[tpu]"`)
for TPU topologies, JAX's CUDA plugin (`pip install "jax[cuda12]"`, in an
environment of its own: it is several GB) for GPUs. `jax.experimental.topologies`
describes the chips (`benchmarks/aot_targets.py`; a GPU from its target config
in `benchmarks/gpu_specs/`) and the real compiler (XLA:TPU and Mosaic for the
Pallas kernels; XLA:GPU, without autotuning since no GPU is there to time
candidates) compiles for them. Nothing runs and no weights exist: the model is
built from `jax.eval_shape` of its init, so a full-size step needs only the
compiler's own memory on the host.

The programs are the ones the entry points run: the training step is
`train_lib.make_pmapped_step` over every chip of the topology (the gradient
`pmean` included), with the frozen models replicated once as in
`ti_jax.train` (`--shard_weights`: its mesh step, `aot_mesh.py`); the sampling
loop is `generation.ImageGenerator`'s pmapped program (DDIM, classifier-free
guidance in one batched UNet call, VAE decode), as `ti_jax.sample` runs it.

Per chip it prints XLA's memory plan (arguments, outputs, temporaries,
generated code) against the chip's memory (a GPU: the share JAX's allocator
takes, `--gpu_memory_fraction`), FLOPs per image from XLA's cost analysis (TPU
only: a GPU program compiled without a GPU has none) next to the analytic count
of `analytic_step_flops`, and the compile time. `--sweep_batch` doubles the
per-chip batch until the step no longer fits, then bisects. XLA's
`optimal_seconds` estimate is not reported: it is not a time for these programs
(it came out negative for a UNet step).
"""

from __future__ import annotations

import sys
import time
import types

import aot_mesh  # benchmarks/aot_mesh.py: the mesh step, weights sharded or not
import aot_targets  # benchmarks/aot_targets.py: the chips and GPUs compiled for
import common  # benchmarks/common.py: a script's own folder is on sys.path
from absl import app, flags

common.define_model_flags(["tiny", "narrow", "small", "sd15", "sd21", "ldm", "tiny-sdxl", "sdxl"], model="sd15",
                          dtype="bfloat16", batch=8)
flags.DEFINE_string("topology", "v5e:1x1",
                    "TPU topology, as jax.experimental.topologies names it: v4:2x2x1, v5e:1x1, "
                    "v5e:2x2, v5p:2x2x1, v6e:2x2, ...; or GPUs in one host as MODEL:COUNT: "
                    f"{', '.join(m + ':8' for m in aot_targets.GPU_SPECS)}, ...")
flags.DEFINE_enum("attention_impl", "", ["", "xla", "pallas_tpu", "cudnn"],
                  "UNet attention; '' resolves as ti_jax does for the devices (TPU: pallas_tpu; "
                  "GPU: jax.nn.dot_product_attention's default, XLA). cudnn: GPUs only.")
flags.DEFINE_float("gpu_memory_fraction", aot_targets.JAX_GPU_MEMORY_FRACTION,
                   "GPUs: the share of the GPU's memory a program may plan for; JAX's allocator "
                   "takes 0.75 by default (XLA_CLIENT_MEM_FRACTION raises it).")
flags.DEFINE_enum("remat", "false", ["false", "true", "auto"],
                  "Rematerialise the UNet blocks in the step; 'auto' turns it on only when the "
                  "step does not fit the chip's HBM without it.")
flags.DEFINE_enum("shard_weights", "", ["", "false", "true"],
                  "Train program: '' the pmapped step; 'true'/'false' the mesh step of one "
                  "concept over every chip with the frozen weights FSDP-sharded/replicated.")
flags.DEFINE_integer("num_concepts", 1,
                     "Train program with --shard_weights true|false: the mesh step of this many "
                     "concepts (ti_jax.train --config.concepts_file), sharing the step's "
                     "--batch x chips examples (each concept's batch: that / num_concepts), "
                     "spread over the chips as the run spreads them.")
flags.DEFINE_enum("program", "both", ["train", "sample", "both"], "Which program(s) to compile.")
flags.DEFINE_integer("sample_batch", 1, "Images per chip per sampling call.")
flags.DEFINE_integer("num_inference_steps", 50, "DDIM steps of the sampling loop.")
flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale of the sampling loop.")
flags.DEFINE_bool("sweep_batch", False,
                  "Find the largest per-chip batch whose program fits the chip's HBM (--batch "
                  "and --sample_batch are the starting points).")
flags.DEFINE_integer("max_batch", 256, "Upper end of --sweep_batch.")
flags.DEFINE_integer("num_views", 10, "Cached training views (5 images, flipped), as in training.")
FLAGS = flags.FLAGS

GIB = aot_targets.GIB


# --- the analytic FLOP count --------------------------------------------------------------
#
# Multiply-adds of every convolution, dense layer and attention product, as 2 FLOPs
# each; norms, activations and elementwise work are left out (a few percent at
# most). The step differentiates with respect to the learned token vectors only,
# so its backward pass is "backward to the context": activation gradients through
# every UNet layer downstream of the first cross-attention (one forward's worth of
# FLOPs for each conv/dense, two for each attention product: dS and dV, then dQ
# and dK) and through the whole text encoder, and no weight gradients at all.
# Layers whose input does not depend on the context (conv_in, the first resnet,
# the time embedding and every time_emb_proj) get no backward.


class _Count:
  """Forward and backward-to-the-context FLOPs, per image."""

  def __init__(self):
    self.forward = 0.0
    self.backward = 0.0
    self.live = False  # do the activations depend on the context yet?

  def op(self, flops: float, live: bool | None = None, backward_factor: float = 1.0):
    live = self.live if live is None else live
    self.forward += flops
    if live:
      self.backward += backward_factor * flops


def _unet_flops(unet_cfg, latent: int, context_len: int) -> _Count:
  c = _Count()
  ch = unet_cfg.block_out_channels
  n = len(ch)
  temb = 4 * ch[0]
  conv = lambda hw, cin, cout, k=3: 2.0 * hw * k * k * cin * cout

  def resnet(hw, cin, cout):
    c.op(conv(hw, cin, cout))
    c.op(2.0 * temb * cout, live=False)  # time_emb_proj: a function of t alone
    c.op(conv(hw, cout, cout))
    if cin != cout:
      c.op(conv(hw, cin, cout, 1))

  def transformer(hw, dim, layers):
    c.op(2.0 * hw * dim * dim)  # proj_in (1x1 conv or dense: the same count)
    for _ in range(layers):
      c.op(4 * 2.0 * hw * dim * dim)  # attn1 q, k, v, out
      c.op(2 * 2.0 * hw * hw * dim, backward_factor=2.0)  # q.k and p.v over hw keys
      c.op(2 * 2.0 * hw * dim * dim)  # attn2 q, out
      c.op(2 * 2.0 * context_len * unet_cfg.cross_attention_dim * dim, live=True)  # attn2 k, v
      c.live = True  # from here on everything depends on the context
      c.op(2 * 2.0 * hw * context_len * dim, backward_factor=2.0)  # over the 77 text tokens
      c.op(2.0 * hw * dim * 8 * dim + 2.0 * hw * 4 * dim * dim)  # GEGLU ff: dim -> 2x4dim -> dim
    c.op(2.0 * hw * dim * dim)  # proj_out

  c.op(2.0 * ch[0] * temb + 2.0 * temb * temb, live=False)  # time embedding MLP
  side = latent
  c.op(conv(side * side, unet_cfg.in_channels, ch[0]))  # conv_in
  skips = [ch[0]]
  cin = ch[0]
  for i in range(n):
    attn = unet_cfg.down_block_types[i] == "CrossAttnDownBlock2D"
    for _ in range(unet_cfg.layers_per_block[i]):
      resnet(side * side, cin, ch[i])
      cin = ch[i]
      if attn:
        transformer(side * side, ch[i], unet_cfg.transformer_layers_per_block[i])
      skips.append(cin)
    if i < n - 1:
      side //= 2
      c.op(conv(side * side, cin, cin))  # stride-2 downsampler
      skips.append(cin)
  resnet(side * side, cin, ch[-1])
  transformer(side * side, ch[-1], unet_cfg.transformer_layers_per_block[-1])
  resnet(side * side, ch[-1], ch[-1])
  for i in range(n):
    rev = n - 1 - i
    attn = unet_cfg.up_block_types[i] == "CrossAttnUpBlock2D"
    for _ in range(unet_cfg.layers_per_block[rev] + 1):
      resnet(side * side, cin + skips.pop(), ch[rev])
      cin = ch[rev]
      if attn:
        transformer(side * side, ch[rev], unet_cfg.transformer_layers_per_block[rev])
    if i < n - 1:
      side *= 2
      c.op(conv(side * side, cin, cin))  # nearest-neighbour upsampler's conv
  c.op(conv(side * side, cin, unet_cfg.out_channels))  # conv_out
  return c


def _text_flops(text_cfg, tokens: int) -> _Count:
  """CLIP or LDMBert encoder over `tokens` tokens; all of it is differentiated."""
  c = _Count()
  c.live = True
  if hasattr(text_cfg, "d_model"):  # LDMBert
    width, ffn = text_cfg.d_model, text_cfg.encoder_ffn_dim
    inner = text_cfg.encoder_attention_heads * text_cfg.head_dim
    layers = text_cfg.encoder_layers
  else:  # CLIP
    width, ffn = text_cfg.hidden_size, text_cfg.intermediate_size
    inner, layers = text_cfg.hidden_size, text_cfg.num_hidden_layers
  for _ in range(layers):
    c.op(4 * 2.0 * tokens * width * inner)  # q, k, v, out
    c.op(2 * 2.0 * tokens * tokens * inner, backward_factor=2.0)
    c.op(2 * 2.0 * tokens * width * ffn)  # the MLP
  return c


def _vae_decoder_flops(vae_cfg, latent: int) -> float:
  """Forward FLOPs of the VAE decoder (post_quant_conv to conv_out) for one image."""
  rev = tuple(reversed(vae_cfg.block_out_channels))
  conv = lambda hw, cin, cout, k=3: 2.0 * hw * k * k * cin * cout
  side, total = latent, 0.0
  total += conv(side * side, vae_cfg.latent_channels, vae_cfg.latent_channels, 1)
  total += conv(side * side, vae_cfg.latent_channels, rev[0])
  resnet = lambda hw, cin, cout: (conv(hw, cin, cout) + conv(hw, cout, cout)
                                  + (conv(hw, cin, cout, 1) if cin != cout else 0.0))
  hw = side * side
  total += 2 * resnet(hw, rev[0], rev[0]) + 4 * 2.0 * hw * rev[0] ** 2 + 2 * 2.0 * hw * hw * rev[0]
  cin = rev[0]
  for i, ch in enumerate(rev):
    for _ in range(vae_cfg.layers_per_block + 1):
      total += resnet(side * side, cin, ch)
      cin = ch
    if i < len(rev) - 1:
      side *= 2
      total += conv(side * side, ch, ch)
  return total + conv(side * side, cin, vae_cfg.out_channels)


def analytic_step_flops(modules: dict, resolution: int, tokens: int = 77) -> dict:
  """Analytic FLOPs per image of one training step: UNet forward + backward to the context +
  text encoder forward and backward. For SD 1.5 at 512 px this is 1.70 TFLOP.
  """
  latent = resolution // 2 ** (len(modules["vae"].config.block_out_channels) - 1)
  unet = _unet_flops(modules["unet"].config, latent, tokens)
  text = _text_flops(modules["text_encoder"].config, tokens)
  if "text_encoder_2" in modules:  # SDXL: both encoders are differentiated to their inputs
    text_2 = _text_flops(modules["text_encoder_2"].config, tokens)
    text.forward, text.backward = text.forward + text_2.forward, text.backward + text_2.backward
  return {"unet_forward": unet.forward, "unet_backward": unet.backward,
          "text_encoder": text.forward + text.backward,
          "total": unet.forward + unet.backward + text.forward + text.backward}


def analytic_sample_flops(modules: dict, resolution: int, steps: int, guided: bool,
                          tokens: int = 77) -> dict:
  """Analytic FLOPs per image of the sampling loop: `steps` UNet calls (two images' worth with
  guidance), the text encoder on both prompts, and one VAE decode."""
  latent = resolution // 2 ** (len(modules["vae"].config.block_out_channels) - 1)
  halves = 2 if guided else 1
  unet = _unet_flops(modules["unet"].config, latent, tokens).forward * halves
  text = sum(_text_flops(modules[k].config, tokens).forward * halves
             for k in ("text_encoder", "text_encoder_2") if k in modules)
  vae = _vae_decoder_flops(modules["vae"].config, latent)
  return {"unet_per_step": unet, "text_encoder": text, "vae_decode": vae,
          "total": steps * unet + text + vae}


# --- building and compiling the programs from shapes ---------------------------------------


def _abstract(tree):
  """The same tree with every array leaf replaced by its `jax.ShapeDtypeStruct`."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _nbytes(tree) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


def _memory_record(compiled, hbm: int) -> dict:
  """XLA's per-chip memory plan of a compiled program, in bytes, and whether it fits `hbm`."""
  from ti_jax.training import train_lib  # pylint: disable=import-outside-toplevel
  m = compiled.memory_analysis()
  # The rule remat="auto" applies in training: donated inputs aliasing outputs count once.
  total = train_lib.compiled_memory_bytes(compiled)
  return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
          "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
          "code_bytes": m.generated_code_size_in_bytes, "total_bytes": total,
          "hbm_bytes": hbm, "fits": bool(total <= hbm)}


# XLA:GPU without a GPU cannot autotune: it gives each matmul fusion one default Triton
# tiling, and for some shapes (the tiny model's [154, 32] CLIP projection at batch 2) it
# finds none and fails. A GPU would time cuBLAS against Triton there; without one, cuBLAS
# takes every matmul of that program.
NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}
UNTILED_TRITON_GEMM = "Couldn't find output tile sizes"


def _compile(lowered, record: dict):
  """Compiles `lowered`, timing it into `record`. XLA:TPU refuses a program larger than the
  chip's HBM: then `record` says it does not fit, with the compiler's own account of by how
  much, and None is returned. Where XLA:GPU finds no Triton tiling for a matmul without
  autotuning, the program is compiled again with cuBLAS for every matmul
  (`record["triton_gemm"]` is False)."""
  from ti_jax.training import train_lib  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  try:
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if UNTILED_TRITON_GEMM not in str(e):
        raise
      record["triton_gemm"] = False
      compiled = lowered.compile(compiler_options=NO_TRITON_GEMM)
  except Exception as e:  # pylint: disable=broad-except
    if not train_lib.is_out_of_memory(e):
      raise
    record.update(compile_s=time.perf_counter() - t0, fits=False,
                  compiler_oom=next((line.strip() for line in str(e).splitlines()
                                     if "Exceeded" in line or "Ran out" in line),
                                    str(e).splitlines()[0]))
    return None
  record["compile_s"] = time.perf_counter() - t0
  return compiled


def _program_record(compiled) -> dict:
  """FLOPs (XLA's count, one chip; None where the compiler gives none, as XLA:GPU without a
  GPU) and what the compiled program contains."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  text = compiled.as_text()
  return {"xla_flops": float(cost.get("flops", 0.0)) if cost else None,
          # XLA:GPU splits an all-reduce into an asynchronous start/done pair.
          "all_reduces": text.count("all-reduce(") + text.count("all-reduce-start("),
          # Mosaic-compiled Pallas kernels appear as tpu_custom_call custom-calls.
          "pallas_kernels": text.count('custom_call_target="tpu_custom_call"'),
          # cuDNN's fused attention (forward and backward) as XLA:GPU custom-calls.
          "cudnn_attention_calls": text.count('custom_call_target="__cudnn$fmha')}


def _per_image(record: dict, analytic_total: float, batch: int) -> dict:
  """XLA's and the analytic FLOPs per image (XLA's is None where it has no count)."""
  xla = record["xla_flops"]
  return {"xla_gflop_per_image": None if xla is None else xla / batch / 1e9,
          "analytic_gflop_per_image": analytic_total / 1e9,
          "xla_over_analytic": None if xla is None else xla / batch / analytic_total}


def build_modules(model: str, dtype, attention_impl: str, remat: bool, devices,
                  vae_dtype=None):
  """The model's Flax modules, with `attention_impl` resolved for `devices` as ti_jax does."""
  from ti_jax.models import layers  # pylint: disable=import-outside-toplevel
  from ti_jax.weights import pipeline  # pylint: disable=import-outside-toplevel
  impl = layers.resolve_attention_impl(attention_impl, devices)
  return pipeline.build_modules(common.model_configs(model), dtype=dtype, param_dtype=dtype,
                                attention_impl=impl, remat=remat, vae_dtype=vae_dtype), impl


def train_step_args(model: str, batch: int, dtype, attention_impl: str, remat: bool, devices,
                    num_views: int = 10) -> dict:
  """What `ti_jax.train` hands its pmapped step, built from shapes alone: the step's settings,
  optimizer and schedule, and its (state, frozen, batch) arguments as `ShapeDtypeStruct`s in
  the per-device layout. Also the modules and param shapes, for the record."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from ti_jax.runtime import parallel  # pylint: disable=import-outside-toplevel
  from ti_jax.sampling import noise_schedule  # pylint: disable=import-outside-toplevel
  from ti_jax.training import train_lib  # pylint: disable=import-outside-toplevel
  from ti_jax.weights import pipeline  # pylint: disable=import-outside-toplevel
  cfg = common.model_configs(model)
  modules, impl = build_modules(model, dtype, attention_impl, remat, devices)
  shapes = pipeline.param_shapes(modules)
  res = common.RESOLUTION[model]
  latent = res // 2 ** (len(modules["vae"].config.block_out_channels) - 1)
  tokens = modules["text_encoder"].config.max_position_embeddings
  sds = jax.ShapeDtypeStruct
  # The frozen arrays exactly as train.run builds them: UNet and text encoder in
  # `dtype`, float32 posterior moments of each cached view, the noise schedule.
  channels = modules["unet"].config.in_channels
  # Each text encoder (SDXL: two) with its placeholder id; SDXL also each view's time ids [V, 6].
  roles = [r for r in ("text_encoder", "text_encoder_2") if r in modules]
  suffixes = tuple(r[len("text_encoder"):] for r in roles)
  sdxl = len(roles) > 1
  frozen = train_lib.Frozen(
      unet=shapes["unet"], text_encoders=tuple(shapes[r] for r in roles),
      latent_mean=sds((num_views, latent, latent, channels), jnp.float32),  # [V, h, w, C]
      latent_std=sds((num_views, latent, latent, channels), jnp.float32),
      placeholder_ids=tuple(sds((1,), jnp.int32) for _ in roles),
      schedule=_abstract(noise_schedule.noise_schedule_from_config(cfg["scheduler"])),
      time_ids=sds((num_views, 6), jnp.float32) if sdxl else None)
  settings = train_lib.StepSettings(
      unet=modules["unet"], text_encoders=tuple(modules[r] for r in roles), suffixes=suffixes,
      scaling_factor=float(modules["vae"].config.scaling_factor),
      shift_factor=float(modules["vae"].config.shift_factor), seed=0,
      pool_eos_token_id=modules[roles[-1]].config.eos_token_id if sdxl else None)
  lr = train_lib.learning_rate_schedule(5e-3, "constant", 0, 5000)
  optimizer = train_lib.make_optimizer(lr, 0.9, 0.999, 1e-8, 1e-2)
  state = jax.eval_shape(
      lambda initial: train_lib.init_state(initial, optimizer),
      {"embeds" + s: sds((1, modules[r].config.hidden_size), jnp.float32)
       for r, s in zip(roles, suffixes)})
  n = len(devices)
  chip_batch = {"view_index": sds((batch,), jnp.int32), "example_index": sds((batch,), jnp.int32),
                # [b, T] in each encoder's tokenizer
                **{"input_ids" + s: sds((batch, tokens), jnp.int32) for s in suffixes}}
  global_batch = jax.tree_util.tree_map(lambda x: sds((n * x.shape[0],) + x.shape[1:], x.dtype),
                                        chip_batch)
  args = (parallel.replicate(state, devices), parallel.replicate(frozen, devices),
          parallel.shard(global_batch, n))
  return {"settings": settings, "optimizer": optimizer, "lr": lr, "args": args,
          "modules": modules, "shapes": shapes, "attention_impl": impl, "resolution": res,
          "tokens": tokens, "unreplicated": (state, frozen, global_batch),
          # What one chip's arguments should be: one copy of the frozen weights, the
          # state and this chip's batch. More would mean the program duplicates them.
          "expected_argument_bytes": _nbytes(frozen) + _nbytes(state) + _nbytes(chip_batch),
          "weight_bytes": sum(_nbytes(shapes[k]) for k in shapes if k != "vae")}


def compile_train_step(model: str, batch: int, dtype, attention_impl: str, remat: bool,
                       devices, hbm: int, num_views: int = 10, shard_weights: str = "",
                       num_concepts: int = 1) -> dict:
  """AOT-compiles ti_jax.train's pmapped step for `devices` (with `shard_weights` "true" or
  "false": the mesh step, `aot_mesh`, of `num_concepts` concepts); returns the per-chip
  record."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from ti_jax.training import train_lib  # pylint: disable=import-outside-toplevel
  built = train_step_args(model, batch, dtype, attention_impl, remat, devices, num_views)
  settings, optimizer, lr, args = (built[k] for k in ("settings", "optimizer", "lr", "args"))
  modules, res, impl, tokens = (built[k] for k in ("modules", "resolution", "attention_impl",
                                                   "tokens"))
  n = len(devices)
  record = {"program": "train", "model": model, "resolution": res,
            "dtype": jnp.dtype(dtype).name, "chips": n, "per_chip_batch": batch,
            "attention_impl": impl or "default", "remat": bool(remat)}
  if shard_weights:
    lowered, mesh_args = aot_mesh.mesh_step_lowered(built, devices, shard_weights == "true",
                                                    num_concepts)
    record.update(layout="mesh", shard_weights=shard_weights == "true",
                  num_concepts=num_concepts)
    # One chip's shards of the arguments: the frozen weights' 1/n share when sharded.
    built["expected_argument_bytes"] = aot_mesh.per_chip_bytes(mesh_args)
  else:
    lowered = train_lib.make_pmapped_step(settings, optimizer, lr, devices).lower(*args)
  compiled = _compile(lowered, record)
  if compiled is None:
    return record
  record.update(_memory_record(compiled, hbm))
  record.update({k: built[k] for k in ("expected_argument_bytes", "weight_bytes")})
  record["argument_over_expected"] = record["argument_bytes"] / built["expected_argument_bytes"]
  record.update(_program_record(compiled))
  record.update(_per_image(record, analytic_step_flops(modules, res, tokens)["total"], batch))
  return record


def compile_sampler(model: str, batch: int, dtype, attention_impl: str, devices, hbm: int,
                    num_inference_steps: int = 50, guidance_scale: float = 7.5) -> dict:
  """AOT-compiles ti_jax.sample's pmapped DDIM loop (with guidance and VAE decode) for `devices`."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from ti_jax.sampling import generation  # pylint: disable=import-outside-toplevel
  from ti_jax.weights import pipeline  # pylint: disable=import-outside-toplevel
  cfg = common.model_configs(model)
  # As ti_jax.sample on an accelerator: UNet and text encoder in `dtype`, VAE in float32.
  modules, impl = build_modules(model, dtype, attention_impl, False, devices,
                                vae_dtype=jnp.float32)
  shapes = pipeline.param_shapes(modules)
  res = common.RESOLUTION[model]
  sd = pipeline.StableDiffusion(
      source=model, path="", unet=modules["unet"], unet_params=shapes["unet"],
      vae=modules["vae"], vae_params=shapes["vae"],
      # The program reads only the tokenizers' eos ids (SDXL's pooled embedding is taken there).
      text_encoders=pipeline.text_encoders(
          modules, shapes, {role: types.SimpleNamespace(eos_token_id=modules[role].config.eos_token_id)
                            for role in pipeline.TOKENIZER_FOLDERS if role in modules}),
      scheduler_config=cfg["scheduler"],
      model_index=({"_class_name": "StableDiffusionXLPipeline",
                    "force_zeros_for_empty_prompt": True} if "text_encoder_2" in modules else {}))
  generator = generation.ImageGenerator(sd, scheduler="ddim", num_inference_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, height=res, width=res,
                                      devices=devices)
  tokens = modules["text_encoder"].config.max_position_embeddings
  n = len(devices)
  record = {"program": "sample", "model": model, "resolution": res,
            "dtype": jnp.dtype(dtype).name, "chips": n, "per_chip_batch": batch,
            "attention_impl": impl or "default", "remat": False,
            "steps": num_inference_steps, "guidance_scale": guidance_scale}
  compiled = _compile(generator.lower(batch), record)
  if compiled is None:
    return record
  record.update(_memory_record(compiled, hbm))
  # The loop only decodes: XLA drops the VAE encoder's params from the program's arguments.
  decoder = {k: v for k, v in shapes["vae"].items() if k in ("decoder", "post_quant_conv")}
  record["weight_bytes"] = sum(_nbytes(shapes[k]) for k in shapes if k != "vae") + _nbytes(
      decoder)
  record["argument_over_weights"] = record["argument_bytes"] / record["weight_bytes"]
  record.update(_program_record(compiled))
  analytic = analytic_sample_flops(modules, res, num_inference_steps, guidance_scale != 1.0,
                                   tokens)
  record.update(_per_image(record, analytic["total"], batch))
  del record["xla_over_analytic"]  # the loop body is counted once: compare with the line below
  record["analytic_unet_gflop_per_step"] = analytic["unet_per_step"] / 1e9
  # XLA's cost analysis counts the body of the denoising fori_loop once, not per step:
  # compare its figure with one step's worth of the loop.
  record["analytic_gflop_loop_body_once"] = (analytic["total"] - (num_inference_steps - 1)
                                             * analytic["unet_per_step"]) / 1e9
  return record


def compile_step_auto_remat(model: str, batch: int, dtype, attention_impl: str, devices,
                            hbm: int, remat: str, num_views: int = 10,
                            shard_weights: str = "", num_concepts: int = 1) -> dict:
  """The train step with remat "true"/"false", or "auto": without remat, and with it only when
  the plain step does not fit the chip's HBM (the rule of `train_lib.remat_if_needed`, which
  `ti_jax.train` applies with remat="auto" on a TPU)."""
  def at(with_remat):
    return compile_train_step(model, batch, dtype, attention_impl, with_remat, devices, hbm,
                              num_views, shard_weights, num_concepts)
  record = at(remat == "true")
  if remat == "auto" and not record["fits"]:
    plain, record = record, at(True)
    record["without_remat"] = plain.get("compiler_oom") or f"{plain['total_bytes'] / GIB:.2f} GiB"
  return record


def sweep(compile_at, start: int, max_batch: int, log) -> tuple[int, list[dict]]:
  """Largest batch in [1, max_batch] for which `compile_at(batch)["fits"]`, doubling from
  `start` and then bisecting; returns (batch or 0, every record compiled)."""
  records = []

  def fits(b):
    r = compile_at(b)
    records.append(r)
    log(r)
    return r["fits"]

  lo, hi = 0, None  # lo fits (0: nothing fits yet), hi does not
  b = max(1, start)
  while b <= max_batch and hi is None:
    if fits(b):
      lo, b = b, b * 2
    else:
      hi = b
  if hi is None:
    return lo, records
  while hi - lo > 1:  # bisect; from (0, start) when even `start` does not fit
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo, records


def _one_at_a_time(compile_at):
  """`compile_at` that drops JAX's caches after each compile, so that a sweep holds one program
  at a time: a full-size SDXL sweep kept every earlier batch's program and grew past 23 GiB of
  host memory by its fourth compile."""
  import gc  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  def at(batch):
    record = compile_at(batch)
    jax.clear_caches()
    gc.collect()
    return record
  return at


def _print(record: dict) -> None:
  gib = lambda k: f"{record[k] / GIB:.2f} GiB"
  layout = {True: " mesh, sharded weights", False: " mesh, replicated weights"}.get(
      record.get("shard_weights"), "")
  config = (f"{record['program']:>6} {record['model']} {record['resolution']}px "
            f"{record['chips']} chip(s) batch/chip {record['per_chip_batch']} "
            f"{record['attention_impl']}{' remat' if record['remat'] else ''}{layout}")
  if "compiler_oom" in record:
    print(f"{config}: does NOT fit, the compiler says: {record['compiler_oom']} (after "
          f"{record['compile_s']:.0f} s)", flush=True)
    return
  line = (config +
          f"{' cuBLAS-only matmuls' if record.get('triton_gemm') is False else ''}: "
          f"args {gib('argument_bytes')} out {gib('output_bytes')} "
          f"temp {gib('temp_bytes')} code {gib('code_bytes')} -> total {gib('total_bytes')} "
          f"of {gib('hbm_bytes')} ({'fits' if record['fits'] else 'does NOT fit'}), "
          + (f"{record['xla_gflop_per_image']:.0f} GFLOP/image (analytic "
             if record["xla_gflop_per_image"] is not None else "(no XLA FLOP count) analytic (")
          + f"{record['analytic_gflop_per_image']:.0f} GFLOP/image"
          + (f"; with the loop body once {record['analytic_gflop_loop_body_once']:.0f}"
             if "analytic_gflop_loop_body_once" in record else "")
          + f"), compile {record['compile_s']:.0f} s")
  print(line, flush=True)


def main(argv):
  del argv
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
  if FLAGS.num_concepts > 1 and not FLAGS.shard_weights:
    sys.exit("error: --num_concepts compiles the mesh step: pass --shard_weights true or false")
  try:
    target = aot_targets.describe(FLAGS.topology, FLAGS.gpu_memory_fraction)
  except (ValueError, RuntimeError, NotImplementedError) as e:
    sys.exit(f"error: cannot describe topology {FLAGS.topology!r}: "
             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
  devices, hbm = target.devices, target.memory_bytes
  results = {"topology": FLAGS.topology, "platform": target.platform,
             "compiler": target.compiler, "device_kind": devices[0].device_kind,
             "device_memory_bytes": target.device_memory_bytes, "records": []}
  if target.platform == "tpu":  # (the key older TPU results carry)
    results["libtpu"] = target.compiler.split(" ", 1)[1]
  out = results["records"]
  programs = {  # program name -> (compile at a per-chip batch, the batch asked for)
      "train": (lambda b: compile_step_auto_remat(FLAGS.model, b, dtype, FLAGS.attention_impl,
                                                  devices, hbm, FLAGS.remat, FLAGS.num_views,
                                                  FLAGS.shard_weights, FLAGS.num_concepts),
                FLAGS.batch),
      "sample": (lambda b: compile_sampler(FLAGS.model, b, dtype, FLAGS.attention_impl, devices,
                                           hbm, FLAGS.num_inference_steps, FLAGS.guidance_scale),
                 FLAGS.sample_batch)}
  for name, (at, batch) in programs.items():
    if FLAGS.program not in (name, "both"):
      continue
    with aot_targets.cudnn_checks_for(devices):
      if FLAGS.sweep_batch:
        best, records = sweep(_one_at_a_time(at), batch, FLAGS.max_batch, _print)
        out.extend(records)
        results[f"largest_{name}_batch"] = best
        print(f"largest per-chip {'train' if name == 'train' else 'sampling'} batch that fits: "
              f"{best}")
      else:
        out.append(at(batch))
        _print(out[-1])
  print(f"{target.compiler}, topology {FLAGS.topology} ({len(devices)} x "
        f"{devices[0].device_kind}, {hbm / GIB:.2f} GiB per chip for the program)")
  common.write_json(FLAGS.json_out, results)


if __name__ == "__main__":
  app.run(main)
