"""De-identification, low level: used by ``umit ingest`` and the ``umit deid`` stage.

* :mod:`~umit.deid.profile`: DICOM PS3.15 Annex E Table E.1-1 as data, its options and the
  burned-in policy; the one source of which attributes identify a person.
* :mod:`~umit.deid.safe_private`: the vendor private elements the Retain Safe Private option
  keeps, matched by private creator and element offset.
* :mod:`~umit.deid.secret`: the pseudonymization secret, keyed pseudonyms, UID replacement and
  per-patient date shifts.
* :mod:`~umit.deid.allowlist`: the catalog / NIfTI attribute allowlist, derived from the profile.
* :mod:`~umit.deid.engine`: de-identification of a dataset, file or folder (``umit deid``).
* :mod:`~umit.deid.check`: residual-identifier scan (``umit deid --check``).
* :mod:`~umit.deid.synth`: synthetic DICOM with planted identifiers (tests, benchmark).

This package imports only :mod:`umit.errors`, :mod:`umit.config`, :mod:`umit.utils`,
:mod:`umit.data` and third-party libraries, never a pipeline stage.
"""
