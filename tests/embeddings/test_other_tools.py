"""Files of other tools (OneTrainer, diffusers' SDXL script, the paper's own code) read as those
tools mean them, and ti_jax's exports checked against what A1111, ComfyUI, kohya and InvokeAI
accept: each tool's key and shape rules, restated here from their loaders."""

import os
import re

import numpy as np
import pytest

from ti_jax.embeddings import embedding_io, embedding_writer, file_names
from ti_jax.sampling import concepts as sampling_concepts
from ti_jax.weights import safetensors_io, tiny_tokenizer

DIM = 32
WIDTH_1, WIDTH_2 = 32, 48  # the tiny SDXL encoders' widths


def _vectors(n=1, width=DIM, seed=0):
  return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def _one(spec):
  (concept,) = embedding_io.load_concepts(str(spec))
  return concept


def _refusal(spec, error=embedding_io.EmbeddingFileError):
  with pytest.raises(error) as err:
    embedding_io.load_concepts(str(spec))
  message = str(err.value)
  assert "\n" not in message and "\x1b" not in message
  return message


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from transformers import CLIPTokenizer
  folder = str(tmp_path_factory.mktemp("tok"))
  tiny_tokenizer.write_tiny_clip_tokenizer(folder)
  return CLIPTokenizer.from_pretrained(folder)


# --- OneTrainer: {"emp_params": ...} (+ "emp_params_out"); SDXL clip_l/clip_g (+ *_out) -----

def test_onetrainer_file_registers_its_file_name_and_its_prompt_uses_it(tmp_path, tokenizer):
  """The issue's case: `--prompt "a photo of ot"` used none of the learned tokens."""
  path = tmp_path / "ot.safetensors"
  safetensors_io.save(str(path), {"emp_params": _vectors(2)})
  concept = _one(path)
  assert concept.token == "ot" and "file name" in concept.token_from and not concept.notes
  np.testing.assert_array_equal(concept.vectors[0], _vectors(2))
  tok, _ = sampling_concepts.tokenizer_with_concepts(tokenizer, [concept])
  # ("photo" would hold "ot": tokenizers split added tokens out of any word.)
  prompt, warnings = sampling_concepts.prepare_prompt("a drawing of ot", [concept], tok)
  assert prompt == "a drawing of ot ot_1" and not warnings


def test_onetrainer_output_vectors_are_ignored_with_a_note(tmp_path, capsys):
  path = tmp_path / "ot.safetensors"
  safetensors_io.save(str(path), {"emp_params": _vectors(1), "emp_params_out": _vectors(1, seed=1)})
  concept = _one(path)
  assert concept.token == "ot"
  np.testing.assert_array_equal(concept.vectors[0], _vectors(1))
  (note,) = concept.notes
  assert "emp_params_out" in note and "ignored" in note
  assert f"note: {note}" in capsys.readouterr().err  # load_concepts logs it for every caller
  # --config.init_embedding takes the file as one concept (it refused "2 tokens").
  from ti_jax.training import concept as training_concept
  init = training_concept._load_init_concept(str(path))  # pylint: disable=protected-access
  np.testing.assert_array_equal(init.vectors[0], _vectors(1))


def test_onetrainer_output_embedding_is_refused_naming_what_it_is(tmp_path):
  """OneTrainer writes zeros as the input vectors of an output embedding."""
  path = tmp_path / "out.safetensors"
  safetensors_io.save(str(path), {"emp_params": np.zeros((1, DIM), np.float32),
                                  "emp_params_out": _vectors(1)})
  message = _refusal(path)
  assert "output embedding" in message and "emp_params_out" in message
  alone = tmp_path / "alone.safetensors"
  safetensors_io.save(str(alone), {"emp_params_out": _vectors(1)})
  assert "output embedding" in _refusal(alone)


def test_onetrainer_sdxl_output_vectors_are_ignored_with_a_note(tmp_path):
  path = tmp_path / "ot-xl.safetensors"
  tables = {"clip_l": _vectors(2, WIDTH_1), "clip_g": _vectors(2, WIDTH_2),
            "clip_l_out": _vectors(2, WIDTH_1, 1), "clip_g_out": _vectors(2, WIDTH_2, 1)}
  safetensors_io.save(str(path), tables)
  concept = _one(path)
  assert concept.token == "ot-xl" and concept.widths == (WIDTH_1, WIDTH_2)
  np.testing.assert_array_equal(concept.vectors[1], tables["clip_g"])
  (note,) = concept.notes
  assert "clip_g_out" in note and "clip_l_out" in note
  tables["clip_l"] = np.zeros_like(tables["clip_l"])
  safetensors_io.save(str(path), tables)
  assert "output embedding" in _refusal(path)


