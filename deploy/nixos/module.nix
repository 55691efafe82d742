# NixOS module: services.nixboot runs any of the four nixboot services as hardened systemd units,
# next to nixpkgs' services.nats with JetStream (unless an external NATS is given).
#
#   imports = [ ./deploy/nixos/module.nix ];
#   services.nixboot = {
#     enable = true;                         # all four services; or services.<name>.enable
#     apiTokenFile = "/run/keys/nixboot-api-token";
#     cache.secretKeyFile = "/run/keys/nixboot-cache-key";
#     settings.cache.public_url = "http://10.0.0.1:8080";
#     nats.nkeySeedFile = "/run/keys/nixboot-nats.seed";   # the local NATS requires this nkey
#     nats.nkeyPublicKey = "U…";                            # `nk -gen user -pubout`
#     openFirewall = true;
#   };
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    mkMerge
    types
    literalExpression
    optional
    optionalAttrs
    filterAttrs
    mapAttrs'
    mapAttrsToList
    nameValuePair
    ;

  cfg = config.services.nixboot;
  pure = import ./settings.nix;
  settingsFormat = pkgs.formats.toml { };

  serviceNames = [
    "dhcp-hook"
    "tftp"
    "builder"
    "cache"
  ];
  enabled = filterAttrs (_: s: s.enable) cfg.services;
  anyEnabled = enabled != { };

  natsUrl = if cfg.nats.url != "" then cfg.nats.url else "nats://127.0.0.1:${toString cfg.nats.port}";
  configFile = settingsFormat.generate "nixboot.toml" (
    pure.render {
      inherit (cfg) settings;
      inherit natsUrl;
      inherit (cfg.nats) replicas;
      natsUser = if cfg.nats.passwordFile != null then cfg.nats.user else "";
    }
  );
  ports = pure.ports cfg.settings;
  httpPorts = pure.httpPorts cfg.settings;

  # Secret files, handed to each unit through systemd credentials (never world-readable, never in
  # the store); the unit's environment points nixboot at its own credentials directory (%d).
  credentials =
    name:
    pure.credentials {
      inherit name;
      inherit (cfg) apiTokenFile;
      cacheSecretKeyFile = cfg.cache.secretKeyFile;
      inherit (cfg) nats;
    };

  hardening = {
    DynamicUser = true;
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
      "~@resources"
    ];
    UMask = "0077";
    # No capability at all, except what tftp adds below.
    CapabilityBoundingSet = [ "" ];
    AmbientCapabilities = [ "" ];
  };

  unit =
    name:
    let
      creds = credentials name;
    in
    {
      description = "nixboot ${name}";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ] ++ optional cfg.nats.enableLocal "nats.service";
      wants = [ "network-online.target" ] ++ optional cfg.nats.enableLocal "nats.service";
      # The builder and the cache talk to the Nix daemon (nix build, nix-store --export).
      path = optional (name == "builder" || name == "cache") config.nix.package ++ [ pkgs.git ];
      environment = {
        NIXBOOT_CONFIG = "${configFile}";
        NIXBOOT_STATE_DIR = "/var/lib/nixboot-${name}";
        HOME = "/var/lib/nixboot-${name}";
      }
      // builtins.listToAttrs (map (c: nameValuePair c.env "%d/${c.id}") creds)
      // optionalAttrs (name == "dhcp-hook") {
        # The DHCP server's hook command writes here.
        NIXBOOT_DHCP_HOOK__SOCKET = "/run/nixboot-dhcp-hook/dhcp-hook.sock";
      };
      serviceConfig = mkMerge [
        hardening
        {
          ExecStart = "${cfg.package}/bin/nixboot serve ${name}";
          Restart = "on-failure";
          RestartSec = 2;
          StateDirectory = "nixboot-${name}";
          StateDirectoryMode = "0700";
          LoadCredential = map (c: "${c.id}:${c.path}") creds;
        }
        (mkIf (name == "tftp") {
          # UDP 69 is privileged: this one capability, for this one unit.
          CapabilityBoundingSet = lib.mkForce [ "CAP_NET_BIND_SERVICE" ];
          AmbientCapabilities = lib.mkForce [ "CAP_NET_BIND_SERVICE" ];
        })
        (mkIf (name == "dhcp-hook") {
          RuntimeDirectory = "nixboot-dhcp-hook";
          # The DHCP server (another user) must reach the socket; the token guards the HTTP API.
          RuntimeDirectoryMode = "0755";
          UMask = lib.mkForce "0011";
        })
        (mkIf (name == "builder" || name == "cache") {
          # nix talks to the daemon over its socket and needs to read /nix/var/nix/profiles.
          ReadWritePaths = [ "/nix/var/nix/daemon-socket" ];
          SystemCallFilter = lib.mkForce [ "@system-service" ];
        })
      ];
    };
