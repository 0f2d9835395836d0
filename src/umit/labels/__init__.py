"""Labels beyond the ones a dataset ships: consensus of several raters (``aggregate``)."""
