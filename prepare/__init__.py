"""Everything that turns outside material into what train.py and eval.py consume.

    python -m prepare.phantom      # the synthetic chest-CT set in CT-RATE layout (the default data)
    python -m prepare.summarize    # report summaries (offline rules, or an OpenAI-compatible LLM)
    python -m prepare.preprocess   # CT-RATE / RAD-ChestCT / NIfTI folders -> preprocessed caches
    python -m prepare.pretrained   # check a BERT or ViT checkpoint against our encoders

Each module is imported by its own name (`from prepare import summarize`); this package re-exports
nothing. The method's files (cmki.py, model.py, kernels/) never import from here.
"""
