"""nixboot cache: Nix binary cache and boot files over HTTP."""
