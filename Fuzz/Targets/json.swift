// libFuzzer target: the JSON parser (Sources/LeaseStore/JSON.swift) and the network config
// built on it (NetworkConfig.swift). Whatever parses must re-encode to text that parses to
// the same value; whatever does not must be refused with a position inside the text.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzJSON(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    do {
        let value = try JSONValue(parsing: bytes)
        let compact = value.compactText
        guard let again = try? JSONValue(parsing: compact), again == value, again.compactText == compact else {
            fatalError("re-encoding \(compact) does not parse to the same value")
        }
    } catch {
        let lines = bytes.filter { $0 == 0x0a }.count + 1
        precondition(
            error.line >= 1 && error.line <= lines && error.column >= 1 && error.column <= size + 1,
            "error position \(error.line):\(error.column) outside the text"
        )
    }
    if let config = try? NetworkConfig(json: String(decoding: bytes, as: UTF8.self)) {
        precondition(config.subnetLen >= config.network.prefixLength + 2 && config.subnetLen <= 30)
        precondition(config.network.contains(config.subnetMin) && config.network.contains(config.subnetMax))
        precondition(config.subnetMin.address <= config.subnetMax.address && config.subnets.count >= 1)
        precondition(config.subnets[config.subnets.count - 1] == config.subnetMax)
    }
    return 0
}
