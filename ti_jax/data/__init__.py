"""Training data for textual inversion: concept images, views, prompts and tokens.

Modules: `image_loader` (the concept's image files and their views), `latent_cache`
(the views VAE-encoded once), `choices` (the per-example draws), `captions`
(templates, caption files and templates files, prompts and their token ids).

Textual inversion learns one pseudo-word from a handful (3-5) of images of a
concept.  The only augmentation is an optional horizontal flip (the crop is
deterministic), so an image can only ever be seen as one of ``V`` distinct
*views*: the ``N`` images themselves and, when flipping is on, their ``N``
mirrors.  The trainer therefore VAE-encodes every view once (`view_pixels`)
and caches the latent posteriors (`latent_cache`); each step it only has to pick, per example,
a view index and a prompt template (`example_choices`), fill the template with
the placeholder token (`build_prompts`) and tokenize it (`tokenize`). An image
with a caption file (`caption_extension`) trains on its caption instead; every
prompt's ids are computed once at start-up (`prompt_tables`, `caption_tables`)
and a step only picks rows (`batch_input_ids`).

All randomness is a pure function of ``(seed, step, global example index)``,
so a run gives the same examples however many hosts or devices share the
global batch.  Everything here is pure: nothing is printed or logged; problems
with individual files come back as one-line warnings for the entry point to
log, and fatal problems raise `DataError` with a one-line message.
"""
