"""Layer 2, evaluation: how far one set of samples is from another. ``metrics`` (Frechet distance in a feature
space, RMSE, feature statistics) and ``features`` (the pixel, digits-classifier and Inception feature spaces).
Below the core, because the guard in ``dode.core`` scores students with these metrics. See docs/design.md."""
