"""Value types every other package shares: errors, manifest, digests, units, bitfield,
the cluster token and buffer pools. Nothing here imports another package of the
project, so ``swarm``, ``seeder``, ``tracker`` and ``simulations`` can all depend on
it without depending on each other."""