# --- diffusers' textual_inversion_sdxl.py: learned_embeds[_2]-steps-N.safetensors ----------

def _diffusers_pair(folder, step, seed=0, n=2):
  """The pair diffusers' SDXL script saves every --save_steps (or at the end, step None)."""
  steps = "" if step is None else f"-steps-{step}"
  a, b = _vectors(n, WIDTH_1, seed), _vectors(n, WIDTH_2, seed)
  first = folder / f"learned_embeds{steps}.safetensors"
  safetensors_io.save(str(first), {"<cat>": a})
  safetensors_io.save(str(folder / f"learned_embeds_2{steps}.safetensors"), {"<cat>": b})
  return first, a, b


def test_intermediate_diffusers_pair_is_read_as_one_sdxl_concept(tmp_path):
  first, a, b = _diffusers_pair(tmp_path, 500)
  concept = _one(first)
  assert concept.token == "<cat>" and "SDXL pair" in concept.token_from
  np.testing.assert_array_equal(concept.vectors[0], a)
  np.testing.assert_array_equal(concept.vectors[1], b)
  embedding_io.check_fits(concept, (WIDTH_1, WIDTH_2))
  # Half of the pair is never an SD embedding: an SD model refuses it naming both families.
  with pytest.raises(embedding_io.ModelFamilyError, match="SDXL"):
    embedding_io.check_fits(concept, (WIDTH_1,))
  # The second file alone is never an LDM (1280) embedding.
  message = _refusal(tmp_path / "learned_embeds_2-steps-500.safetensors")
  assert "second file" in message and f"pass {first}" in message
  assert file_names.second_file(str(first)) == str(tmp_path /
                                                     "learned_embeds_2-steps-500.safetensors")


def test_lone_second_file_of_a_diffusers_pair_is_refused(tmp_path):
  for name in ("learned_embeds_2-steps-500.safetensors", "learned_embeds_2.safetensors"):
    folder = tmp_path / name.split(".")[0]
    folder.mkdir()
    safetensors_io.save(str(folder / name), {"<cat>": _vectors(1, WIDTH_2)})
    message = _refusal(folder / name)
    assert "second file of a diffusers SDXL pair" in message
    assert name.replace("_2", "") in message


def test_folder_of_intermediate_saves_reads_the_newest_pair(tmp_path, capsys):
  _diffusers_pair(tmp_path, 500, seed=0)
  _, a, b = _diffusers_pair(tmp_path, 1000, seed=1)
  concept = _one(tmp_path)
  np.testing.assert_array_equal(concept.vectors[0], a)
  np.testing.assert_array_equal(concept.vectors[1], b)
  assert concept.source.endswith("learned_embeds-steps-1000.safetensors")
  assert "learned_embeds-steps-1000.safetensors" in capsys.readouterr().err
  # The final pair, once written, wins over every intermediate one (as in diffusers).
  _, a, _ = _diffusers_pair(tmp_path, None, seed=2)
  np.testing.assert_array_equal(_one(tmp_path).vectors[0], a)


# --- the paper's own .pt (rinongal/textual_inversion): string_to_param is an nn.ParameterDict

