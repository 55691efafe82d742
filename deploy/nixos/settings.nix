# What services.nixboot writes to nixboot.toml, and the ports it opens. Pure Nix (builtins only, no
# nixpkgs) so that a test evaluates it on its own and feeds the result to nixboot's config loader:
# the option names have one source of truth, shared/src/nixboot_shared/config.py.
rec {
  # Each service's full HTTP listen table. Written out whole because config.py fills a partly given
  # table from HttpListen's own defaults, not the service's: `cache.http.port = 9080` alone would
  # otherwise move the cache to 127.0.0.1.
  httpDefaults = {
    tftp = { host = "127.0.0.1"; port = 8083; };
    cache = { host = "0.0.0.0"; port = 8080; };
    builder = { host = "127.0.0.1"; port = 8081; };
    dhcp_hook = { host = "127.0.0.1"; port = 8082; };
  };

  # The TOML document: the user's settings plus what the module decides (NATS URL, replicas, state).
  # Secret file paths are not here: each unit gets them as NIXBOOT_* environment overrides pointing
  # into its own systemd credentials directory.
  render =
    {
      settings,
      natsUrl,
      replicas,
    }:
    settings
    // builtins.mapAttrs (
      section: http: (settings.${section} or { }) // { http = http // (settings.${section}.http or { }); }
    ) httpDefaults
    // {
      nats = (settings.nats or { }) // {
        url = natsUrl;
        inherit replicas;
      };
    };

  # Listening ports, with the defaults of config.py where the settings leave them out.
  ports = settings: {
    tftp = settings.tftp.port or 69;
    tftpHttp = settings.tftp.http.port or 8083;
    cache = settings.cache.http.port or 8080;
    builder = settings.builder.http.port or 8081;
    dhcpHook = settings.dhcp_hook.http.port or 8082;
  };

  # The HTTP port (metrics, health, API) of each service, by service name.
  httpPorts = settings:
    let p = ports settings;
    in {
      "dhcp-hook" = p.dhcpHook;
      tftp = p.tftpHttp;
      builder = p.builder;
      cache = p.cache;
    };
}
