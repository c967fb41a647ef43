#!/usr/bin/env bash
# Regenerates Sources/EtcdClient/Generated/ from Protos/etcd/*.proto.
#
# Run by hand when the .proto files change, then commit the output. CI never
# runs this: the generated Swift is committed, so builds need neither protoc
# nor the plugins (the SwiftPM build plugins would build protoc from source,
# about 10 minutes per clean build).
#
# Needs: protoc (Debian: apt-get install protobuf-compiler; 3.21.12 is known
# to work) and the two plugins, which this script builds once in a throwaway
# package outside the repository (about a minute):
#   protoc-gen-swift         from apple/swift-protobuf 1.39.0
#   protoc-gen-grpc-swift-2  from grpc/grpc-swift-protobuf 2.4.1
# Keep those versions equal to the ones Package.swift resolves, so the
# generated code matches the runtime libraries.
#
# Usage: Scripts/generate-etcd-proto.sh [PLUGIN_DIR]   (default /tmp/protoc-plugins)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
plugins=${1:-/tmp/protoc-plugins}
proto_dir="$repo/Protos/etcd"
out_dir="$repo/Sources/EtcdClient/Generated"

command -v protoc >/dev/null || {
    echo "protoc not found: apt-get install -y protobuf-compiler" >&2; exit 1; }

if [[ ! -x "$plugins/.build/release/protoc-gen-swift" ||
      ! -x "$plugins/.build/release/protoc-gen-grpc-swift-2" ]]; then
    echo "building protoc plugins in $plugins" >&2
    mkdir -p "$plugins"
    cat > "$plugins/Package.swift" <<'PKG'
// swift-tools-version:6.1
// Throwaway helper package: builds the protoc plugins used by tunneld's
// Scripts/generate-etcd-proto.sh. Not part of the tunneld repository.
import PackageDescription

let package = Package(
    name: "protoc-plugins",
    dependencies: [
        .package(url: "https://github.com/apple/swift-protobuf", exact: "1.39.0"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", exact: "2.4.1"),
    ]
)
PKG
    (cd "$plugins" &&
        swift build -c release --product protoc-gen-swift &&
        swift build -c release --product protoc-gen-grpc-swift-2)
fi

rm -rf "$out_dir"
mkdir -p "$out_dir"
protoc \
    --proto_path="$proto_dir" \
    --plugin=protoc-gen-swift="$plugins/.build/release/protoc-gen-swift" \
    --plugin=protoc-gen-grpc-swift-2="$plugins/.build/release/protoc-gen-grpc-swift-2" \
    --swift_out="$out_dir" \
    --swift_opt=Visibility=Public \
    --grpc-swift-2_out="$out_dir" \
    --grpc-swift-2_opt=Visibility=Public \
    --grpc-swift-2_opt=Server=False \
    "$proto_dir"/kv.proto "$proto_dir"/rpc.proto
echo "generated:" >&2
rm -f "$out_dir/kv.grpc.swift"   # kv.proto has no services
ls -l "$out_dir" >&2
