"""Privacy tools.

* :mod:`~umit.privacy.deface`: face removal from head MRI/CT (``umit deface``).
* :mod:`~umit.privacy.audit`: membership-inference and near-duplicate audit (``umit audit privacy``).

DP-SGD (Opacus) is a training mechanism and lives in :mod:`umit.train.dp` (``umit finetune
--dp``); DICOM de-identification (PS3.15 Annex E, ``umit deid`` and ``umit deid --check``) lives
in the ground-layer package :mod:`umit.deid`, which ``umit ingest`` shares.
"""
