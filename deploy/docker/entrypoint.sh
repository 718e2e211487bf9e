#!/bin/sh
# The image's entrypoint (installed as /usr/local/bin/fednode-entrypoint).
#
#   fednode-entrypoint run --role …   prepare the node directory, then `fednode run …`
#   fednode-entrypoint fedctl ARGS…   `fedctl ARGS…`: the operator's tool, same image
#   fednode-entrypoint ARGS…          `fednode ARGS…` (init, id, cid, rotate-key, …)
#
# It ends with exec, so fednode itself is the container's main process and receives
# SIGTERM (a graceful stop: rounds in flight are recorded aborted, sessions resume on the
# next start). What it prepares is what a container cannot be told on a command line: a
# key handed in as a mounted file, and peer IDs that another container or a Kubernetes
# overlay supplies. Every variable is optional:
#
#   FEDNODE_HOME                 the node directory (the image sets /data/node)
#   FEDNODE_IDENTITY_DIR         a folder holding the node's key (a mounted Secret):
#                                identity-N.key for the pod whose POD_INDEX is N (a
#                                StatefulSet of participants shares one Secret), else
#                                identity.key. Copied to FEDNODE_HOME/identity.key with mode
#                                0600 on every start, because fednode refuses a key that
#                                others can read and Secret files are 0644, or 0440 with an
#                                fsGroup. Without it a node that has no key yet creates one
#                                (`fednode init`).
#   POD_INDEX                    this pod's ordinal in its StatefulSet (Kubernetes sets it
#                                from the apps.kubernetes.io/pod-index label)
#   FEDNODE_PEER_ID_FILE         write this node's peer ID there once it has a key
#   FEDNODE_OPERATORS            coordinator: peer IDs, blank-separated: each one `--operator ID`
#   FEDNODE_OPERATOR_FILE        coordinator: a file of peer IDs, one a line: the same
#   FEDNODE_VIEWERS              coordinator: peer IDs, blank-separated: each one `--viewer ID`
#   FEDNODE_COORDINATOR_ID       participant: `--coordinator-id ID`
#   FEDNODE_COORDINATOR_ID_FILE  participant: a file holding that peer ID
#   FEDNODE_JOIN_TOKEN           participant: `--join-token TOKEN` (an invite, from a Secret)
#   FEDNODE_HEALTH               HOST:PORT given as `--health` unless the arguments name one;
#                                the image sets 0.0.0.0:8080 for its HEALTHCHECK; "" = none
#   FEDNODE_WAIT_S               how long to wait for a *_FILE to appear (default 120 s:
#                                in compose another container writes it)
#   FEDCTL_COORDINATOR_ID_FILE   fedctl: a file holding the coordinator's peer ID
#   FEDCTL_KEY_FILE              fedctl: the operator key (a mounted Secret), copied to a
#                                private 0600 file for the same reason as the node's key
#   FEDCTL_PEER_ID_FILE          fedctl: write the operator's peer ID there (the key is
#                                created on first use)
#
# POSIX sh: python:3.11-slim's /bin/sh is dash.
set -euf # -f: no globbing; peer IDs are split on blanks below
umask 077 # keys 0600 and folders 0700, also for what libraries create

die() {
	echo "fednode-entrypoint: $*" >&2
	exit 2
}

# Print a file's peer IDs (one a line; blank lines and # comments skipped), waiting up to
# FEDNODE_WAIT_S for it to hold one: in compose the container that writes it may still be
# starting. A file without any stops the container: a coordinator must not start open to
# nobody, nor a participant trust nothing in particular.
read_ids() {
	wait_s=${FEDNODE_WAIT_S:-120}
	waited=0
	while :; do
		if [ -s "$1" ]; then
			found=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$1")
			if [ -n "$found" ]; then
				printf '%s\n' "$found"
				return 0
			fi
		fi
		[ "$waited" -ge "$wait_s" ] && die "$1 is missing or empty after ${wait_s} s (set by $2)"
		sleep 1
		waited=$((waited + 1))
	done
}

# Write a public peer ID where other containers read it: atomically, and readable by all.
publish() {
	mkdir -p "$(dirname "$1")"
	(umask 022 && printf '%s\n' "$2" >"$1.tmp.$$" && mv -f "$1.tmp.$$" "$1")
}

# Copy a mounted key to a private file (mode 0600), replacing it only when it differs.
install_key() {
	[ -r "$1" ] || die "$1 ($2) cannot be read"
	if ! cmp -s "$1" "$3" 2>/dev/null; then
		[ -e "$3" ] && echo "fednode-entrypoint: $3 replaced by $1 ($2)" >&2
		cp "$1" "$3.tmp.$$"
		chmod 0600 "$3.tmp.$$"
		mv -f "$3.tmp.$$" "$3"
	fi
}

