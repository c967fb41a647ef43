#!/usr/bin/env bash
# A lab of "hosts" in network namespaces, for the demo and the end-to-end
# tests: an underlay switch (a bridge in its own namespace), hosts on it at
# 198.18.0.N/24, and behind each host a container namespace on a docker0-like
# bridge addressed from the host's subnet.env — the way Docker's --bip/--mtu
# would use it.
#
# Nothing is added to the root namespace. Every namespace name starts with
# the lab's prefix, and `destroy` removes them all and stops, by PID, the
# processes the lab started.
#
#   netns-lab.sh create  LAB DIR             underlay switch; DIR holds state, logs, pids
#   netns-lab.sh add-host LAB DIR N -- CMD…  host N; runs CMD… in it (tunneld), waits for
#                                            DIR/hN.env, then builds container N from it
#   netns-lab.sh add-host LAB DIR N --ipv6-only -- CMD…
#                                            the same with fd18::N/64 as eth0's only address
#                                            (no 198.18.0.N) and an IPv6 default route
#   netns-lab.sh add-host LAB DIR N --ipv6 -- CMD…
#                                            the same with an IPv6 underlay address fd18::N/64 on
#                                            eth0 (dual-stack networks); the container gets an
#                                            IPv6 address too when hN.env has FLANNEL_IPV6_SUBNET
#   netns-lab.sh add-host LAB DIR N --no-container -- CMD…
#                                            the same without container N: something else
#                                            (a CNI plugin, dockerd) attaches containers
#   netns-lab.sh add-node LAB DIR N          a bare host N on the underlay (198.18.0.N, no daemon,
#                                            no container): a stranger for the hostile-input tests
#   netns-lab.sh add-bare-host LAB DIR N -- CMD…  host N as a fresh host: IPv4 forwarding
#                                            off, no container namespace; runs CMD…,
#                                            waits for DIR/hN.env (Docker makes the containers)
#   netns-lab.sh add-bare-host LAB DIR N --ipv6 -- CMD…
#                                            the same with fd18::N/64 on eth0; IPv6
#                                            forwarding off too, as on a fresh host
#   netns-lab.sh start-in LAB DIR NAME NS -- CMD…  runs CMD… as process NAME in namespace
#                                            NS with nsenter --net (network namespace only:
#                                            dockerd needs the host's cgroup mounts)
#   netns-lab.sh add-etcd LAB DIR ETCD-ARGS… an etcd on the underlay at 198.18.0.250
#   netns-lab.sh add-etcd LAB DIR --member NAME ADDRESS -- ETCD-ARGS…
#                                            one member of an etcd cluster: process and namespace
#                                            NAME, on the underlay at ADDRESS (198.18.0.x)
#   netns-lab.sh stop    LAB DIR NAME        SIGTERM the process NAME (h1, etcd…), wait ≤15 s
#   netns-lab.sh start   LAB DIR NAME        start NAME again with its saved command
#   netns-lab.sh container-ip LAB DIR N      the container's address
#   netns-lab.sh destroy LAB DIR             stop everything, unmount what was mounted
#                                            under DIR, remove every namespace
set -euo pipefail

cmd=${1:?usage: netns-lab.sh create|add-host|add-node|add-bare-host|start-in|add-etcd|stop|start|container-ip|destroy LAB DIR …}
lab=${2:?lab name (namespace prefix) missing}
dir=${3:?state directory missing}
shift 3

ns() { echo "${lab}-$1"; }
log() { echo "netns-lab: $*" >&2; }

# Starts "$@" in namespace $2 in the background, as process NAME $1. With
# $dir/NAME.via holding "nsenter", only the network namespace is entered
# (ip netns exec also remounts /sys, which hides the cgroup mounts).
spawn() {
  local name=$1 netns=$2; shift 2
  printf '%q ' "$@" >"$dir/$name.cmd"
  echo "$netns" >"$dir/$name.ns"
  if [ "$(cat "$dir/$name.via" 2>/dev/null)" = nsenter ]; then
    nsenter --net="/run/netns/$netns" "$@" >>"$dir/$name.log" 2>&1 &
  else
    ip netns exec "$netns" "$@" >>"$dir/$name.log" 2>&1 &
  fi
  echo $! >"$dir/$name.pid"
}

