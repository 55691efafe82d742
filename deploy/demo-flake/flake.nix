{
  description = "nixboot demo: NixOS-shaped systems from raw derivations, no inputs";
  outputs = { self }:
    let
      knobs = import ./knobs.nix;
      mkSystem = hostName: import ./system.nix { inherit hostName knobs; };
    in {
      # Two configurations sharing every package; they differ in /etc (host name) only.
      nixosConfigurations.demo = mkSystem "demo";
      nixosConfigurations.lab = mkSystem "lab";
    };
}
