import ArgumentParser
import EtcdClient
import LeaseStore
import Logging

extension StoreOptions {
    func makeEtcdStore() throws -> any LeaseStore {
        let endpoints = etcdEndpoints.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty }
        guard !endpoints.isEmpty else {
            throw ValidationError("--etcd-endpoints is empty; give one or more URLs, e.g. http://127.0.0.1:2379")
        }
        let tls: EtcdTLS? =
            (etcdCafile ?? etcdCertfile ?? etcdKeyfile) == nil
            ? nil
            : EtcdTLS(caFile: etcdCafile, certFile: etcdCertfile, keyFile: etcdKeyfile)
        if (etcdCertfile == nil) != (etcdKeyfile == nil) {
            throw ValidationError(
                "--etcd-certfile and --etcd-keyfile go together: give both for a client certificate, or neither"
            )
        }
        var credentials: EtcdCredentials?
        if let etcdUsername {
            credentials = EtcdCredentials(username: etcdUsername, password: etcdPassword ?? "")
        } else if etcdPassword != nil {
            throw ValidationError("--etcd-password needs --etcd-username")
        }
        let client = try EtcdClient(
            endpoints: endpoints,
            tls: tls,
            credentials: credentials,
            keepaliveTime: .milliseconds(Int(etcdKeepaliveTime * 1000)),
            keepaliveTimeout: .milliseconds(Int(etcdKeepaliveTimeout * 1000)),
            logger: Logger(label: "tunneld.etcd")
        )
        return EtcdLeaseStore(
            client: client,
            prefix: etcdPrefix,
            leaseTTL: leaseTTL,
            logger: Logger(label: "tunneld.etcd")
        )
    }
}
