"""Helpers shared by the tests and the benchmarks (bench/common.py puts tests/ on the path for the latter).

``cli_helpers`` (the CLI in-process), ``proc_helpers`` (the CLI as a subprocess), ``repl_helpers`` (raw-REPL
boards), ``mosquitto_fixture`` (a real broker), ``fleet_model`` + ``fleet_helpers`` (the fleet's tiny model and
its emulated boards), ``sparse_models`` (small pruned int8 .tflite models). The pytest plugin behind ``--board``
stays a top-level module, ``tests/hil_plugin.py``, registered by name in ``tests/conftest.py``.
"""
