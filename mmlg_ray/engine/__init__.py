"""The experiment engine, without Ray: the stage sequence and its bookkeeping, the search, trial rows, artifacts by reference, input checks."""
