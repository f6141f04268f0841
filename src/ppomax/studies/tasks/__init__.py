"""The studies' tasks: prompts, a gold judge and data generators (:mod:`~ppomax.studies.tasks.reviews`)."""
