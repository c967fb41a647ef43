import ArgumentParser
import LeaseStore

extension StoreOptions {
    func makeEtcdStore() throws -> any LeaseStore {
        throw ValidationError("the etcd store is not built into this version yet; use --store-dir DIR for the local store")
    }
}
