"""nixboot: network boot for fleets of NixOS machines."""
