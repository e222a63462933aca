#!/bin/sh
# HAProxy as Ray Serve runs it (BINARY -db -f CONFIG [options]) for cluster.serve's HAProxy ingress, with the two
# listeners Ray's config binds on every interface (HAProxy's stats page `bind *:PORT`, its Prometheus metrics
# `bind :PORT`) bound to 127.0.0.1 instead: serving opens no port to the network but the one the user asked for
# (serve.host:serve.port, written with its address and left as it is). DEEPLAB_HAPROXY_BINARY: the real binary.
set -eu
config=""
previous=""
for arg in "$@"; do
    if [ "$previous" = "-f" ]; then config=$arg; fi
    previous=$arg
done
if [ -n "$config" ]; then
    sed -i -E 's/^([[:space:]]*bind[[:space:]]+)\*?:([0-9])/\1127.0.0.1:\2/' "$config"
fi
exec "${DEEPLAB_HAPROXY_BINARY:?names no HAProxy binary to run}" "$@"
