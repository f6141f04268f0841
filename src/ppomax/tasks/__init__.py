"""Old path of :mod:`ppomax.studies.tasks` (``ppomax.tasks.reviews`` is an alias that warns once)."""
