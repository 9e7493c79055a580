"""Convergence benchmark: outer methods at equal tokens, judged by loss per byte.

Run it as `python -m bench.convergence --quick --json PATH [--plot PATH.png]`.
"""
