//! Gives back, once the models are loaded, the memory that loading them took
//! and serving them does not (issue 20: the agent's RSS with several models).
//!
//! Measured on the static device build serving five small models (docs/
//! benchmarks.md): most of the RSS is the binary's own code pages (8.8 MB of
//! 13.6 MB), and most of those are code that ran once, to parse and optimise
//! each model (tract's ONNX front end and its optimiser passes: each kind of
//! model touches more of it). Those pages are clean and backed by the binary
//! file: [`trim_after_load`] tells the kernel the process does not need them
//! now (`madvise(MADV_DONTNEED)` on the executable's code), so they leave the
//! RSS and the device's memory; the code the requests run comes back from the
//! page cache on its first use. It also hands the allocator's free pages back
//! (`mi_collect` on the device build, `malloc_trim` with glibc).

/// Gives back the allocator's free pages and the binary's code pages (see the
/// module doc). Logs, and otherwise ignores, what it cannot do.
pub fn trim_after_load() {
    release_free_heap();
    if let Err(e) = drop_code_pages() {
        tracing::debug!("code pages kept: {e}");
    }
}

#[cfg(all(target_env = "musl", not(target_arch = "arm")))]
fn release_free_heap() {
    // SAFETY: mimalloc's own collection entry point, with no pointers passed;
    // it is the global allocator of this build (main.rs).
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

#[cfg(target_env = "gnu")]
fn release_free_heap() {
    // SAFETY: glibc's malloc_trim takes no pointer and only returns free pages.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(any(target_env = "gnu", all(target_env = "musl", not(target_arch = "arm")))))]
fn release_free_heap() {}

/// `madvise(MADV_DONTNEED)` on every executable mapping of this program's
/// own file, as `/proc/self/maps` lists them.
fn drop_code_pages() -> std::io::Result<()> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    for (start, end) in code_mappings(&maps, &exe.to_string_lossy()) {
        // SAFETY: the range is a whole mapping of the executable's code,
        // read-only and backed by its file: dropping its pages only makes the
        // next access read them again from the page cache (private file
        // mappings of unmodified pages, madvise(2)). No Rust object lives there.
        #[allow(unsafe_code)]
        let done =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The `start..end` of each read-only executable mapping of `path` in a
/// `/proc/self/maps` text. Pure.
pub fn code_mappings(maps: &str, path: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let file = fields.nth(3)?;
            if !perms.starts_with("r-x") || file != path {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_programs_own_code_mappings_are_picked() {
        let maps = "\
55d0a0000000-55d0a0100000 r--p 00000000 08:01 42 /usr/bin/edgefleet-agent
55d0a0100000-55d0a0900000 r-xp 00100000 08:01 42 /usr/bin/edgefleet-agent
55d0a0900000-55d0a0a00000 rw-p 00900000 08:01 42 /usr/bin/edgefleet-agent
7f0000000000-7f0000100000 r-xp 00000000 08:01 43 /usr/lib/libc.so.6
7f0000200000-7f0000300000 rw-p 00000000 00:00 0 
7ffc00000000-7ffc00001000 r-xp 00000000 00:00 0 [vdso]
garbage line
";
        assert_eq!(
            code_mappings(maps, "/usr/bin/edgefleet-agent"),
            vec![(0x55d0_a010_0000, 0x55d0_a090_0000)]
        );
        assert!(code_mappings(maps, "/other").is_empty());
    }

    #[test]
    fn trimming_keeps_the_program_running() {
        trim_after_load();
        // Code and heap still work after the pages were dropped.
        let v: Vec<u64> = (0..100_000).collect();
        assert_eq!(v.iter().sum::<u64>(), 4_999_950_000);
    }
}
