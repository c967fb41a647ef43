import FlannelFiles

/// The delegate configs saved at ADD, one file per container ID in the
/// network config's `dataDir` (flannel's /var/lib/cni/flannel), so that DEL
/// and CHECK use what ADD used even after subnet.env changed or vanished.
public struct DelegateStore: Sendable {
    public var directory: String

    public init(directory: String) { self.directory = directory }

    public func path(for containerID: String) -> String { "\(directory)/\(containerID)" }

    /// Saves atomically; the directory is created 0700 and the file is
    /// 0600, as flannel's plugin does.
    public func save(_ config: [UInt8], for containerID: String) throws(CNIError) {
        do {
            try FileIO.makeDirectories(directory, mode: 0o700)
            try FileIO.writeAtomically(path(for: containerID), config, mode: 0o600)
        } catch {
            throw CNIError(
                code: CNIError.ioFailure,
                "cannot save the delegate config for container \(containerID): \(error)",
                details: "DEL needs it later; \"dataDir\" in the network config chooses the directory"
            )
        }
    }

    /// The saved config, or nil if there is none.
    public func load(for containerID: String) throws(CNIError) -> [UInt8]? {
        do {
            return try FileIO.read(path(for: containerID), limit: 1 << 20)
        } catch {
            throw CNIError(
                code: CNIError.ioFailure,
                "cannot read the saved delegate config of container \(containerID): \(error)"
            )
        }
    }

    /// Where an unreadable saved config is kept: a name no container ID can have (IDs
    /// begin with a letter or digit), so it never collides with a container's file.
    public func asidePath(for containerID: String) -> String { "\(directory)/.unreadable-\(containerID)" }

    /// Moves the saved config out of DEL's way, keeping its bytes for whoever looks into
    /// why it was unreadable; returns where it now is.
    public func setAside(for containerID: String) throws(CNIError) -> String {
        let aside = asidePath(for: containerID)
        do {
            try FileIO.move(path(for: containerID), to: aside)
        } catch {
            throw CNIError(
                code: CNIError.ioFailure,
                "cannot move the unreadable delegate config of container \(containerID) aside: \(error)",
                details: "remove \(path(for: containerID)) by hand; DEL then succeeds with nothing to delete"
            )
        }
        return aside
    }

    public func remove(for containerID: String) throws(CNIError) {
        do {
            try FileIO.remove(path(for: containerID))
        } catch {
            throw CNIError(
                code: CNIError.ioFailure,
                "cannot remove the saved delegate config of container \(containerID): \(error)"
            )
        }
    }
}
