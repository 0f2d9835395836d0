"""Per-case finding labels in the catalog (``umit labels``).

``context`` is a ConText/NegEx rule engine (negation, uncertainty, history, hypothesis,
experiencer; trigger, scope and termination), ``vocabulary`` reads findings vocabularies (the
default CT set ships in ``vocabularies/``), ``reports`` labels one report, ``table`` is the
catalog's ``labels`` table and its readers (finetune and pretrain use them), ``run`` is ``umit
labels from-reports``, ``evaluate`` scores the rules on the ConText annotated sentences, and
``aggregate`` is ``umit labels aggregate``: the consensus of several raters' label maps (STAPLE,
majority vote) as a label source of the catalog.

Layer: above :mod:`umit.ingest` (it reads the catalog and its pseudonymization) and below the
stages that consume labels (:mod:`umit.ssl`, :mod:`umit.finetune`).
"""
