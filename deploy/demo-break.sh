#!/usr/bin/env bash
# The postmortem in miniature, against a running stack: put a concentrated config where balancer
# reads its config, ask for a reload, and watch the guard refuse it while traffic keeps flowing.
# The original file is put back on exit, whatever happens.
#
# The defaults fit `docker compose up` (the compose file mounts deploy/compose at /etc/balancer);
# deploy/local-stack.py sets the variables for its local processes. Exits non-zero if the reload
# was not refused or if the stack stopped spreading traffic.
set -euo pipefail
cd "$(dirname "$0")/.."

LIVE_CONFIG=${LIVE_CONFIG:-deploy/compose/balancer.yaml}
BROKEN_CONFIG=${BROKEN_CONFIG:-deploy/concentrated.yaml}
PROXY_URL=${PROXY_URL:-http://127.0.0.1:8080}
ADMIN_URL=${ADMIN_URL:-http://127.0.0.1:9100}
ADMIN_TOKEN=${ADMIN_TOKEN:-demo-only-token}
REQUESTS=${REQUESTS:-9}

workdir=$(mktemp -d)
cp "$LIVE_CONFIG" "$workdir/original.yaml"
# Written in place (not renamed over) so a single-file bind mount sees the change too.
restore() { cat "$workdir/original.yaml" > "$LIVE_CONFIG"; rm -rf "$workdir"; }
trap restore EXIT

serve() {  # $REQUESTS requests through the proxy: each must be 200; at least two backends answer
  local answered=()
  for _ in $(seq "$REQUESTS"); do
    backend=$(curl -fsS --max-time 5 -o /dev/null -D - "$PROXY_URL/" \
              | tr -d '\r' | awk -F': ' 'tolower($1) == "x-backend" {print $2}')
    answered+=("${backend:-?}")
  done
  echo "   200 x $REQUESTS, answered by: ${answered[*]}"
  distinct=$(printf '%s\n' "${answered[@]}" | sort -u | wc -l)
  if [ "$distinct" -lt 2 ]; then
    echo "!! traffic is not spread: only ${answered[0]} answered" >&2
    return 1
  fi
}

echo "== before: the stack serves, spread over the pool"
serve

echo "== a maintenance change drains the web fleet and pins one replica ($BROKEN_CONFIG)"
cat "$BROKEN_CONFIG" > "$LIVE_CONFIG"

echo "== POST $ADMIN_URL/reload"
code=$(curl -sS --max-time 10 -o "$workdir/answer" -w '%{http_code}' -X POST \
       -H "Authorization: Bearer $ADMIN_TOKEN" "$ADMIN_URL/reload")
sed 's/^/   /' "$workdir/answer"; echo
if [ "$code" != 409 ]; then
  echo "!! expected 409 (the guard refuses the config), got $code" >&2
  exit 1
fi
echo "   409: the guard refused it; the running config is untouched"

echo "== after: still serving with the config it had"
serve

echo "== the refusal, counted where the alerts and the dashboard see it"
curl -fsS --max-time 5 "$ADMIN_URL/metrics" | grep '^balancer_config_reloads_total' | sed 's/^/   /'
echo "== $LIVE_CONFIG put back"
