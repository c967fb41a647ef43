import CoreMetrics
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import GRPCProtobuf
import Logging
import Synchronization

extension EtcdClient {
    /// Reads one key; nil if it does not exist.
    public func get(_ key: String) async throws(EtcdError) -> EtcdKeyValue? {
        try await range(key: key).kvs.first
    }

    /// Reads one key, with the revision the read saw.
    public func range(key: String, revision: Int64 = 0) async throws(EtcdError) -> EtcdRangeResult {
        var request = Etcdserverpb_RangeRequest()
        request.key = Data(key.utf8)
        request.revision = revision
        return try await range(request, operation: "Range \(key)")
    }

    /// Reads every key starting with `prefix`, in key order, at one
    /// revision: `revision`, or (0) the newest when the read began.
    ///
    /// The keys are read in pages of at most `pageSize` keys, every page at
    /// the first page's revision (as etcd's own clients page: `limit`, the
    /// next page starting after the last key returned), so no answer has to
    /// hold the whole range and the result is one consistent snapshot even
    /// while keys change; watch from `revision + 1` to follow it. A page too
    /// large for `maxReceiveMessageBytes` is asked for again with half as
    /// many keys. If the snapshot's revision is compacted before the last
    /// page (the listing took longer than etcd keeps history), a read of the
    /// newest revision starts again (at most 3 times); with an explicit
    /// `revision` that fails with `.compacted`.
    public func range(
        prefix: String,
        revision: Int64 = 0,
        pageSize: Int = EtcdClient.defaultPageSize
    )
        async throws(EtcdError) -> EtcdRangeResult
    {
        var kvs: [EtcdKeyValue] = []
        let snapshot = try await range(prefix: prefix, revision: revision, pageSize: pageSize) { page, restart in
            if restart { kvs.removeAll() }
            kvs += page
        }
        return EtcdRangeResult(kvs: kvs, revision: snapshot)
    }

    /// `range(prefix:revision:pageSize:)` a page at a time: `body` gets
    /// each page's keys as it arrives, so the caller can decode them and
    /// let the page go rather than hold the whole range twice. `restart` is
    /// true on the first page of each attempt: after a compaction restart
    /// (see above) the caller drops what it took from the earlier attempt.
    /// Returns the revision every page was read at.
    public func range(
        prefix: String,
        revision: Int64 = 0,
        pageSize: Int = EtcdClient.defaultPageSize,
        eachPage body: ([EtcdKeyValue], _ restart: Bool) throws(EtcdError) -> Void
    )
        async throws(EtcdError) -> Int64
    {
        var restarts = 0
        while true {
            do {
                return try await pagedRange(prefix: prefix, revision: revision, pageSize: pageSize, body)
            } catch {
                guard case .compacted = error.code, revision == 0, restarts < 3 else { throw error }
                restarts += 1
            }
        }
    }

    private func pagedRange(
        prefix: String,
        revision: Int64,
        pageSize: Int,
        _ body: ([EtcdKeyValue], _ restart: Bool) throws(EtcdError) -> Void
    )
        async throws(EtcdError) -> Int64
    {
        let end = Self.prefixEnd(prefix)
        var (response, limit) = try await rangePage(
            prefix: prefix,
            page: 1,
            start: Data(prefix.utf8),
            end: end,
            revision: revision,
            limit: max(1, pageSize)
        ).get()
        // Every page after the first is read at the first one's revision.
        let snapshot = revision == 0 ? response.header.revision : revision
        var pages = 1
        while true {
            guard response.more, let last = response.kvs.last else {
                try body(response.kvs.map(EtcdKeyValue.init), pages == 1)
                return snapshot
            }
            // The next page is asked for before this one is decoded: etcd
            // finds it while the caller works through this one.
            // The smallest key after the last one returned.
            let nextStart = last.key + Data([0]), nextPage = pages + 1, nextLimit = limit
            async let next = rangePage(
                prefix: prefix,
                page: nextPage,
                start: nextStart,
                end: end,
                revision: snapshot,
                limit: nextLimit
            )
            try body(response.kvs.map(EtcdKeyValue.init), pages == 1)
            response = Etcdserverpb_RangeResponse()
            (response, limit) = try await next.get()
            pages += 1
        }
    }

