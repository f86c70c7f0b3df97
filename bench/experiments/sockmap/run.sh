#!/bin/bash
# Builds skm.c and runs it as root in a network namespace of its own (loopback only), which is
# deleted again however the run ends. Each run is killed after 58 s.
#   ./run.sh correct | bench <direct|sockmap|splice> <MiB> | stall <direct|sockmap|splice> | eof
set -e
cd "$(dirname "$0")"
[ skm -nt skm.c ] || gcc -O2 -Wall -pthread -o skm skm.c
ns=skmtest-$$
ip netns add "$ns"
trap 'ip netns del "$ns" 2>/dev/null' EXIT INT TERM
ip -n "$ns" link set lo up
set +e
ip netns exec "$ns" timeout -s KILL 58 ./skm "$@"
echo "rc=$?"
