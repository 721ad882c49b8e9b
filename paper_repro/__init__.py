"""paper_repro: the unchanged ``dopsd_ref`` core driving diffusers' Z-Image and FLUX.2 models.

Modules:
    adapters  -- σ-velocity views of ``ZImageTransformer2DModel`` / ``Flux2Transformer2DModel``
    contexts  -- student text contexts and teacher contexts (hybrid VLM, FLUX.2 editing branch)
    lora      -- intended LoRA targets per backbone, coverage checks, pipeline-format export
    data      -- folder datasets of image-caption pairs with aspect-ratio buckets
    train     -- the training script (``python -m paper_repro.train --config ...``)
    evaluate  -- multi-seed generation and metric scripts
    tiny      -- tiny randomly initialised real-architecture components for CPU tests
"""
