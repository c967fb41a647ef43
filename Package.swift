// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "tunneld",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "tunneld", targets: ["tunneld"]),
        .executable(name: "tunneld-cni", targets: ["tunneld-cni"]),
        .library(name: "NetBase", targets: ["NetBase"]),
        .library(name: "UDPEncap", targets: ["UDPEncap"]),
        .library(name: "PacketRing", targets: ["PacketRing"]),
        .library(name: "FlannelFiles", targets: ["FlannelFiles"]),
        .library(name: "LeaseStore", targets: ["LeaseStore"]),
        .library(name: "EtcdClient", targets: ["EtcdClient"]),
        .library(name: "PeerControl", targets: ["PeerControl"]),
        .library(name: "Backends", targets: ["Backends"]),
        .library(name: "CNIPlugin", targets: ["CNIPlugin"]),
        .library(name: "Observability", targets: ["Observability"]),
        .library(name: "WireGuard", targets: ["WireGuard"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.2.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.6.0"),
        .package(url: "https://github.com/grpc/grpc-swift-2", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport", from: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
        // The metrics endpoint: the same swift-nio range grpc-swift-nio-transport asks for.
        .package(url: "https://github.com/apple/swift-nio", from: "2.96.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        // Already in the graph through grpc-swift-nio-transport.
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // What Swift cannot import from the kernel headers: ioctl requests, ifreq,
        // CMSG_* helpers, virtio_net_hdr, netlink message layout.
        .target(name: "CTunnel"),
        // liburing from Debian's liburing-dev.
        .systemLibrary(
            name: "CURing",
            pkgConfig: "liburing",
            providers: [.apt(["liburing-dev"])]
        ),
        // WireGuard's primitives from Debian's libraries: libcrypto (OpenSSL 3,
        // libssl-dev) and libsodium (libsodium-dev, for XChaCha20-Poly1305).
        // Calls only: no cryptography is written here.
        .target(
            name: "CWireGuardCrypto",
            linkerSettings: [.linkedLibrary("crypto"), .linkedLibrary("sodium")]
        ),
        // The WireGuard protocol without I/O: keys, the Noise_IKpsk2 handshake,
        // cookies, transport messages sealed and opened in caller memory, the
        // replay window, timers. Time comes in as a value.
        .target(name: "WireGuard", dependencies: ["CWireGuardCrypto"]),
        // Addresses, networks, errors and file descriptors shared by every layer.
        .target(name: "NetBase", dependencies: ["CTunnel"]),
        // rtnetlink: links, addresses, routes — no shelling out to `ip`.
        .target(name: "Netlink", dependencies: ["NetBase", "CTunnel"]),
        .target(name: "TunDevice", dependencies: ["NetBase", "Netlink", "CTunnel"]),
        // Offload logic on packet memory, no I/O: virtio_net_hdr, splitting
        // TSO/USO super-packets, checksums, coalescing received TCP segments.
        .target(name: "Offload"),
        .target(name: "UDPEncap", dependencies: ["NetBase", "Offload", "CTunnel"]),
        // What the udp data path counts: each counter's name, Prometheus series,
        // labels and help, defined once for PacketRing and Observability.
        .target(name: "DataPathCounters"),
        // The backend's state as status, metrics and the backends share it.
        .target(name: "StatusModel"),
        .target(
            name: "PacketRing",
            dependencies: [
                "NetBase", "UDPEncap", "Offload", "CURing", "CTunnel", "DataPathCounters",
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        // etcd v3 over gRPC: our .proto subset of etcd's API (Protos/etcd), code
        // generated once by Scripts/generate-etcd-proto.sh, and a small client.
        .target(
            name: "EtcdClient",
            dependencies: [
                "NetBase",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
                // Telling why a TLS connection fails (TLSDiagnosis): the same
                // NIO and NIOSSL the gRPC transport runs on.
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        // flannel's file formats and the file I/O under them: JSON values,
        // subnet.env, mk-docker-opts output, atomic writes. No store, no
        // etcd: what the CNI plugin (started once per container) links.
        .target(name: "FlannelFiles", dependencies: ["NetBase"]),
        .target(
            name: "LeaseStore",
            dependencies: [
                "NetBase", "FlannelFiles", "EtcdClient",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Prometheus exposition of what the daemon counts, the HTTP endpoint
        // (health, metrics, status) on swift-nio, and the status report's
        // model and table. Knows nothing of backends or stores: the daemon
        // hands it plain values when asked.
        .target(
            name: "Observability",
            dependencies: [
                "DataPathCounters", "StatusModel",
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The peer bookkeeping every backend shares (list, watch, compaction
        // diff, renewal, re-acquisition) and the Backend protocol; no kernel
        // access, so it is unit-tested without root.
        .target(
            name: "PeerControl",
            dependencies: [
                "NetBase", "LeaseStore", "StatusModel",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ]
        ),
        // The backends: udp (tunneld's data path), vxlan and host-gw (the
        // kernel's, programmed through rtnetlink).
        .target(
            name: "Backends",
            dependencies: [
                "NetBase", "Netlink", "TunDevice", "UDPEncap", "PacketRing", "LeaseStore", "PeerControl", "StatusModel",
                "WireGuard",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "tunneld",
            dependencies: [
                "NetBase", "Netlink", "UDPEncap", "FlannelFiles", "LeaseStore", "EtcdClient", "CTunnel", "PeerControl",
                "Backends", "Observability", "PacketRing",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // flannel's CNI plugin: reads subnet.env and delegates to the standard
        // bridge/host-local plugins; its logic is a library tested without root.
        // Links FlannelFiles, not LeaseStore: no etcd client, gRPC or NIO in a
        // program the runtime starts for every container.
        .target(name: "CNIPlugin", dependencies: ["NetBase", "FlannelFiles", "CTunnel"]),
        .executableTarget(name: "tunneld-cni", dependencies: ["CNIPlugin", "NetBase"]),
        .testTarget(name: "NetBaseTests", dependencies: ["NetBase"]),
        // Runs a program with io_uring refused by a seccomp filter, as Docker's
        // default profile refuses it: the tests reach the system-call tier for real.
        .executableTarget(name: "refuse-io-uring", path: "Tests/RefuseIOURing"),
        // Bounded, seeded random-input runs (budget, replay by seed, guarded memory,
        // slow packet models) shared by the fuzz tests of several modules.
        .target(name: "FuzzSupport", path: "Tests/FuzzSupport"),
        // Scratch namespaces and packet builders shared by the tests.
        .target(
            name: "NetTestSupport",
            dependencies: ["NetBase", "Netlink", "UDPEncap", .product(name: "Logging", package: "swift-log")],
            path: "Tests/NetTestSupport"
        ),
        .testTarget(name: "NetlinkTests", dependencies: ["Netlink", "NetBase", "NetTestSupport", "FuzzSupport"]),
        .testTarget(name: "TunDeviceTests", dependencies: ["TunDevice", "Netlink", "NetBase", "NetTestSupport"]),
        .testTarget(name: "UDPEncapTests", dependencies: ["UDPEncap", "NetBase", "NetTestSupport", "FuzzSupport"]),
        .testTarget(name: "OffloadTests", dependencies: ["Offload", "FuzzSupport"]),
        .testTarget(
            name: "PacketRingTests",
            dependencies: ["PacketRing", "UDPEncap", "NetBase", "NetTestSupport", "FuzzSupport"]
        ),
        // Test helper shared by test targets: starts a throwaway etcd (EtcdServer).
        .target(name: "EtcdTestSupport", dependencies: ["NetBase"], path: "Tests/EtcdTestSupport"),
        .testTarget(
            name: "EtcdClientTests",
            dependencies: [
                "EtcdClient", "EtcdTestSupport", "NetBase", "NetTestSupport",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "LeaseStoreTests",
            dependencies: [
                "LeaseStore", "FlannelFiles", "NetBase", "EtcdClient", "EtcdTestSupport", "FuzzSupport",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "PeerControlTests",
            dependencies: [
                "PeerControl", "LeaseStore", "NetBase", "NetTestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ]
        ),
        .testTarget(
            name: "BackendsTests",
            dependencies: [
                "Backends", "PeerControl", "Netlink", "LeaseStore", "NetBase", "NetTestSupport", "WireGuard",
                "PacketRing", "TunDevice", "UDPEncap", "FlannelFiles",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(name: "EndToEndTests", dependencies: ["NetBase", "NetTestSupport", "EtcdTestSupport"]),
        .testTarget(
            name: "ObservabilityTests",
            dependencies: [
                "Observability", "PacketRing",
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        .testTarget(name: "tunneldTests", dependencies: ["tunneld"]),
        .testTarget(name: "CNIPluginTests", dependencies: ["CNIPlugin", "FlannelFiles"]),
        .testTarget(
            name: "WireGuardTests",
            dependencies: ["WireGuard", "CWireGuardCrypto", "NetBase", "Netlink", "NetTestSupport"]
        ),
    ]
)
