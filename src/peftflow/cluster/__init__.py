"""Many runs at once: each run of a comparison, an experiment or a sweep in a process of its own
(:mod:`.isolated`), on the runner the ``runner:`` params name (:mod:`.params`)."""
