"""Hardware-in-the-loop conformance suite (docs/hil.md): ``hw.hil.suite`` (the checks), ``hw.hil.cli``
(``toolchain hil``), ``hw.hil.testbuild`` (a small real build folder for CI)."""

CHECKS = ("identity", "bundle", "inference", "zo_round", "heap", "protocol")
