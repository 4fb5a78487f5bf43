"""The solvers: one module each (``base`` holds the protocol), the Markov family one folder."""