if [ -n "${FEDCTL_COORDINATOR_ID_FILE:-}" ] && [ -z "${FEDCTL_COORDINATOR_ID:-}" ]; then
	ids=$(read_ids "$FEDCTL_COORDINATOR_ID_FILE" FEDCTL_COORDINATOR_ID_FILE)
	FEDCTL_COORDINATOR_ID=${ids%%[[:space:]]*} # the first line
	export FEDCTL_COORDINATOR_ID
fi

if [ "${1:-}" = fedctl ]; then
	shift
	if [ -n "${FEDCTL_KEY_FILE:-}" ]; then
		keydir=${TMPDIR:-/tmp}/fedctl-$(id -u)
		mkdir -p "$keydir"
		chmod 0700 "$keydir"
		install_key "$FEDCTL_KEY_FILE" FEDCTL_KEY_FILE "$keydir/operator.key"
		FEDCTL_KEY=$keydir/operator.key
		export FEDCTL_KEY
	fi
	if [ -n "${FEDCTL_PEER_ID_FILE:-}" ]; then
		me=$(fedctl whoami)
		publish "$FEDCTL_PEER_ID_FILE" "$me"
		if [ "$*" = whoami ]; then # compose's operator-key: said, no second fedctl start
			printf '%s\n' "$me"
			exit 0
		fi
	fi
	exec fedctl "$@"
fi

if [ "${1:-}" != run ]; then
	exec fednode "$@"
fi

home=${FEDNODE_HOME:-/data/node}
role=
has_health=
prev=
for arg in "$@"; do
	case $prev in
	--data-dir) home=$arg ;;
	--role) role=$arg ;;
	esac
	case $arg in
	--data-dir=*) home=${arg#--data-dir=} ;;
	--role=*) role=${arg#--role=} ;;
	--health | --health=*) has_health=1 ;;
	esac
	prev=$arg
done
# A subfolder of the volume, not its root: fednode makes its folder 0700, and the root of a
# Kubernetes volume belongs to root (fsGroup only lends it a group), so it could not.
mkdir -p "$home"
if [ -n "${FEDNODE_IDENTITY_DIR:-}" ]; then
	key=$FEDNODE_IDENTITY_DIR/identity.key
	if [ -n "${POD_INDEX:-}" ] && [ -e "$FEDNODE_IDENTITY_DIR/identity-$POD_INDEX.key" ]; then
		key=$FEDNODE_IDENTITY_DIR/identity-$POD_INDEX.key
	fi
	[ -e "$key" ] || die "FEDNODE_IDENTITY_DIR $FEDNODE_IDENTITY_DIR holds no ${POD_INDEX:+identity-$POD_INDEX.key nor }identity.key"
	install_key "$key" FEDNODE_IDENTITY_DIR "$home/identity.key"
elif [ ! -e "$home/identity.key" ]; then
	echo "fednode-entrypoint: no key in $home: creating one" >&2
	fednode init --data-dir "$home" >&2
fi
if [ -n "${FEDNODE_PEER_ID_FILE:-}" ]; then
	me=$(fednode id --data-dir "$home")
	publish "$FEDNODE_PEER_ID_FILE" "$me"
fi

for id in ${FEDNODE_OPERATORS:-}; do
	set -- "$@" --operator "$id"
done
if [ -n "${FEDNODE_OPERATOR_FILE:-}" ]; then
	ids=$(read_ids "$FEDNODE_OPERATOR_FILE" FEDNODE_OPERATOR_FILE)
	for id in $ids; do
		set -- "$@" --operator "$id"
	done
fi
for id in ${FEDNODE_VIEWERS:-}; do
	set -- "$@" --viewer "$id"
done
if [ -n "${FEDNODE_COORDINATOR_ID:-}" ]; then
	set -- "$@" --coordinator-id "$FEDNODE_COORDINATOR_ID"
elif [ -n "${FEDNODE_COORDINATOR_ID_FILE:-}" ]; then
	ids=$(read_ids "$FEDNODE_COORDINATOR_ID_FILE" FEDNODE_COORDINATOR_ID_FILE)
	set -- "$@" --coordinator-id "${ids%%[[:space:]]*}"
fi
if [ -n "${FEDNODE_JOIN_TOKEN:-}" ]; then
	set -- "$@" --join-token "$FEDNODE_JOIN_TOKEN"
fi
if [ -n "${FEDNODE_HEALTH:-}" ] && [ -z "$has_health" ]; then
	set -- "$@" --health "$FEDNODE_HEALTH"
fi
if [ "$role" = participant ] && [ -n "${FEDNODE_OPERATORS:-}${FEDNODE_OPERATOR_FILE:-}" ]; then
	die "FEDNODE_OPERATORS and FEDNODE_OPERATOR_FILE are for a coordinator (this is --role participant)"
fi
exec fednode "$@" --data-dir "$home" # the last --data-dir wins: the same folder
