"""Layer 6, tools: the commands around the package. ``reproduce`` (``make reproduce`` / ``make verify``; ``report`` is
its prose), ``verification`` (comparing two result sets), ``benchmarks`` (``make bench``), ``distributed``
(generation across processes), ``training`` (``make models``), and ``provenance`` (what every result file records
of how it was made). The commands run as ``python -m dode.tools.<name>``. See docs/design.md."""
