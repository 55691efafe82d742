"""nixboot builder: Nix builds of each machine's generations."""
