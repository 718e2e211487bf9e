#!/bin/sh
# Create a session over the compose federation's participants, start it and follow it to
# its end: what an operator would type, in one step.
#
#   docker compose -f deploy/compose/compose.yaml run --rm session [SPEC]
#
# SPEC (default /work/spec.toml, this folder) is a session spec in TOML whose
# `participants` is replaced by the peer IDs the participants published in $FEDNODE_SHARED
# (their entrypoint's FEDNODE_PEER_ID_FILE): listed peers are admitted without an invite,
# and they are already running, retrying until a session lists them.
set -eu
spec=${1:-/work/spec.toml}
shared=${FEDNODE_SHARED:-/shared}
want=${FEDNODE_PARTICIPANTS:-3}
wait_s=${FEDNODE_WAIT_S:-120}

die() {
	echo "start-session: $*" >&2
	exit 1
}

count_ids() {
	n=0
	for f in "$shared"/participant-*.id; do
		[ -s "$f" ] && n=$((n + 1))
	done
	echo "$n"
}

waited=0
until [ "$(count_ids)" -ge "$want" ] && [ -s "$shared/coordinator.id" ]; do
	[ "$waited" -ge "$wait_s" ] &&
		die "after ${wait_s} s, $shared holds $(count_ids) of $want participant IDs (is the federation up?)"
	sleep 1
	waited=$((waited + 1))
done
FEDCTL_COORDINATOR_ID=${FEDCTL_COORDINATOR_ID:-$(cat "$shared/coordinator.id")}
export FEDCTL_COORDINATOR_ID

work=$(mktemp -d "${TMPDIR:-/tmp}/session.XXXXXX")
trap 'rm -rf "$work"' EXIT
json=$work/spec.json # fedctl reads a spec by its extension
# TOML in, JSON out (fedctl takes either): the standard library reads TOML but cannot write it.
# shellcheck disable=SC2046 # one argument per peer ID
python3 - "$spec" $(cat "$shared"/participant-*.id) >"$json" <<'PY'
import json
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    spec = tomllib.load(f)
spec["participants"] = sys.argv[2:]
json.dump(spec, sys.stdout)
PY
created=$(fedctl session create "$json" --json) || die "fedctl session create: $created"
sid=$(printf '%s' "$created" | python3 -c 'import json, sys; print(json.load(sys.stdin)["session_id"])')
echo "session $sid: $(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["participants"]))' "$json") participants listed"
fedctl session start "$sid"
fedctl session watch "$sid"
fedctl session status "$sid"
status=$(fedctl session status "$sid" --json |
	python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')
[ "$status" = completed ] || die "session $sid ended $status"
