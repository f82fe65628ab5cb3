"""Layer 1, utilities: where dode runs (``runtime``: devices, threads, the machine a result was made on, the
weights folder) and how it gets what is not shipped (``hub``: the HuggingFace Hub, failing fast offline).
Nothing here knows about diffusion. See docs/design.md for the layers."""
