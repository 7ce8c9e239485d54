"""PTQ methods: one algorithm per module; each quantizes one block given its inputs, never walks the model."""