def test_paper_pt_with_a_parameter_dict_is_read(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "embeddings_gs-6099.pt"
  vectors = _vectors(2)
  # As the paper's EmbeddingManager.save writes it: the token id is a tensor, the vectors a
  # Parameter inside an nn.ParameterDict.
  torch.save({"string_to_token": {"*": torch.tensor(265)},
              "string_to_param": torch.nn.ParameterDict(
                  {"*": torch.nn.Parameter(torch.from_numpy(vectors))})}, str(path))
  concept = _one(path)
  assert concept.token == "embeddings_gs-6099" and "file name" in concept.token_from
  np.testing.assert_array_equal(concept.vectors[0], vectors)
  assert _one(f"{path}:<paper>").token == "<paper>"


def test_paper_pt_with_per_image_tokens_is_refused_in_one_line(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "per_image.pt"
  params = {s: torch.nn.Parameter(torch.ones(1, DIM)) for s in ("*", "a", "b")}
  torch.save({"string_to_param": torch.nn.ParameterDict(params)}, str(path))
  assert "holds 3 terms" in _refusal(path)


class _RunsCode:
  """Unpickling this runs a shell command: what a malicious .pt file does."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_pt_files_that_would_run_code_are_refused_without_running_it(tmp_path):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "ran"
  plain = tmp_path / "plain.pt"
  torch.save({"string_to_param": {"*": torch.ones(1, DIM)}, "x": _RunsCode(marker)}, str(plain))
  # The same code hidden in the state of a ParameterDict, the one class read for the paper.
  inside = tmp_path / "inside.pt"
  params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(1, DIM))})
  params.payload = _RunsCode(marker)  # pickled with the module's attributes
  torch.save({"string_to_param": params}, str(inside))
  for path in (plain, inside):
    message = _refusal(path)
    assert "refused" in message and "system" in message
  assert not marker.exists()
  # Calling the ParameterDict class (a REDUCE: a hand-written pickle, as torch.save never
  # writes one) instead of rebuilding it is refused too.
  hostile = tmp_path / "reduce.pt"
  with open(hostile, "wb") as f:
    f.write(b"\x80\x02ctorch.nn.modules.container\nParameterDict\nq\x00X\x01\x00\x00\x00xq\x01"
            b"\x85q\x02Rq\x03.")
  assert "cannot read" in _refusal(hostile)


# --- what other tools read: their key and shape rules, restated from their loaders --------

def _tables(path):
  """The file's top level as those tools load it (safetensors, or torch.load of a dict)."""
  if path.endswith(".safetensors"):
    return dict(safetensors_io.load(path))
  torch = pytest.importorskip("torch")
  return torch.load(path, weights_only=True)


def _array(x):
  return np.asarray(x.detach().numpy() if hasattr(x, "detach") else x)


def _invokeai(path):
  """The base InvokeAI's probe installs a file as, or why it refuses it.

  Its probe (invokeai/backend/model_manager/configs/textual_inversion.py) takes the
  token width as the last dimension of string_to_param's first tensor (with
  string_to_token present), of emb_params or of clip_g, and otherwise as the
  FIRST dimension of the file's first tensor; 768 is SD 1, 1024 SD 2, 1280 SDXL.
  """
  tables = _tables(path)
  if "string_to_token" in tables:
    width = _array(next(iter(tables["string_to_param"].values()))).shape[-1]
  elif "emb_params" in tables:
    width = _array(tables["emb_params"]).shape[-1]
  elif "clip_g" in tables:
    width = _array(tables["clip_g"]).shape[-1]
  else:
    width = _array(next(iter(tables.values()))).shape[0]
  base = {768: "sd-1", 1024: "sd-2", 1280: "sdxl"}.get(width)
  return base or f"unrecognized token dimension {width}"


def _a1111(path):
  """The widths A1111 reads (modules/textual_inversion: string_to_param's one term, an SDXL
  clip_l/clip_g pair, or a file of exactly one tensor), or None where it refuses the file."""
  tables = _tables(path)
  if "string_to_param" in tables:
    params = tables["string_to_param"]
    return (_array(next(iter(params.values()))).shape[-1],) if len(params) == 1 else None
  if "clip_l" in tables and "clip_g" in tables:
    return _array(tables["clip_l"]).shape[-1], _array(tables["clip_g"]).shape[-1]
  return (_array(next(iter(tables.values()))).shape[-1],) if len(tables) == 1 else None


def _comfyui(path, key):
  """The width ComfyUI's load_embed reads for the text encoder whose key is `key` (clip_l for
  SD 1.x and SDXL's first encoder, clip_g for SDXL's second): string_to_param's first term,
  the tensor under `key`, else the file's first tensor."""
  tables = _tables(path)
  if "string_to_param" in tables:
    return _array(next(iter(tables["string_to_param"].values()))).shape[-1]
  return _array(tables[key] if key in tables else next(iter(tables.values()))).shape[-1]


def _kohya(path, sdxl):
  """The widths kohya's sd-scripts read: clip_l and clip_g for SDXL; else (inside
  string_to_param when present) the first tensor."""
  tables = _tables(path)
  tables = tables.get("string_to_param", tables)
  if sdxl:
    return ((_array(tables["clip_l"]).shape[-1], _array(tables["clip_g"]).shape[-1])
            if "clip_l" in tables and "clip_g" in tables else None)
  return (_array(next(iter(tables.values()))).shape[-1],)


@pytest.mark.parametrize("fmt", embedding_writer.FORMATS)
@pytest.mark.parametrize("widths", [(768,), (1024,), (768, 1280)])
def test_each_export_is_read_by_the_tools_the_readme_names(tmp_path, fmt, widths):
  """README's interop tables, checked: a1111, a1111-pt and kohya files go to every tool;
  the diffusers file (and pair) to diffusers, and for SD also to A1111, ComfyUI and kohya."""
  if fmt == "a1111-pt":
    pytest.importorskip("torch")
  vectors = [_vectors(2, w) for w in widths]
  concept = embedding_io.Concept("<toy>", tuple(vectors), "")
  path = str(tmp_path / embedding_writer.default_filename("<toy>", fmt))
  os.makedirs(os.path.dirname(path))
  embedding_writer.write_embedding_file(path, concept, fmt)
  sdxl = len(widths) == 2
  diffusers = fmt == "diffusers"
  expected_base = {(768,): "sd-1", (1024,): "sd-2", (768, 1280): "sdxl"}[widths]
  if diffusers:  # its probe reads the [n, width] tensor as n wide
    assert _invokeai(path) == "unrecognized token dimension 2"
  else:
    assert _invokeai(path) == expected_base
  # A1111, kohya and ComfyUI take SDXL vectors from a clip_l/clip_g file only: A1111 reads
  # the pair's first file as an SD 1.x embedding and ComfyUI gives its 768-wide vectors to
  # both encoders (the second refuses them). For SD every export works in all three.
  comfy = tuple(_comfyui(path, k) for k in ("clip_l", "clip_g")[:len(widths)])
  if diffusers and sdxl:
    assert _a1111(path) == (768,) and _kohya(path, sdxl) is None and comfy == (768, 768)
  else:
    assert _a1111(path) == _kohya(path, sdxl) == comfy == widths
  if not sdxl:  # diffusers' load_textual_inversion: a one-key file's key, else A1111's name
    tables = _tables(path)
    registered = next(iter(tables)) if len(tables) == 1 else tables["name"]
    # so the a1111 and kohya files need token="<toy>", as README says
    assert registered == ("emb_params" if fmt in ("a1111", "kohya") else "<toy>")


def test_a1111_safetensors_export_holds_emb_params_only(tmp_path):
  """The one key A1111 (a file of one tensor), ComfyUI, kohya and InvokeAI all read."""
  path = str(tmp_path / "<toy>.safetensors")
  embedding_writer.write_embedding_file(path, embedding_io.Concept("<toy>", _vectors(2), ""),
                                        "a1111")
  assert list(safetensors_io.read_shapes(path)) == ["emb_params"]
  assert _one(path).token == "<toy>"
  old = str(tmp_path / "old.safetensors")  # ti_jax's earlier a1111 layout still reads
  safetensors_io.save(old, {"string_to_param.*": _vectors(2)})
  assert _one(old).token == "old"


# InvokeAI names a model after its file and finds it in a prompt as <NAME>, where NAME has
# only these characters (invokeai/app/util/ti_utils.py).
_INVOKEAI_TRIGGER = re.compile(r"<[a-zA-Z0-9., _-]+>")


@pytest.mark.parametrize("fmt", ["a1111", "a1111-pt", "kohya"])
def test_usage_line_says_what_to_type_in_invokeai(fmt):
  default = embedding_writer.default_filename("<toy>", fmt)  # <toy>.safetensors: trigger <<toy>>
  line = file_names.prompt_usage(f"export/{default}", "<toy>", fmt)
  ext = os.path.splitext(default)[1]
  assert f"InvokeAI: export again with --output export/{fmt}/toy{ext}" in line
  assert "and type <toy>" in line
  assert _INVOKEAI_TRIGGER.findall("a photo of <toy>") == ["<toy>"]
  assert _INVOKEAI_TRIGGER.findall("a photo of <<toy>>") == ["<toy>"]  # not the model <toy>
  line = file_names.prompt_usage(f"out/toy{ext}", "<toy>", fmt)  # a name InvokeAI can use
  assert "InvokeAI: install it and type <toy>" in line
  assert "InvokeAI" in file_names.prompt_usage("x/learned_embeds.safetensors", "<toy>",
                                                "diffusers")


def test_invokeai_name_keeps_what_its_triggers_allow():
  assert file_names.invokeai_name("<my-style>") == "my-style"
  assert file_names.invokeai_name("sks") == "sks"
  assert file_names.invokeai_name("<café art>") == "caf__art"
  assert file_names.invokeai_name("<>") == "embedding"
