# An example boot server: nixboot's services in two NixOS containers on one host, NATS (JetStream)
# and Prometheus on the host itself. Import it from the host's configuration.nix; secrets are
# files the administrator puts in /etc/nixboot/secrets (mode 0600, root), bind-mounted read-only.
#
#   containers:  nixboot-pxe    tftp + dhcp-hook, host network (PXE clients talk TFTP to the host's
#                                address; the DHCP server on the host runs the hook)
#                nixboot-store  builder + cache, host network too, builds through the host's Nix
#                                daemon (NixOS containers share the host store and daemon socket)
{ config, lib, ... }:

let
  secrets = "/etc/nixboot/secrets";
  natsUrl = "nats://127.0.0.1:${toString config.services.nats.port}";
  # NATS authentication is on: the host's NATS accepts only nixboot's user nkey. Create it once
  #   nk -gen user -pubout > /tmp/nk && head -1 /tmp/nk > ${secrets}/nats-nkey.seed
  # (mode 0600) and put the second line (the public key, not secret) here. Until then this
  # placeholder is not a valid nkey and NATS refuses to start: fail closed, never open.
  natsNkeyPublic = "UREPLACE-WITH-THE-PUBLIC-KEY-FROM-nk-gen-user-pubout";
  # Everything both containers agree on; per-container parts are added below.
  common = {
    imports = [ ./module.nix ];
    services.nixboot = {
      nats.url = natsUrl; # the host's NATS, not one per container
      nats.nkeySeedFile = "${secrets}/nats-nkey.seed";
      # TLS to a NATS on another host: nats.url = "tls://…"; nats.tls.caFile (+ certFile, keyFile).
      apiTokenFile = "${secrets}/api-token";
      settings = {
        log_level = "INFO";
        cache.public_url = "http://10.0.0.1:8080";
        machines = [
          {
            mac = "52:54:00:12:34:56";
            name = "lab-01";
            attr = "lab";
          }
        ];
      };
    };
    system.stateVersion = "24.11";
  };
  secretMount = {
    ${secrets} = {
      hostPath = secrets;
      isReadOnly = true;
    };
  };
in
{
  services.nats = {
    enable = true;
    jetstream = true;
    host = "127.0.0.1";
    serverName = "nixboot-${config.networking.hostName}";
    # No anonymous clients: only nixboot's nkey (the seed stays in ${secrets}).
    settings.authorization.users = [ { nkey = natsNkeyPublic; } ];
  };

  containers.nixboot-pxe = {
    autoStart = true;
    bindMounts = secretMount // {
      # The host's DHCP server (dnsmasq --dhcp-script / Kea hook) reaches the socket here.
      "/run/nixboot-dhcp-hook" = {
        hostPath = "/run/nixboot-dhcp-hook";
        isReadOnly = false;
      };
    };
    config = lib.recursiveUpdate common {
      services.nixboot.services.tftp.enable = true;
      services.nixboot.services.dhcp-hook.enable = true;
    };
  };

  containers.nixboot-store = {
    autoStart = true;
    bindMounts = secretMount;
    config = lib.recursiveUpdate common {
      services.nixboot.services.builder.enable = true;
      services.nixboot.services.cache.enable = true;
      services.nixboot.cache.secretKeyFile = "${secrets}/cache-signing-key";
      services.nixboot.settings.builder.flake = "git+https://git.example.org/lab/fleet";
    };
  };

  # The containers share the host network: open the ports here, where the firewall lives.
  networking.firewall.allowedUDPPorts = [ 69 ];
  networking.firewall.allowedTCPPorts = [ 8080 ];

  services.prometheus = {
    enable = true;
    listenAddress = "127.0.0.1";
    scrapeConfigs =
      map
        (svc: {
          job_name = "nixboot-${svc.name}";
          static_configs = [ { targets = [ "127.0.0.1:${toString svc.port}" ]; } ];
        })
        [
          {
            name = "cache";
            port = 8080;
          }
          {
            name = "builder";
            port = 8081;
          }
          {
            name = "dhcp-hook";
            port = 8082;
          }
          {
            name = "tftp";
            port = 8083;
          }
        ];
  };
}
