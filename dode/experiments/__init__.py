"""Layer 5, experiments: what the notebooks run. The parameters every notebook takes (``parameters``) and their
checks (``checks``), evaluating grids of solvers x NFE (``evaluate``) and summarising them (``summary``), the
ablation studies (``studies``), the result row kinds (``variants``), and the tables (``tables``) and figures
(``plots``) made from them. Provenance is a tool's (``dode.tools.provenance``). See docs/design.md."""
