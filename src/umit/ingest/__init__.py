"""Offline, identifier-touching ingestion: DICOM / NIfTI / NRRD / collections -> NIfTI + catalog."""
