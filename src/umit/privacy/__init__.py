"""Privacy tools: DICOM de-identification (PS3.15 Annex E), residual-identifier checks."""