    /// One page of a paged range: at most `limit` keys from `start`, asked
    /// again with half as many keys while the answer is too large for
    /// `maxReceiveMessageBytes`. Returns the answer and the limit that
    /// worked (the next page uses it too).
    private func rangePage(
        prefix: String,
        page: Int,
        start: Data,
        end: Data,
        revision: Int64,
        limit: Int
    ) async -> Result<(Etcdserverpb_RangeResponse, Int), EtcdError> {
        var limit = limit
        while true {
            var request = Etcdserverpb_RangeRequest()
            request.key = start
            request.rangeEnd = end
            request.revision = revision
            request.limit = Int64(limit)
            // No sort order: etcd returns keys in ascending order anyway, and
            // any sort makes it read the whole range for every page.
            do throws(EtcdError) {
                let response = try await perform("Range \(prefix)* page \(page)") { [request] metadata, options in
                    try await self.kv.range(request, metadata: metadata, options: options)
                }
                return .success((response, limit))
            } catch {
                if error.code == .responseTooLarge && limit > 1 {
                    limit = max(1, limit / 2)
                    continue
                }
                return .failure(error)
            }
        }
    }

    /// The keys of `[key, rangeEnd)` in one request: at most `limit` (0: all)
    /// of them, at `revision` (0: the newest). `more` says whether keys were
    /// left out. For tests and tools that show what one answer holds.
    public func rangePage(
        key: String,
        rangeEnd: Data,
        revision: Int64 = 0,
        limit: Int64 = 0
    )
        async throws(EtcdError) -> (result: EtcdRangeResult, more: Bool)
    {
        var request = Etcdserverpb_RangeRequest()
        request.key = Data(key.utf8)
        request.rangeEnd = rangeEnd
        request.revision = revision
        request.limit = limit
        let response = try await perform("Range \(key) limit \(limit)") { [request] metadata, options in
            try await self.kv.range(request, metadata: metadata, options: options)
        }
        return (
            EtcdRangeResult(kvs: response.kvs.map(EtcdKeyValue.init), revision: response.header.revision),
            response.more
        )
    }

    /// The end of the range of every key starting with `prefix`.
    public static func rangeEnd(ofPrefix prefix: String) -> Data { prefixEnd(prefix) }

    private func range(
        _ request: Etcdserverpb_RangeRequest,
        operation: String
    ) async throws(EtcdError)
        -> EtcdRangeResult
    {
        let response = try await perform(operation) { [request] metadata, options in
            try await self.kv.range(request, metadata: metadata, options: options)
        }
        return EtcdRangeResult(kvs: response.kvs.map(EtcdKeyValue.init), revision: response.header.revision)
    }

    /// Writes a key, attached to `lease` (0: no lease, the key stays until
    /// deleted). Returns the revision of the write.
    @discardableResult
    public func put(_ key: String, value: [UInt8], lease: Int64 = 0) async throws(EtcdError) -> Int64 {
        var request = Etcdserverpb_PutRequest()
        request.key = Data(key.utf8)
        request.value = Data(value)
        request.lease = lease
        let response = try await perform("Put \(key)") { [request] metadata, options in
            try await self.kv.put(request, metadata: metadata, options: options)
        }
        return response.header.revision
    }

    @discardableResult
    public func put(_ key: String, value: String, lease: Int64 = 0) async throws(EtcdError) -> Int64 {
        try await put(key, value: Array(value.utf8), lease: lease)
    }

    /// Writes several keys in one transaction (one revision), each attached
    /// to `lease` (0: none). etcd refuses more operations per transaction
    /// than its `--max-txn-ops` (default 128). Returns the revision.
    @discardableResult
    public func putAll(_ pairs: [(key: String, value: [UInt8])], lease: Int64 = 0) async throws(EtcdError) -> Int64 {
        var request = Etcdserverpb_TxnRequest()
        request.success = pairs.map { pair in
            var put = Etcdserverpb_PutRequest()
            put.key = Data(pair.key.utf8)
            put.value = Data(pair.value)
            put.lease = lease
            return .with { $0.requestPut = put }
        }
        let response = try await perform("Txn put \(pairs.count) keys") { [request] metadata, options in
            try await self.kv.txn(request, metadata: metadata, options: options)
        }
        return response.header.revision
    }

