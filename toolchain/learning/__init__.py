"""Layer 2, learning: the federated engine (`fl`), pruning algorithms (`pruning`, one file each) and the Flower adapter (`flower`)."""
