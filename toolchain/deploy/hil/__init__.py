"""Hardware-in-the-loop conformance suite (docs/hil.md): ``toolchain.deploy.hil.suite`` (the checks), ``toolchain.cli.hil``
(``toolchain hil``), ``toolchain.package.testbuild`` (a small real build folder for CI)."""

CHECKS = ("identity", "bundle", "inference", "zo_round", "heap", "protocol")
