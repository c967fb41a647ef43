import ArgumentParser
import Testing

@testable import tunneld

@Suite struct FlannelArgumentsTests {
    @Test func flanneldSingleDashFlagsBecomeLongOptions() {
        let args = FlannelArguments.normalize(
            ["run", "-etcd-endpoints=http://198.18.0.250:2379", "-iface=ens33", "-etcd-prefix=/docker/network/"],
            environment: [:]
        )
        #expect(
            args == [
                "run", "--etcd-endpoints=http://198.18.0.250:2379", "--iface=ens33",
                "--etcd-prefix=/docker/network/",
            ]
        )
    }

    @Test func spaceSeparatedValuesAndShortFlagsAreLeftAlone() {
        let args = FlannelArguments.normalize(["run", "-iface", "eth0", "-h", "--device", "tun0"], environment: [:])
        #expect(args == ["run", "--iface", "eth0", "-h", "--device", "tun0"])
    }

    @Test func goStyleBooleansAreUnderstood() {
        #expect(FlannelArguments.normalize(["run", "-ip-masq=true"], environment: [:]) == ["run", "--ip-masq"])
        #expect(FlannelArguments.normalize(["run", "--ip-masq=false"], environment: [:]) == ["run"])
        #expect(
            FlannelArguments.normalize(["run", "-release-on-exit"], environment: [:]) == ["run", "--release-on-exit"]
        )
        // Not a boolean word: left for the parser to reject with its own message.
        #expect(
            FlannelArguments.normalize(["run", "--ip-masq=maybe"], environment: [:]) == ["run", "--ip-masq=maybe"]
        )
    }

    @Test func theLaterFlanneldSwitchesAreUnderstood() {
        #expect(
            FlannelArguments.normalize(
                ["run", "-ip-blackhole-route", "-ip-masq-fully-random-disable=true"],
                environment: [:]
            )
                == ["run", "--ip-blackhole-route", "--ip-masq-fully-random-disable"]
        )
        #expect(FlannelArguments.normalize(["run", "-ip-blackhole-route=false"], environment: [:]) == ["run"])
        #expect(
            FlannelArguments.normalize(["run", "-iface-can-reach=198.18.0.250"], environment: [:])
                == ["run", "--iface-can-reach=198.18.0.250"]
        )
        let fromEnvironment = FlannelArguments.normalize(
            ["run"],
            environment: [
                "FLANNELD_IP_BLACKHOLE_ROUTE": "true", "FLANNELD_IFACE_CAN_REACH": "198.18.0.250",
                "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE": "1",
            ]
        )
        #expect(fromEnvironment.contains("--ip-blackhole-route"))
        #expect(fromEnvironment.contains("--ip-masq-fully-random-disable"))
        #expect(fromEnvironment.contains("--iface-can-reach") && fromEnvironment.contains("198.18.0.250"))
    }

    @Test func ifaceCanReachMustBeAnAddress() throws {
        #expect(throws: Never.self) { try Run.parse(["--iface-can-reach", "198.18.0.250"]) }
        #expect { try Run.parse(["--iface-can-reach", "eth0"]) } throws: { error in
            Run.message(for: error).contains("--iface-can-reach eth0 is not an IPv4 address")
        }
    }

    @Test func environmentFillsInWhatTheCommandLineLeftOut() {
        let args = FlannelArguments.normalize(
            ["run", "--iface", "eth1"],
            environment: [
                "FLANNELD_IFACE": "eth0", "FLANNELD_ETCD_PREFIX": "/docker/network",
                "TUNNELD_DEVICE": "tun7", "FLANNELD_IP_MASQ": "false", "UNRELATED": "x",
            ]
        )
        #expect(args.starts(with: ["run", "--iface", "eth1"]))
        #expect(!args.contains("eth0"), "the command line wins over the environment")
        #expect(args.contains("--etcd-prefix") && args.contains("/docker/network"))
        #expect(args.contains("--device") && args.contains("tun7"))
        #expect(!args.contains("--ip-masq"))
    }

    /// flanneld's environment file loaded in a shell must not break the
    /// other subcommands: they take only the store's settings from it.
    @Test func otherSubcommandsTakeOnlyTheStoresFlagsFromTheEnvironment() throws {
        let environment = [
            "FLANNELD_IFACE": "eth0", "FLANNELD_IP_MASQ": "true", "FLANNELD_HEALTHZ_PORT": "abc",
            "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "-5", "FLANNELD_V": "3",
            "FLANNELD_ETCD_ENDPOINTS": "http://198.18.0.250:2379", "FLANNELD_ETCD_PREFIX": "/docker/network",
        ]
        for command in [["leases"], ["config", "get"], ["config", "set", "-"]] {
            let args = FlannelArguments.normalize(command, environment: environment)
            #expect(
                args == command + ["--etcd-endpoints", "http://198.18.0.250:2379", "--etcd-prefix", "/docker/network"]
            )
            _ = try Tunneld.parseAsRoot(args)
        }
        #expect(FlannelArguments.normalize(["run"], environment: environment).contains("--iface"))
    }

    /// The unit's environment file may move the control socket; `status`
    /// must then look where the daemon listens (and a command line still wins).
    @Test func statusTakesTheControlSocketFromTheEnvironment() throws {
        let environment = [
            "TUNNELD_CONTROL_SOCKET": "/run/t/x.sock", "FLANNELD_IFACE": "eth0",
            "FLANNELD_ETCD_PREFIX": "/docker/network",
        ]
        let args = FlannelArguments.normalize(["status"], environment: environment)
        #expect(args == ["status", "--control-socket", "/run/t/x.sock", "--etcd-prefix", "/docker/network"])
        _ = try Tunneld.parseAsRoot(args)
        let given = FlannelArguments.normalize(["status", "--control-socket", "/tmp/y.sock"], environment: environment)
        #expect(given == ["status", "--control-socket", "/tmp/y.sock", "--etcd-prefix", "/docker/network"])
        #expect(!FlannelArguments.normalize(["leases"], environment: environment).contains("--control-socket"))
    }

    @Test func repeatableFlagsTakeCommaSeparatedListsFromTheEnvironment() {
        let args = FlannelArguments.normalize(["run"], environment: ["FLANNELD_IFACE": "eth0,198.18.0.1"])
        #expect(args == ["run", "--iface", "eth0", "--iface", "198.18.0.1"])
    }

    @Test func everythingAfterADoubleDashIsUntouched() {
        let args = FlannelArguments.normalize(["config", "set", "--", "-iface=x"], environment: [:])
        #expect(args == ["config", "set", "--", "-iface=x"])
    }

    @Test func forwardRulesAreOnUnlessTurnedOffTheGoWay() throws {
        #expect(
            FlannelArguments.normalize(["run", "-iptables-forward-rules=false"], environment: [:])
                == ["run", "--no-iptables-forward-rules"]
        )
        #expect(
            FlannelArguments.normalize(
                ["run", "-iptables-forward-rules=true", "-iptables-resync=10"],
                environment: [:]
            )
                == ["run", "--iptables-forward-rules", "--iptables-resync=10"]
        )
        #expect(
            FlannelArguments.normalize(["run", "-iptables-resync", "2"], environment: [:])
                == ["run", "--iptables-resync", "2"]
        )
        #expect(
            FlannelArguments.normalize(
                ["run"],
                environment: [
                    "FLANNELD_IPTABLES_FORWARD_RULES": "false",
                    "FLANNELD_IPTABLES_RESYNC": "7",
                ]
            )
                == ["run", "--no-iptables-forward-rules", "--iptables-resync", "7"]
        )
        // Given on the command line, the environment does not add a second.
        #expect(
            FlannelArguments.normalize(
                ["run", "--no-iptables-forward-rules"],
                environment: ["FLANNELD_IPTABLES_FORWARD_RULES": "true"]
            )
                == ["run", "--no-iptables-forward-rules"]
        )

        let parsed = try Tunneld.parseAsRoot(
            FlannelArguments.normalize(
                ["run", "-iptables-forward-rules=false", "-iptables-resync=9"],
                environment: [:]
            )
        )
        let run = try #require(parsed as? Run)
        #expect(!run.iptablesForwardRules && run.iptablesResync == 9)
        let defaults = try #require(try Tunneld.parseAsRoot(["run"]) as? Run)
        #expect(defaults.iptablesForwardRules && defaults.iptablesResync == 5 && !defaults.ipMasq)
        #expect(throws: (any Error).self) { try Tunneld.parseAsRoot(["run", "--iptables-resync", "0"]) }
    }

    @Test func theEtcdKeepaliveFlagsHaveDefaultsComeFromTheEnvironmentAndRefuseNonsense() throws {
        let defaults = try #require(try Tunneld.parseAsRoot(["run"]) as? Run)
        #expect(defaults.storeOptions.etcdKeepaliveTime == 2 && defaults.storeOptions.etcdKeepaliveTimeout == 3)
        let given = try #require(
            try Tunneld.parseAsRoot(
                FlannelArguments.normalize(
                    ["run", "-etcd-keepalive-time=10"],
                    environment: ["TUNNELD_ETCD_KEEPALIVE_TIMEOUT": "4.5"]
                )
            ) as? Run
        )
        #expect(given.storeOptions.etcdKeepaliveTime == 10 && given.storeOptions.etcdKeepaliveTimeout == 4.5)
        for bad in [
            ["--etcd-keepalive-time", "0"], ["--etcd-keepalive-timeout", "-1"], ["--etcd-keepalive-time", "nan"],
        ] {
            #expect(throws: (any Error).self) { try Tunneld.parseAsRoot(["run"] + bad) }
        }
        let error = #expect(throws: (any Error).self) {
            try Tunneld.parseAsRoot(["run", "--etcd-keepalive-timeout", "0"])
        }
        #expect(
            error.map { Tunneld.message(for: $0) }?.contains(
                "--etcd-keepalive-timeout must be between 0.1 and 3600 seconds"
            ) == true
        )
    }

    @Test func flanneldFlagsTunneldLacksAreNamedWithWhatToDo() {
        #expect(
            FlannelArguments.unsupported(["run", "-kube-subnet-mgr"])?.contains("not in Kubernetes node objects")
                == true
        )
        #expect(FlannelArguments.unsupported(["run", "--public-ipv6=fd00::1"]) == nil)
        #expect(FlannelArguments.unsupported(["run", "-ipv6-masq"])?.contains("not built in tunneld yet") == true)
        #expect(FlannelArguments.unsupported(["run", "-charon-viciuri=x"])?.contains("ipsec backend") == true)
        #expect(FlannelArguments.unsupported(["run", "-iface=eth0", "-ip-masq"]) == nil)
    }
}

