#!/bin/sh
# Makes the deployment's secrets in a directory (default: compose/secrets, git-ignored):
#   redis_password  Redis's password (compose: the redis_password secret; k8s: Secret kvrelay-redis)
#   redis_url       the registry URL with that password (k8s: kvrelay-redis, key url)
#   shared_secret   signs KV handles, registry records and stored API keys (>= 16 bytes)
#   ca.crt, ca.key  a CA for kvrelay's mutual TLS; keep ca.key offline once certificates are made
#   tls.crt, tls.key  one certificate for every gRPC service, server and client, named
#                   kvrelay.internal (what KVRELAY_TLS__SERVER_NAME expects: workers are dialled by IP)
# Usage: sh compose/make-secrets.sh [DIR]. Files that exist are kept, so running it again is safe.
set -eu
dir=${1:-$(dirname "$0")/secrets}
umask 077
mkdir -p "$dir"
cd "$dir"
[ -s redis_password ] || openssl rand -hex 24 | tr -d '\n' > redis_password
[ -s redis_url ] || printf 'redis://:%s@redis:6379/0' "$(cat redis_password)" > redis_url
[ -s shared_secret ] || openssl rand -hex 32 | tr -d '\n' > shared_secret
if [ ! -s ca.crt ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj /CN=kvrelay-ca -keyout ca.key -out ca.crt 2>/dev/null
fi
if [ ! -s tls.crt ]; then
  printf 'subjectAltName=DNS:kvrelay.internal\nextendedKeyUsage=serverAuth,clientAuth\n' > tls.ext
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=kvrelay.internal \
    -keyout tls.key -out tls.csr 2>/dev/null
  openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
    -extfile tls.ext -out tls.crt 2>/dev/null
  rm -f tls.csr tls.ext ca.srl
fi
# Compose bind-mounts these files into containers that run as other users (10001, redis 999), so
# they must be readable by them; the directory (0700) keeps other users of this host out.
chmod 0700 .
chmod 0644 redis_password shared_secret ca.crt tls.crt tls.key
chmod 0600 redis_url ca.key
echo "secrets in $(pwd)"
