"""Training-time data: readers with geometry, datasets, transforms, samplers, phantoms."""
