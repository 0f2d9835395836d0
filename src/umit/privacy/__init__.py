"""Privacy tools.

* :mod:`~umit.privacy.deid_profile`, :mod:`~umit.privacy.deid`: DICOM PS3.15 Annex E
  de-identification (``umit deid``); :mod:`~umit.privacy.deid_check`: residual-identifier scan
  (``umit deid --check``); :mod:`~umit.privacy.deid_synth`: planted-identifier test files.
* :mod:`~umit.privacy.deface`: face removal from head MRI/CT (``umit deface``).
* :mod:`~umit.privacy.audit`: membership-inference and near-duplicate audit (``umit audit privacy``).
* :mod:`~umit.train.dp`: DP-SGD fine-tuning through Opacus (``umit finetune --dp``).
"""
