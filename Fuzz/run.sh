#!/usr/bin/env bash
# libFuzzer targets for tunneld's parsers, built straight from the sources with
# `swiftc -sanitize=fuzzer,address` (no SwiftPM build: the targets need only the few
# files they test). Not part of CI; `swift test` runs the bounded fuzz tests there.
#
#   Fuzz/run.sh json   [SECONDS]   JSON parser and network config
#   Fuzz/run.sh packet [SECONDS]   IPv4 validation, ICMP errors, segmentation, coalescing
#   Fuzz/run.sh all    [SECONDS]   both, one after the other
#
# SECONDS defaults to 60. The corpus starts from Fuzz/corpus/<target> (committed seeds)
# and grows in $FUZZ_WORK (default /tmp/tunneld-fuzz/<target>); crashes are written
# there as crash-* files: replay one with `$FUZZ_WORK/<target>/fuzz-<target> FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target=${1:?usage: Fuzz/run.sh json|packet|all [SECONDS]}
seconds=${2:-60}
work=${FUZZ_WORK:-/tmp/tunneld-fuzz}

sources_for() {
  case "$1" in
    json) echo Sources/LeaseStore/JSON.swift Sources/LeaseStore/NetworkConfig.swift \
               Sources/NetBase/IPv4.swift Sources/NetBase/Constants.swift ;;
    packet) echo Sources/Offload/*.swift Sources/UDPEncap/IPv4Header.swift Sources/UDPEncap/ICMPError.swift ;;
    *) echo "Fuzz/run.sh: unknown target $1 (json, packet or all)" >&2; exit 2 ;;
  esac
}

corpus_for() {
  case "$1" in
    json) echo json network-config lease ;;
    packet) echo ipv4 ;;
  esac
}

run() {
  local name=$1 dir="$work/$1"
  mkdir -p "$dir/src" "$dir/corpus"
  # One module: the files' imports of each other's modules are dropped.
  for f in $(sources_for "$name"); do
    sed -e '/^import \(NetBase\|Offload\)$/d' "$f" > "$dir/src/$(basename "$f")"
  done
  cp "Fuzz/Targets/$name.swift" "$dir/src/"
  echo "fuzz: building fuzz-$name"
  swiftc -sanitize=fuzzer,address -parse-as-library -module-name "Fuzz$name" -g \
    "$dir"/src/*.swift -o "$dir/fuzz-$name"
  for c in $(corpus_for "$name"); do
    [ -d "Fuzz/corpus/$c" ] && cp -n Fuzz/corpus/"$c"/* "$dir/corpus/" 2>/dev/null || true
  done
  echo "fuzz: running fuzz-$name for $seconds s (corpus $dir/corpus)"
  (cd "$dir" && "./fuzz-$name" -max_total_time="$seconds" -print_final_stats=1 -max_len=65546 corpus)
}

probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf '@_cdecl("LLVMFuzzerTestOneInput") public func f(_ d: UnsafePointer<UInt8>, _ n: Int) -> CInt { 0 }\n' > "$probe/p.swift"
if ! swiftc -sanitize=fuzzer -parse-as-library "$probe/p.swift" -o "$probe/p" 2>"$probe/err"; then
  echo "Fuzz/run.sh: this Swift toolchain cannot build libFuzzer targets (swiftc -sanitize=fuzzer failed):" >&2
  cat "$probe/err" >&2
  echo "use the bounded runs instead: TUNNELD_FUZZ_ITERATIONS=100000 swift test --filter Fuzz" >&2
  exit 1
fi

case "$target" in
  all) run json; run packet ;;
  *) run "$target" ;;
esac