# Host N on the underlay at 198.18.0.N, running "$@" (as process hN).
add_host_namespace() {
  local n=$1 h; shift
  h=$(ns "h$n")
  ip netns add "$h"
  ip -n "$h" link set lo up
  ip link add eth0 netns "$h" type veth peer name "p$n" netns "$(ns u)"
  ip -n "$(ns u)" link set "p$n" master sw0 up
  ip -n "$h" addr add "198.18.0.$n/24" dev eth0
  ip -n "$h" link set eth0 up
}

stop_process() {
  local name=$1 pid
  [ -f "$dir/$name.pid" ] || return 0
  pid=$(cat "$dir/$name.pid")
  rm -f "$dir/$name.pid"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  log "$name (pid $pid) did not stop within 15 s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

wait_for_file() {
  local file=$1 name=$2
  for _ in $(seq 1 300); do
    [ -s "$file" ] && return 0
    if [ -f "$dir/$name.pid" ] && ! kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
      log "$name exited before writing $file; its log:"; tail -20 "$dir/$name.log" >&2; return 1
    fi
    sleep 0.1
  done
  log "$file did not appear within 30 s; log of $name:"; tail -20 "$dir/$name.log" >&2
  return 1
}

case "$cmd" in
create)
  mkdir -p "$dir"
  ip netns add "$(ns u)"
  ip -n "$(ns u)" link add sw0 type bridge
  ip -n "$(ns u)" link set sw0 up
  ip -n "$(ns u)" link set lo up
  ;;

add-host|add-node)
  n=${1:?host number missing}; shift
  with_container=1 ipv6=0 ipv6only=0
  [ "${1:-}" = "--ipv6" ] && { ipv6=1; shift; }
  [ "${1:-}" = "--ipv6-only" ] && { ipv6=1; ipv6only=1; shift; }
  [ "${1:-}" = "--no-container" ] && { with_container=0; shift; }
  [ "${1:-}" = "--" ] && shift
  h=$(ns "h$n"); c=$(ns "c$n")
  add_host_namespace "$n"
  if [ "$ipv6" = 1 ]; then
    ip -n "$h" addr add "fd18::$n/64" dev eth0 nodad
  fi
  if [ "$ipv6only" = 1 ]; then
    # An underlay of IPv6 only: no IPv4 address at all, an IPv6 default route.
    ip -n "$h" addr del "198.18.0.$n/24" dev eth0
    ip -n "$h" -6 route add default via fd18::fe dev eth0
  fi
  [ "$cmd" = add-node ] && exit 0
  ip netns exec "$h" sysctl -qw net.ipv4.ip_forward=1
  [ "$ipv6" = 1 ] && ip netns exec "$h" sysctl -qw net.ipv6.conf.all.forwarding=1
  # Hosts reach nothing but the lab: no default route beyond the underlay.
  ip -n "$h" route add default via 198.18.0.254 dev eth0 2>/dev/null || true
  spawn "h$n" "$h" "$@"
  wait_for_file "$dir/h$n.env" "h$n"
  [ "$with_container" = 1 ] || exit 0
  # shellcheck disable=SC1090
  . "$dir/h$n.env"
  ip netns add "$c"
  ip -n "$c" link set lo up
  ip -n "$h" link add cbr0 type bridge
  ip -n "$h" link set cbr0 mtu "$FLANNEL_MTU" up
  ip link add eth0 netns "$c" type veth peer name veth0 netns "$h"
  ip -n "$h" link set veth0 master cbr0 mtu "$FLANNEL_MTU" up
  ip -n "$c" link set eth0 mtu "$FLANNEL_MTU" up
  # An IPv6-only network's file has no FLANNEL_SUBNET: the container gets IPv6 only.
  if [ -n "${FLANNEL_SUBNET:-}" ]; then
    bip=${FLANNEL_SUBNET%/*}; len=${FLANNEL_SUBNET#*/}
    base=${bip%.*}; last=${bip##*.}
    cip="$base.$((last + 1))"
    ip -n "$h" addr add "$FLANNEL_SUBNET" dev cbr0
    ip -n "$c" addr add "$cip/$len" dev eth0
    ip -n "$c" route add default via "$bip"
    echo "$cip" >"$dir/c$n.ip"
  fi
  if [ -n "${FLANNEL_IPV6_SUBNET:-}" ]; then
    bip6=${FLANNEL_IPV6_SUBNET%/*}; len6=${FLANNEL_IPV6_SUBNET#*/}
    case "$bip6" in *::1) cip6="${bip6%1}2" ;; *) log "FLANNEL_IPV6_SUBNET $FLANNEL_IPV6_SUBNET does not end in ::1"; exit 1 ;; esac
    # The host forwards its container's IPv6 (udp needs no IPv6 underlay for it).
    ip netns exec "$h" sysctl -qw net.ipv6.conf.all.forwarding=1
    ip -n "$h" addr add "$FLANNEL_IPV6_SUBNET" dev cbr0 nodad
    ip -n "$c" addr add "$cip6/$len6" dev eth0 nodad
    ip -n "$c" -6 route add default via "$bip6"
    echo "$cip6" >"$dir/c$n.ip6"
  fi
  ;;

