#!/bin/sh
# Writes the secret files docker-compose.yml mounts (PostgreSQL's and MinIO's credentials) into ./secrets
# (or $FWSWEEP_SECRETS_DIR), each a fresh random value; never overwrites an existing one. The folder is
# 0700 (only you, on the host); the files 0644, because Compose bind-mounts them as they are and the
# containers read them as their own users (postgres, ray).
set -eu
dir="${FWSWEEP_SECRETS_DIR:-./secrets}"
umask 022
mkdir -p "$dir"
chmod 700 "$dir"
new() { [ -s "$dir/$1" ] || printf '%s' "$2" > "$dir/$1"; }
new postgres_password "$(openssl rand -hex 32)"
new minio_root_user "fwsweep"
new minio_root_password "$(openssl rand -hex 32)"
# The same key pair for boto3 (MLflow's artifact store) and pyarrow (Tune's storage).
new s3_credentials "$(printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' \
    "$(cat "$dir/minio_root_user")" "$(cat "$dir/minio_root_password")")"
echo "secrets in $dir: $(ls "$dir" | tr '\n' ' ')"
