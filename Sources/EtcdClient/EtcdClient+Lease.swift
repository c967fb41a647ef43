import CoreMetrics
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import GRPCProtobuf
import Logging
import Synchronization

extension EtcdClient {
    /// Grants a lease of `ttl` seconds.
    public func leaseGrant(ttl: Int64) async throws(EtcdError) -> EtcdLease {
        var request = Etcdserverpb_LeaseGrantRequest()
        request.ttl = ttl
        let operation = "LeaseGrant ttl=\(ttl)s"
        let response = try await perform(operation) { [request] metadata, options in
            try await self.leaseService.leaseGrant(request, metadata: metadata, options: options)
        }
        guard response.error.isEmpty else {
            throw EtcdError(.other, operation: operation, endpoints: endpoints, reason: response.error)
        }
        return EtcdLease(id: response.id, ttl: response.ttl)
    }

    /// Revokes a lease: every key attached to it is deleted.
    public func leaseRevoke(_ id: Int64) async throws(EtcdError) {
        var request = Etcdserverpb_LeaseRevokeRequest()
        request.id = id
        _ = try await perform("LeaseRevoke \(Self.hex(id))") { [request] metadata, options in
            try await self.leaseService.leaseRevoke(request, metadata: metadata, options: options)
        }
    }

    /// Renews a lease once over a LeaseKeepAlive stream; returns the new TTL
    /// in seconds. Fails with `.leaseNotFound` if the lease is gone.
    public func leaseKeepAliveOnce(_ id: Int64) async throws(EtcdError) -> Int64 {
        var request = Etcdserverpb_LeaseKeepAliveRequest()
        request.id = id
        let operation = "LeaseKeepAlive \(Self.hex(id))"
        let ttl = try await perform(operation) { [request] metadata, options in
            // Returning from the producer half-closes the stream and etcd then
            // ends LeaseKeepAlive without answering: keep it suspended until
            // the response has arrived.
            let (answered, answer) = AsyncStream<Never>.makeStream()
            return try await self.leaseService.leaseKeepAlive(
                metadata: metadata,
                options: options,
                requestProducer: { writer in
                    try await writer.write(request)
                    for await _ in answered {}
                },
                onResponse: { response in
                    defer { answer.finish() }
                    for try await message in response.messages where message.id == id {
                        return message.ttl
                    }
                    throw RPCError(code: .unavailable, message: "the server ended the stream without answering")
                }
            )
        }
        guard ttl > 0 else {
            throw EtcdError(
                .leaseNotFound,
                operation: operation,
                endpoints: endpoints,
                reason: "lease not found (expired or revoked)"
            )
        }
        return ttl
    }

    /// What the server knows about a lease; nil if it has expired or never existed.
    public func leaseTimeToLive(_ id: Int64, keys: Bool = false) async throws(EtcdError) -> EtcdLeaseInfo? {
        var request = Etcdserverpb_LeaseTimeToLiveRequest()
        request.id = id
        request.keys = keys
        let response = try await perform("LeaseTimeToLive \(Self.hex(id))") { [request] metadata, options in
            try await self.leaseService.leaseTimeToLive(request, metadata: metadata, options: options)
        }
        // etcd answers TTL -1 for a lease it does not have.
        guard response.ttl >= 0 else { return nil }
        return EtcdLeaseInfo(
            id: response.id,
            remainingTTL: response.ttl,
            grantedTTL: response.grantedTtl,
            keys: response.keys.map { String(decoding: $0, as: UTF8.self) }
        )
    }

    static func seconds(_ duration: Duration) -> String {
        let (whole, atto) = duration.components
        return String(format: "%.1f s", Double(whole) + Double(atto) / 1e18)
    }

    static func hex(_ id: Int64) -> String { String(UInt64(bitPattern: id), radix: 16) }
}