add-bare-host)
  n=${1:?host number missing}; shift
  ipv6=0
  [ "${1:-}" = "--ipv6" ] && { ipv6=1; shift; }
  [ "${1:-}" = "--" ] && shift
  h=$(ns "h$n")
  add_host_namespace "$n"
  [ "$ipv6" = 1 ] && ip -n "$h" addr add "fd18::$n/64" dev eth0 nodad
  # As on a freshly installed host; dockerd turns it on when it starts.
  ip netns exec "$h" sysctl -qw net.ipv4.ip_forward=0
  ip netns exec "$h" sysctl -qw net.ipv6.conf.all.forwarding=0
  ip -n "$h" route add default via 198.18.0.254 dev eth0 2>/dev/null || true
  spawn "h$n" "$h" "$@"
  wait_for_file "$dir/h$n.env" "h$n"
  ;;

start-in)
  name=${1:?process name missing}; netns=$(ns "${2:?namespace missing}"); shift 2
  [ "${1:-}" = "--" ] && shift
  echo nsenter >"$dir/$name.via"
  spawn "$name" "$netns" "$@"
  ;;

add-etcd)
  name=etcd; address=198.18.0.250; port=pe
  if [ "${1:-}" = "--member" ]; then
    name=${2:?member name missing}; address=${3:?member address missing}; shift 3
    case "$address" in 198.18.0.*) ;; *) log "member address $address is not on the lab's underlay 198.18.0.0/24"; exit 2 ;; esac
    port="p$name"
  fi
  [ "${1:-}" = "--" ] && shift
  e=$(ns "$name")
  ip netns add "$e"
  ip -n "$e" link set lo up
  ip link add eth0 netns "$e" type veth peer name "$port" netns "$(ns u)"
  ip -n "$(ns u)" link set "$port" master sw0 up
  ip -n "$e" addr add "$address/24" dev eth0
  ip -n "$e" link set eth0 up
  spawn "$name" "$e" "$@"
  ;;

stop)
  stop_process "${1:?process name missing}"
  ;;

start)
  name=${1:?process name missing}
  [ -f "$dir/$name.cmd" ] || { log "no saved command for $name"; exit 1; }
  eval "set -- $(cat "$dir/$name.cmd")"
  spawn "$name" "$(cat "$dir/$name.ns")" "$@"
  ;;

container-ip)
  cat "$dir/c${1:?host number missing}.ip"
  ;;

destroy)
  for pidfile in "$dir"/*.pid; do
    [ -e "$pidfile" ] || continue
    stop_process "$(basename "$pidfile" .pid)"
  done
  # What the processes mounted under the lab's directory and left (dockerd
  # killed before it cleaned up): deepest first, lazily.
  if [ -n "$dir" ] && [ -d "$dir" ]; then
    real=$(readlink -f "$dir")
    awk -v d="$real/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
  fi
  for n in $(ip netns list | awk '{print $1}' | grep -E "^${lab}-" || true); do
    # Processes we did not start but that live in our namespaces (a ping
    # left by an interrupted test) go with them.
    for pid in $(ip netns pids "$n" 2>/dev/null || true); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$n" 2>/dev/null || true
  done
  ;;

*)
  log "unknown command $cmd"; exit 2
  ;;
esac
