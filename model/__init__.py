"""Model layer: weights, generation engine, moderation. Knows nothing of web or database."""