in
{
  options.services.nixboot = {
    enable = mkEnableOption "all four nixboot services (dhcp-hook, tftp, builder, cache)";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The nixboot package (provides `bin/nixboot`).";
    };

    services = lib.genAttrs serviceNames (name: {
      enable = mkOption {
        type = types.bool;
        default = cfg.enable;
        defaultText = literalExpression "config.services.nixboot.enable";
        description = "Whether to run the nixboot ${name} service.";
      };
    });

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      example = literalExpression ''
        {
          cache.public_url = "http://10.0.0.1:8080";
          builder.flake = "git+https://git.example.org/lab/fleet";
          machines = [ { mac = "52:54:00:12:34:56"; name = "lab-01"; attr = "lab"; } ];
        }
      '';
      description = ''
        nixboot configuration, rendered to the TOML file every service reads (NIXBOOT_CONFIG).
        Keys and defaults: shared/src/nixboot_shared/config.py. `nats.url` and `nats.replicas` are
        set from the `nats` options; secrets go through the `*File` options, never here.
      '';
    };

    apiTokenFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/keys/nixboot-api-token";
      description = "File with the bearer token mutation APIs require (a systemd credential).";
    };

    cache.secretKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/keys/nixboot-cache-key";
      description = ''
        The cache's ed25519 signing key in Nix's `name:base64` form (`nix-store
        --generate-binary-cache-key`). Null: generated in the cache's state directory.
      '';
    };

    nats = {
      url = mkOption {
        type = types.str;
        default = "";
        example = "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222";
        description = "External NATS (a cluster: comma-separated). Empty: the local services.nats.";
      };
      enableLocal = mkOption {
        type = types.bool;
        default = cfg.nats.url == "" && anyEnabled;
        defaultText = literalExpression ''config.services.nixboot.nats.url == ""'';
        description = "Run nixpkgs' services.nats with JetStream on this host for nixboot.";
      };
      port = mkOption {
        type = types.port;
        default = 4222;
        description = "Port of the local NATS (loopback only).";
      };
      replicas = mkOption {
        type = types.ints.between 1 5;
        default = 1;
        description = "JetStream replicas of nixboot's streams and buckets (3 on a 3-node cluster).";
      };
      # Authentication: one of passwordFile (+ user), nkeySeedFile, credentialsFile. Every file
      # reaches the units as a systemd credential, never through the store.
      credentialsFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "NATS credentials (.creds: user JWT + nkey seed) for an operator-run NATS.";
      };
      user = mkOption {
        type = types.str;
        default = "nixboot";
        description = "NATS user name, used with passwordFile.";
      };
      passwordFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/keys/nixboot-nats-password";
        description = "File with the NATS password of `user` (an external NATS).";
      };
      nkeySeedFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/keys/nixboot-nats.seed";
        description = "File with nixboot's user nkey seed (`SU…`, from `nk -gen user -pubout`).";
      };
      nkeyPublicKey = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";
        description = ''
          The public half of nkeySeedFile (not secret). With the local NATS, it is the one user
          services.nats accepts; the local NATS requires it unless allowUnauthenticated.
        '';
      };
      allowUnauthenticated = mkOption {
        type = types.bool;
        default = false;
        description = "Run the local NATS without authentication (any local user can use the bus).";
      };
      tls = {
        caFile = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "CA certificate that verifies the NATS server (TLS on when set; or a tls:// url).";
        };
        certFile = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Client certificate for a NATS server that verifies clients (with keyFile).";
        };
        keyFile = mkOption {
          type = types.nullOr types.str;
          default = null;
          description = "Private key of certFile.";
        };
      };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open TFTP (UDP, tftp.port: 69) and the HTTP ports (TCP 8080 cache, 8081 builder, 8082
        dhcp-hook, 8083 tftp metrics; from settings) of the enabled services.
      '';
    };
  };

  config = mkIf anyEnabled {
    assertions = map (message: {
      assertion = false;
      inherit message;
    }) (pure.natsProblems cfg.nats);

    services.nats = mkIf cfg.nats.enableLocal {
      enable = true;
      jetstream = true;
      host = "127.0.0.1";
      port = cfg.nats.port;
      serverName = "nixboot-${config.networking.hostName}";
      # Only nixboot's nkey gets in (its public key is all the server needs).
      settings = lib.optionalAttrs (cfg.nats.nkeyPublicKey != null) {
        authorization = pure.natsAuthorization cfg.nats;
      };
    };

    systemd.services = mapAttrs' (name: _: nameValuePair "nixboot-${name}" (unit name)) enabled;

    networking.firewall = mkIf cfg.openFirewall {
      allowedUDPPorts = optional (enabled ? tftp) ports.tftp;
      allowedTCPPorts = mapAttrsToList (name: _: httpPorts.${name}) enabled;
    };

    services.prometheus.scrapeConfigs = mkIf config.services.prometheus.enable (
      mapAttrsToList (name: _: {
        job_name = "nixboot-${name}";
        static_configs = [ { targets = [ "127.0.0.1:${toString httpPorts.${name}}" ]; } ];
      }) enabled
    );
  };
}
