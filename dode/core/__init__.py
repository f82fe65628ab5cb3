"""Layer 3, the core: D-ODE itself, over diffusers schedulers. Bottom to top:

- ``schedule`` (the noise schedule's maths), ``timegrid`` (where a scheduler's states are), ``ipndm`` (the paper's
  PNDM), ``solvers`` (the base solvers as the paper configures them, their spacings);
- ``scheduler`` (``DODEScheduler``: a base scheduler plus one lambda per model evaluation);
- ``sampling`` (the one integration loop), ``teacher`` (the many-step reference), ``ode`` (the exact ODE of a model);
- ``fit`` (the paper's greedy fit), ``refine`` (lambdas and grids by Rprop);
- ``distill`` (the public ``distill``: spacings, the never-worse guard, refinement starts).

See docs/design.md for the method and the conventions.
"""
