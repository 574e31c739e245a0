//! Gives back what start-up used once the daemon is running.
//!
//! Start-up (the argument and config parsers, key generation, the first
//! pass, the AWS and HTTP set-up) runs about 5 MiB of keyroll's executable
//! that the steady state never runs again. The kernel maps those pages in,
//! and 64 KiB around each one touched (fault-around), and leaves them
//! mapped: they count in the resident set and, being mapped executable
//! code, are among the last pages the kernel reclaims. After the first
//! pass the daemon unmaps the executable's read-only segments
//! (`MADV_DONTNEED`): their pages stay in the page cache, shared and
//! reclaimable, and the code that runs again is mapped back in at its
//! first use. The heap's free memory goes back too (`malloc_trim`).
//!
//! Only segments the program never writes are dropped: `PT_LOAD` segments
//! without `PF_W`. The RELRO part of the writable segment (relocated
//! pointers, read-only after start) is a private copy and is left alone:
//! dropping it would bring back the unrelocated file contents.

use std::ffi::{c_int, c_void};

/// Unmaps the executable's read-only segments and trims the heap; returns
/// how many bytes of mappings were dropped. Safe to call at any time: the
/// dropped pages are the file's own contents, mapped back on use.
pub fn release_startup_pages() -> usize {
    let mut segments: Vec<(usize, usize)> = Vec::new();
    // SAFETY: the callback only reads the program headers glibc hands it
    // for the duration of the call, and writes to `segments`, which
    // outlives the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(read_only_segments),
            (&mut segments as *mut Vec<(usize, usize)>).cast(),
        );
    }
    let page = page_size();
    let mut dropped = 0;
    for (start, end) in segments {
        // Whole pages inside the segment only: a page it shares with a
        // writable segment stays.
        let first = start.div_ceil(page) * page;
        let last = end / page * page;
        if last <= first {
            continue;
        }
        // SAFETY: [first, last) lies within a mapped, never-written,
        // file-backed segment of this executable; MADV_DONTNEED there
        // only drops page-table entries, refilled from the same file.
        let done =
            unsafe { libc::madvise(first as *mut c_void, last - first, libc::MADV_DONTNEED) };
        if done == 0 {
            dropped += last - first;
        }
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    dropped
}

/// `dl_iterate_phdr` callback: collects the main program's (the first
/// object's) loadable segments that are not writable, then stops.
unsafe extern "C" fn read_only_segments(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    data: *mut c_void,
) -> c_int {
    // SAFETY (caller): `info` points to a valid dl_phdr_info for the
    // duration of the call and `data` is the Vec passed in above.
    let (info, segments) = unsafe { (&*info, &mut *data.cast::<Vec<(usize, usize)>>()) };
    if info.dlpi_phdr.is_null() {
        return 1;
    }
    // SAFETY: glibc guarantees `dlpi_phnum` headers at `dlpi_phdr`.
    let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    for header in headers {
        if header.p_type == libc::PT_LOAD && header.p_flags & libc::PF_W == 0 {
            let start = info.dlpi_addr as usize + header.p_vaddr as usize;
            segments.push((start, start + header.p_memsz as usize));
        }
    }
    1 // the main program is the first object: stop there
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Code and read-only data still work after their pages were dropped:
    /// they come back from the executable file.
    #[test]
    fn the_program_runs_on_after_its_read_only_pages_are_dropped() {
        static TABLE: [u64; 4] = [3, 1, 4, 1];
        let before: u64 = TABLE.iter().sum();
        let text = format!("{:?}", std::hint::black_box(TABLE));
        assert!(
            release_startup_pages() > 0,
            "the executable has read-only segments"
        );
        assert_eq!(TABLE.iter().sum::<u64>(), before);
        assert_eq!(format!("{:?}", std::hint::black_box(TABLE)), text);
        // Twice is as harmless as once.
        release_startup_pages();
        assert_eq!(serde_json::to_string(&TABLE).unwrap(), "[3,1,4,1]");
    }
}
