"""Neural ODEs trained with regularizers built from the adaptive solver's own estimates.

The solver lives in :mod:`zoo.ode.solver` (``solve_ivp``, Tsit5 and Dopri5 with per-step error
and stiffness estimates). This package imports nothing at load time, so that each submodule
can be imported on its own.
"""
