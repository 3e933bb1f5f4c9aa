"""ServerApp: the toolchain's server loop (``toolchain.learning.fl.simulator.play_round``) over Flower messages."""

from toolchain.learning.flower.apps import make_server_app

app = make_server_app()