    /// Deletes a key. Returns how many keys were deleted (0 or 1) and the revision.
    @discardableResult
    public func delete(_ key: String) async throws(EtcdError) -> (deleted: Int64, revision: Int64) {
        var request = Etcdserverpb_DeleteRangeRequest()
        request.key = Data(key.utf8)
        let response = try await perform("DeleteRange \(key)") { [request] metadata, options in
            try await self.kv.deleteRange(request, metadata: metadata, options: options)
        }
        return (response.deleted, response.header.revision)
    }

    /// Writes `key` only if it does not exist, in one transaction:
    /// `If(create_revision(key) == 0) Then(Put) Else(Range)`. Of several
    /// clients racing for the same key exactly one gets `.created`; the others
    /// get `.exists` with what the winner wrote.
    public func createIfAbsent(
        _ key: String,
        value: [UInt8],
        lease: Int64 = 0
    ) async throws(EtcdError)
        -> EtcdCreateResult
    {
        var compare = Etcdserverpb_Compare()
        compare.target = .create
        compare.createRevision = 0
        let operation = "Txn create-if-absent \(key)"
        let response = try await putIf(compare, key: key, value: value, lease: lease, operation: operation)
        return try createResult(response, operation: operation, missing: "the key was not returned")
    }

    /// Creates `key` only if no key starting with `guardPrefix` exists (the
    /// key itself among them), in one transaction:
    /// `If(create_revision == 0 over [guardPrefix, end)) Then(Put key) Else(Range [guardPrefix, end), limit 1)`.
    /// A flannel dual-stack lease key (`10.2.5.0-24&fd00::-64`) and the
    /// plain key of the same IPv4 subnet (`10.2.5.0-24`) share that prefix,
    /// so two hosts can never both create a key for one IPv4 subnet.
    /// `.exists` carries one of the keys found.
    public func createIfAbsent(
        _ key: String,
        value: [UInt8],
        lease: Int64 = 0,
        guardPrefix: String
    )
        async throws(EtcdError) -> EtcdCreateResult
    {
        precondition(key.hasPrefix(guardPrefix), "\(key) does not start with its guard prefix \(guardPrefix)")
        let operation = "Txn create-if-absent \(key) (none under \(guardPrefix))"
        var compare = Etcdserverpb_Compare()
        compare.target = .create
        compare.createRevision = 0
        compare.result = .equal
        compare.key = Data(guardPrefix.utf8)
        compare.rangeEnd = Self.prefixEnd(guardPrefix)
        var put = Etcdserverpb_PutRequest()
        put.key = Data(key.utf8)
        put.value = Data(value)
        put.lease = lease
        var get = Etcdserverpb_RangeRequest()
        get.key = Data(guardPrefix.utf8)
        get.rangeEnd = Self.prefixEnd(guardPrefix)
        get.limit = 1
        var request = Etcdserverpb_TxnRequest()
        request.compare = [compare]
        request.success = [.with { $0.requestPut = put }]
        request.failure = [.with { $0.requestRange = get }]
        let response = try await perform(operation) { [request] metadata, options in
            try await self.kv.txn(request, metadata: metadata, options: options)
        }
        return try createResult(response, operation: operation, missing: "no key under the prefix was returned")
    }

    /// The outcome of a create-if-absent transaction whose failure branch
    /// is a Range: `.created`, or `.exists` with the first key found. The
    /// transaction is atomic, so a failed compare with nothing found is
    /// etcd breaking its contract (`missing` says what was absent).
    private func createResult(
        _ response: Etcdserverpb_TxnResponse,
        operation: String,
        missing: String
    ) throws(EtcdError) -> EtcdCreateResult {
        if response.succeeded { return .created(revision: response.header.revision) }
        guard case .responseRange(let found)? = response.responses.first?.response,
            let existing = found.kvs.first
        else {
            throw EtcdError(
                .protocolViolation,
                operation: operation,
                endpoints: endpoints,
                reason: "the compare failed but \(missing)"
            )
        }
        return .exists(EtcdKeyValue(existing))
    }

