"""ClientApp: a node's side of the toolchain's strategies (one partition per SuperNode)."""

from toolchain.learning.flower.apps import make_client_app

app = make_client_app()
