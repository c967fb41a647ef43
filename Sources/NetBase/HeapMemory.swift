import CTunnel

/// Returns the heap's free pages to the kernel. glibc keeps memory freed in
/// the middle of the heap mapped, so after a burst of short-lived
/// allocations (a start-up list of 60,000 leases) the resident size would
/// stay at the burst's high-water mark without this.
public func releaseFreeHeapMemory() {
    _ = ctunnel_malloc_trim()
}

/// Makes the heap give memory back as it goes: blocks of 256 KiB and more
/// (a page of listed leases, a peer table) get mappings of their own and
/// leave no hole when freed. Called once at start, before the big lists.
public func useReturningHeap() {
    ctunnel_malloc_thresholds(256 * 1024)
}
