# Knobs of the demo flake. Tests and `make run` rewrite this file in their own copy of the flake.
{
  # Version string of the "demo-app" package: changing it makes a new generation that changes
  # demo-app and the paths that refer to it (system-path, etc, toplevel) and nothing else.
  appVersion = "1.0";
  # Size of each package's deterministic pseudo-random payload, in KiB (busybox awk makes ~1 MiB/s).
  payloadKiB = 64;
  # Extra kernel parameters written to toplevel/kernel-params.
  kernelParams = "loglevel=4";
  # Seconds demo-app's build sleeps (tests use it to kill a builder in the middle of a build).
  buildDelaySeconds = 0;
}
