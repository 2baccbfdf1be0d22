# Shared by the docker/ scripts. Sourced, not run.
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

# The compose project: container names tandem-<service>, networks tandem_<name>.
project="tandem"
compose=(docker-compose -p "$project" -f docker/compose.yml)
# The DC2 gateway, published on the host (docker/compose.yml), and the DC1 one.
gw2_url="http://127.0.0.1:19542"
gw1_url="http://127.0.0.1:19541"
prometheus_url="http://127.0.0.1:19090"

# wait_leader SECS: until the DC2 gateway's topology names a writable cluster and two readable
# ones (the alternative has caught up), or fail after SECS.
wait_leader() {
  local limit="$1" started doc
  started=$(date +%s)
  while :; do
    doc="$(curl -sf --max-time 2 "$gw2_url/global-cluster/topology" 2>/dev/null || true)"
    if [ -n "$doc" ] && python3 -c '
import json, sys
cs = json.loads(sys.argv[1])["data"]["clusters"]
sys.exit(0 if any(c["capability"] & 2 for c in cs) and sum(1 for c in cs if c["capability"] & 1) >= 2 else 1)
' "$doc" 2>/dev/null; then
      echo "$doc"
      return 0
    fi
    if [ $(($(date +%s) - started)) -ge "$limit" ]; then
      echo "error: no leader with a caught-up alternative within ${limit}s; topology: ${doc:-none}" >&2
      "${compose[@]}" ps >&2 || true
      return 1
    fi
    sleep 1
  done
}
