import CTunnel

/// Returns the heap's free pages to the kernel. glibc keeps memory freed in
/// the middle of the heap mapped, so after a burst of short-lived
/// allocations (a start-up list of 60,000 leases) the resident size would
/// stay at the burst's high-water mark without this.
public func releaseFreeHeapMemory() {
    _ = ctunnel_malloc_trim()
}
