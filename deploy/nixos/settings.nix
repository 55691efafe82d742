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
      # Set with a password file: the user name is not secret, the password stays in its file.
      natsUser ? "",
    }:
    settings
    // builtins.mapAttrs (
      section: http: (settings.${section} or { }) // { http = http // (settings.${section}.http or { }); }
    ) httpDefaults
    // {
      nats =
        (settings.nats or { })
        // {
          url = natsUrl;
          inherit replicas;
        }
        // (if natsUser != "" then { user = natsUser; } else { });
    };

  # The secret (or at least private) files a unit gets as systemd credentials, with the NIXBOOT_*
  # override that points nixboot at the credential's copy (%d/<id>). `nats` is the module's
  # services.nixboot.nats; null files are left out.
  credentials =
    {
      name,
      apiTokenFile ? null,
      cacheSecretKeyFile ? null,
      nats ? { },
    }:
    let
      tls = nats.tls or { };
      entry = id: path: env: if path == null then [ ] else [ { inherit id path env; } ];
    in
    entry "api-token" apiTokenFile "NIXBOOT_API_TOKEN_FILE"
    ++ entry "nats-credentials" (nats.credentialsFile or null) "NIXBOOT_NATS__CREDENTIALS_FILE"
    ++ entry "nats-password" (nats.passwordFile or null) "NIXBOOT_NATS__PASSWORD_FILE"
    ++ entry "nats-nkey-seed" (nats.nkeySeedFile or null) "NIXBOOT_NATS__NKEY_SEED_FILE"
    ++ entry "nats-tls-ca" (tls.caFile or null) "NIXBOOT_NATS__TLS_CA_FILE"
    ++ entry "nats-tls-cert" (tls.certFile or null) "NIXBOOT_NATS__TLS_CERT_FILE"
    ++ entry "nats-tls-key" (tls.keyFile or null) "NIXBOOT_NATS__TLS_KEY_FILE"
    ++ (if name == "cache" then entry "cache-signing-key" cacheSecretKeyFile "NIXBOOT_CACHE__SECRET_KEY_FILE" else [ ]);

  # What is wrong with the NATS options (the module turns each into a failed assertion). The local
  # NATS (enableLocal) must require authentication: a user nkey, whose public key alone goes into
  # the server's configuration (the Nix store is world-readable, a password would not belong
  # there), unless allowUnauthenticated says otherwise.
  natsProblems =
    nats:
    let
      tls = nats.tls or { };
      set = k: (nats.${k} or null) != null;
      methods = builtins.filter set [
        "passwordFile"
        "nkeySeedFile"
        "credentialsFile"
      ];
      local = nats.enableLocal or false;
      public = nats.nkeyPublicKey or null;
    in
    (if builtins.length methods > 1 then
      [ "services.nixboot.nats: choose one of ${builtins.concatStringsSep ", " methods}" ]
    else [ ])
    ++ (if set "passwordFile" && (nats.user or "") == "" then
      [ "services.nixboot.nats.passwordFile needs services.nixboot.nats.user" ]
    else [ ])
    ++ (if ((tls.certFile or null) == null) != ((tls.keyFile or null) == null) then
      [ "services.nixboot.nats.tls: set both certFile and keyFile, or neither" ]
    else [ ])
    ++ (if public != null && builtins.match "U[A-Z2-7]{55}" public == null then
      [ "services.nixboot.nats.nkeyPublicKey: not a user nkey (U followed by 55 base32 characters)" ]
    else [ ])
    ++ (if local && !(nats.allowUnauthenticated or false) && (public == null || !(set "nkeySeedFile")) then
      [ ("services.nixboot.nats: the local NATS requires authentication: set nkeyPublicKey and "
        + "nkeySeedFile (`nk -gen user -pubout`), or allowUnauthenticated = true") ]
    else [ ]);

  # services.nats.settings.authorization for the local NATS: the one nixboot user, by public nkey.
  natsAuthorization =
    nats:
    if (nats.nkeyPublicKey or null) != null then
      { users = [ { nkey = nats.nkeyPublicKey; } ]; }
    else
      null;

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
