{
  # nixboot e2e: a NixOS-shaped generation (no nixpkgs) that really boots in a VM.
  # The test copies this directory to a temporary one and adds: busybox (static), kernel
  # (Debian's bzImage), initrd (the test initrd with stage1.sh), stage1.sh, and generation.nix
  # ({ tag = "..."; }: the knob that changes one package between generations).
  description = "nixboot e2e test system";
  outputs = { self }:
    let
      knobs = import ./generation.nix;
      system = import ./system.nix { inherit (knobs) tag; };
      # what machines nobody registered boot (the deployment's fallback_attr)
      fallbackSystem = import ./system.nix { tag = "fallback"; };
    in
    {
      nixosConfigurations.e2e = { config = system.config; };
      nixosConfigurations.e2e-fallback = { config = fallbackSystem.config; };
      packages.x86_64-linux.default = system.config.system.build.toplevel;
    };
}
