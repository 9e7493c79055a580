"""Research variants of the outer methods: run by the convergence benchmark, refused by the daemon.

`diloco` (fp32 all-reduce), `sparseloco` (all-gather of sparse messages) and `gossip-sparseloco` (V-A:
pairwise gossip with relays) need more than one partner's message a round; the daemon exchanges with exactly
one partner, so they are not in the installed package. They are the baselines the product's pairwise
methods are measured against (docs/outer-methods.md: DiLoCo, SparseLoCo, V-A gossip). Each is one module with
the product methods' interface; importing this package registers them into the product's dispatch
(`shoal.gossip.outer.methods.register`), so that `OuterConfig`, `make_message` and `outer_step` take them by
name in the benchmark and its tests. The worker still refuses them: it offers only `methods.METHODS` whose
`TOPOLOGY` is "pair".
"""

from bench.convergence.research import diloco, gossip_sparseloco, sparseloco
from shoal.gossip.outer import sparseloco as sparse_math
from shoal.gossip.outer.methods import register

RESEARCH_METHODS = ("diloco", "sparseloco", "gossip-sparseloco")

# Tuned by `python -m bench.convergence --sweep` at the CI size, as `methods.TUNED`; losses (nats/byte) of the
# values tried, best first.
register(
    "diloco",
    diloco,
    topology="all",
    tuned={"lr": diloco.DEFAULT_LR, "momentum": diloco.DEFAULT_MOMENTUM},  # η 0.3: 2.332; 0.4: 2.346
)
register(
    "sparseloco",
    sparseloco,
    topology="all",
    tuned={"lr": sparse_math.DEFAULT_LR},  # top-k 64/4096: 2.273; 128/4096: 2.298
)
register(
    "gossip-sparseloco",
    gossip_sparseloco,
    topology="gossip",
    tuned={"lr": 1.75},  # 1.75: 2.443; 2.5: 2.474; 3.5: 2.546
)