    /// One transaction: `If(compare == on key) Then(Put key) Else(Range key)`,
    /// so a loser learns at once what the key holds.
    private func putIf(
        _ compare: Etcdserverpb_Compare,
        key: String,
        value: [UInt8],
        lease: Int64,
        operation: String
    ) async throws(EtcdError) -> Etcdserverpb_TxnResponse {
        var compare = compare
        compare.key = Data(key.utf8)
        compare.result = .equal
        var put = Etcdserverpb_PutRequest()
        put.key = Data(key.utf8)
        put.value = Data(value)
        put.lease = lease
        var get = Etcdserverpb_RangeRequest()
        get.key = Data(key.utf8)
        var request = Etcdserverpb_TxnRequest()
        request.compare = [compare]
        request.success = [.with { $0.requestPut = put }]
        request.failure = [.with { $0.requestRange = get }]
        return try await perform(operation) { [request] metadata, options in
            try await self.kv.txn(request, metadata: metadata, options: options)
        }
    }

    public func createIfAbsent(
        _ key: String,
        value: String,
        lease: Int64 = 0
    ) async throws(EtcdError)
        -> EtcdCreateResult
    {
        try await createIfAbsent(key, value: Array(value.utf8), lease: lease)
    }

    /// Writes `key` only if it was not changed since `modRevision` (0: only
    /// if it does not exist), in one transaction:
    /// `If(mod_revision(key) == modRevision) Then(Put) Else(Range)`.
    /// Returns `.written` with the put's revision, or `.changed` with the
    /// current value (nil if the key is gone) when someone else got there first.
    public func compareAndPut(
        _ key: String,
        value: [UInt8],
        lease: Int64 = 0,
        modRevision: Int64
    )
        async throws(EtcdError) -> EtcdSwapResult
    {
        var compare = Etcdserverpb_Compare()
        compare.target = .mod
        compare.modRevision = modRevision
        let response = try await putIf(
            compare,
            key: key,
            value: value,
            lease: lease,
            operation: "Txn compare-and-put \(key)@\(modRevision)"
        )
        if response.succeeded { return .written(revision: response.header.revision) }
        guard case .responseRange(let found)? = response.responses.first?.response else {
            return .changed(current: nil)
        }
        return .changed(current: found.kvs.first.map(EtcdKeyValue.init))
    }

    /// Deletes `key` only if it was not changed since `modRevision`, in one
    /// transaction: `If(mod_revision(key) == modRevision) Then(DeleteRange) Else(Range)`.
    /// Returns `.written` with the delete's revision, or `.changed` with the
    /// current value (nil if the key is gone) when someone else wrote it meanwhile.
    public func compareAndDelete(_ key: String, modRevision: Int64) async throws(EtcdError) -> EtcdSwapResult {
        var compare = Etcdserverpb_Compare()
        compare.target = .mod
        compare.modRevision = modRevision
        compare.key = Data(key.utf8)
        compare.result = .equal
        var delete = Etcdserverpb_DeleteRangeRequest()
        delete.key = Data(key.utf8)
        var get = Etcdserverpb_RangeRequest()
        get.key = Data(key.utf8)
        var request = Etcdserverpb_TxnRequest()
        request.compare = [compare]
        request.success = [.with { $0.requestDeleteRange = delete }]
        request.failure = [.with { $0.requestRange = get }]
        let response = try await perform("Txn compare-and-delete \(key)@\(modRevision)") {
            [request] metadata, options in
            try await self.kv.txn(request, metadata: metadata, options: options)
        }
        if response.succeeded { return .written(revision: response.header.revision) }
        guard case .responseRange(let found)? = response.responses.first?.response else {
            return .changed(current: nil)
        }
        return .changed(current: found.kvs.first.map(EtcdKeyValue.init))
    }

    /// The end of the range holding every key that starts with `prefix`:
    /// the prefix with its last byte incremented (trailing 0xff bytes
    /// dropped); "\0" (every key) when nothing is left.
    static func prefixEnd(_ prefix: String) -> Data {
        var bytes = Array(prefix.utf8)
        while let last = bytes.last {
            if last < 0xff {
                bytes[bytes.count - 1] = last + 1
                return Data(bytes)
            }
            bytes.removeLast()
        }
        return Data([0])
    }
}
