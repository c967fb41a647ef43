// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "tunneld",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "tunneld", targets: ["tunneld"]),
        .library(name: "NetBase", targets: ["NetBase"]),
        .library(name: "UDPEncap", targets: ["UDPEncap"]),
        .library(name: "PacketRing", targets: ["PacketRing"]),
        .library(name: "LeaseStore", targets: ["LeaseStore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.2.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.6.0"),
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
        // Addresses, networks, errors and file descriptors shared by every layer.
        .target(name: "NetBase", dependencies: ["CTunnel"]),
        // rtnetlink: links, addresses, routes — no shelling out to `ip`.
        .target(name: "Netlink", dependencies: ["NetBase", "CTunnel"]),
        .target(name: "TunDevice", dependencies: ["NetBase", "Netlink", "CTunnel"]),
        .target(name: "UDPEncap", dependencies: ["NetBase", "CTunnel"]),
        .target(
            name: "PacketRing",
            dependencies: [
                "NetBase", "UDPEncap", "CURing", "CTunnel",
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        .target(
            name: "LeaseStore",
            dependencies: [
                "NetBase",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "tunneld",
            dependencies: [
                "NetBase", "Netlink", "TunDevice", "UDPEncap", "PacketRing", "LeaseStore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .testTarget(name: "NetBaseTests", dependencies: ["NetBase"]),
        .testTarget(name: "NetlinkTests", dependencies: ["Netlink", "NetBase"]),
        .testTarget(name: "TunDeviceTests", dependencies: ["TunDevice", "Netlink", "NetBase"]),
        .testTarget(name: "UDPEncapTests", dependencies: ["UDPEncap", "NetBase"]),
        .testTarget(name: "PacketRingTests", dependencies: ["PacketRing", "UDPEncap", "NetBase"]),
        .testTarget(name: "LeaseStoreTests", dependencies: ["LeaseStore", "NetBase"]),
        .testTarget(name: "EndToEndTests", dependencies: ["NetBase"]),
    ]
)
