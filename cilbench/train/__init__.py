"""Training: the one fit loop (engine) and the exemplar/reservoir memories."""
