"""ServerApp: round seeds, learning rate and the server step of ``toolchain serve``, over the fleet nodes."""

from toolchain.pipelines.fleetnode import make_fleet_server_app

app = make_fleet_server_app()
