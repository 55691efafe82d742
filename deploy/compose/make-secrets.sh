#!/bin/sh
# Write the secrets the compose stack mounts (deploy/compose/secrets/, git-ignored). Existing files
# are kept, so running it again never rotates a credential behind a running stack's back.
# Usage: ./make-secrets.sh [image]   (image: for nix-store when the host has no Nix)
set -eu
cd "$(dirname "$0")"
image=${1:-nixboot:0.1.0}
umask 077
mkdir -p secrets
chmod 700 secrets

random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

write_new() { # name, content: create only when missing
  if [ ! -e "secrets/$1" ]; then printf '%s\n' "$2" >"secrets/$1"; echo "wrote secrets/$1"; fi
}

if [ ! -e secrets/nats-auth.conf ]; then
  password=$(random_hex 24)
  printf '%s\n' "$password" >secrets/nats-password
  printf 'authorization {\n  user: nixboot\n  password: "%s"\n}\n' "$password" >secrets/nats-auth.conf
  echo "wrote secrets/nats-password and secrets/nats-auth.conf"
fi
if [ ! -e secrets/nixboot.toml ]; then
  cp nixboot.example.toml secrets/nixboot.toml
  echo "wrote secrets/nixboot.toml (edit it: cache.public_url, builder.flake, machines)"
fi
write_new api-token "$(random_hex 32)"
write_new grafana-admin-password "$(random_hex 16)"

if [ ! -e secrets/cache-signing-key ]; then
  if command -v nix-store >/dev/null 2>&1; then
    nix-store --generate-binary-cache-key nixboot-1 secrets/cache-signing-key secrets/cache-signing-key.pub
  else
    docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/secrets:/out" --entrypoint nix-store \
      "$image" --generate-binary-cache-key nixboot-1 /out/cache-signing-key /out/cache-signing-key.pub
  fi
  echo "wrote secrets/cache-signing-key (public key for clients: secrets/cache-signing-key.pub)"
fi

# Secrets are bind-mounted file by file: the directory stays private to this user, the files must
# be readable by the containers' uid 10001.
chmod 644 secrets/*
