"""Offline, identifier-touching ingestion: DICOM / NIfTI / NRRD / collections -> NIfTI + catalog."""

from umit.ingest.read import read_volume

__all__ = ["read_volume"]
