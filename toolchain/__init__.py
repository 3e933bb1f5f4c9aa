"""Host toolchain: federated pruning, int8 export, verification and board packaging."""

__version__ = "0.1.0"
