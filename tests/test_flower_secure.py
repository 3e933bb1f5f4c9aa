"""A secure deployment on localhost: TLS (a CA and server certificate made here with ``cryptography``),
SuperNode authentication (each node's key registered with ``flwr supernode register``; an unregistered
node is refused), and node-local data (each SuperNode reads only its own shard folder). Results must
equal the in-process engine's.
"""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_tls_authenticated_supernodes_with_node_local_data(tmp_path):
    pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[flower]')")
    from toolchain.contracts.errors import ToolchainError
    from toolchain.learning.flower import make_spec
    from toolchain.learning.flower.driver import run_inprocess
    from toolchain.learning.flower.launch import LocalFederation, flwr_bin, free_port, run_deployment
    from toolchain.learning.flower.nodedata import export_shards
    from toolchain.learning.flower.security import make_node_key, make_pki
    from toolchain.pipelines.train import TrainOptions

    opts = TrainOptions(algo="gmp", out=str(tmp_path / "run"), clients=2, rounds=2, density=0.2, lr=0.05,
                        quiet=True, engine="flower", seed=2)
    spec = make_spec(opts, 400, 100)
    folders = export_shards(spec, tmp_path / "shards")
    pki = make_pki(tmp_path / "pki")
    keys = [make_node_key(tmp_path / "keys", f"node{i}") for i in range(2)]
    fed = LocalFederation(2, pki=pki, node_keys=keys, node_configs=[f"local-data='{f}'" for f in folders])
    try:
        fed.start()
        # a SuperNode whose key was never registered claims partition 0: if the SuperLink admitted it, the
        # run would fail ("two SuperNodes hold partition-id=0")
        intruder, _ = make_node_key(tmp_path / "keys", "intruder")
        fed.spawn("intruder", [flwr_bin("flower-supernode"), "--root-certificates", str(pki.ca_cert),
                               "--auth-supernode-private-key", str(intruder), "--superlink", fed.address,
                               "--host", "127.0.0.1", "--port", str(free_port()),
                               "--node-config", f"partition-id=0 num-partitions=2 local-data='{folders[0]}'"])
        with pytest.raises(ToolchainError, match="needs TLS"):  # --insecure only when asked
            run_deployment(spec, fed.address)
        summary = run_deployment(spec, fed.address, timeout=360, stream=False, **fed.security())
        intruder_log = fed.log("intruder")
    except Exception:
        print(fed.log("superlink")[-3000:], fed.log("supernode0")[-3000:], sep="\n----\n")
        raise
    finally:
        fed.stop()
    assert summary["rounds"] == 2
    assert not any("--insecure" in argv for argv in fed.argv.values())
    assert "--enable-supernode-auth" in fed.argv["superlink"]
    assert all("--auth-supernode-private-key" in fed.argv[f"supernode{i}"] for i in range(2))
    # same CA, address and flags as the admitted nodes, only its key is unknown: it is refused
    assert "Connection attempt failed" in intruder_log, intruder_log[-600:]

    ref_hist, ref = run_inprocess(make_spec(opts, 400, 100))
    got = torch.load(tmp_path / "run" / "model.pt")
    for k, v in ref.model.state_dict().items():
        assert torch.equal(got["state_dict"][k], v), k
    assert all(torch.equal(got["masks"][k], m) for k, m in ref.masks.items())
    rounds = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bytes_up"] for r in rounds] == [r.bytes_up for r in ref_hist]
