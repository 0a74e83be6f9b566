"""The measuring instruments behind eval.py: what it reports beyond the zero-shot protocol itself.

    metrics.py     AUROC, AUPRC and thresholded metrics with bootstrap intervals; calibration split
    official.py    the official BrgSA bootstrap procedure, number for number
    retrieval.py   report <-> volume retrieval and the modality gap
    grounding.py   per-patch heat maps on the scan's own grid, and their score against masks
    files.py       the tables, eval.json, CSVs and plots; the score-file mode's CSVs

Each module is imported by its own name (`from analysis import metrics`); this package re-exports
nothing. Nothing here imports train.py or eval.py.
"""