@Suite struct PublicIPv6FlagTests {
    @Test func publicIPv6IsTakenFromTheFlagOrFlanneldsVariable() throws {
        for arguments in [
            ["run", "-public-ipv6=2001:db8::5"], ["run", "-public-ipv6", "2001:db8::5"],
            ["run", "--public-ipv6=2001:db8::5"],
        ] {
            let command = try Tunneld.parseAsRoot(FlannelArguments.normalize(arguments, environment: [:]))
            #expect((command as? Run)?.flanneld.publicIPv6 == "2001:db8::5", "\(arguments)")
        }
        let fromEnvironment = try Tunneld.parseAsRoot(
            FlannelArguments.normalize(["run"], environment: ["FLANNELD_PUBLIC_IPV6": "2001:db8::6"])
        )
        #expect((fromEnvironment as? Run)?.flanneld.publicIPv6 == "2001:db8::6")
    }

    @Test func aPublicIPv6ThatIsNoAddressIsRefused() {
        let error = #expect(throws: (any Error).self) {
            try Tunneld.parseAsRoot(FlannelArguments.normalize(["run", "-public-ipv6=fd00::/64"], environment: [:]))
        }
        #expect(
            error.map { Tunneld.message(for: $0) }?.contains("--public-ipv6 fd00::/64 is not an IPv6 address") == true
        )
    }
}
