"""ClientApp: a fleet node, driving the devices its SuperNode's node config names through the coordinator."""

from toolchain.pipelines.fleetnode import make_fleet_client_app

app = make_fleet_client_app()
