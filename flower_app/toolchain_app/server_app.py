"""ServerApp: the toolchain's server loop (``toolchain.fl.simulator.play_round``) over Flower messages."""

from toolchain.flower.apps import make_server_app

app = make_server_app()
