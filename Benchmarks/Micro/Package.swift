// swift-tools-version:6.1
// Micro-benchmarks of the data path's per-packet work (ns and allocations per
// packet), with ordo-one's package-benchmark. A package of its own so that the
// root package does not depend on the benchmark framework:
//
//   cd Benchmarks/Micro && swift package benchmark
//
// See docs/BENCHMARKS.md ("Micro-benchmarks").
import PackageDescription

let package = Package(
    name: "tunneld-micro-benchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        // The root package, by path; `name:` fixes its identity, which would
        // otherwise be the name of whatever directory the repository is in.
        .package(name: "tunneld", path: "../.."),
        // Only the MallocInterposer trait: the default RuntimeInterposer trait
        // (ARC counts on Swift 6.3 Linux) needs ordo-one/swift-runtime-interposer,
        // which is not available here; allocations are what we check.
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "DataPath",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "PacketRing", package: "tunneld"),
                .product(name: "UDPEncap", package: "tunneld"),
                .product(name: "NetBase", package: "tunneld"),
                .product(name: "WireGuard", package: "tunneld"),
            ],
            path: "Benchmarks/DataPath",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        )
    ]
)
