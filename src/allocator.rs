//! The allocator of every Palisade process: jemalloc, configured for a small resident set.
//!
//! Per request a sidecar allocates and frees a few buffers of 1–8 KiB: a TLS record to encrypt,
//! HTTP read buffers. glibc's malloc serves sizes above its 1 KiB per-thread cache from shared
//! bins, at 300–600 instructions a call; jemalloc's per-thread cache holds them. Measured on a
//! sidecar pair with callgrind (`bench/instructions`): 2.5 % fewer instructions per request.
//! mimalloc did as well on instructions but, in both versions tried, kept 5–9 MiB more resident
//! per sidecar unless an environment variable turned its eager arena commit off; jemalloc's
//! options are compiled in below (docs/benchmarks.md has the figures).
#![allow(unsafe_code)] // the one exception to the crate's rule: the options symbol jemalloc reads

use std::ffi::c_char;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The options jemalloc reads before `main` (its weak `malloc_conf` symbol, `_rjem_`-prefixed
/// as `tikv-jemalloc-sys` builds it). `_RJEM_MALLOC_CONF` in the environment still overrides
/// them, for an experiment.
/// - `narenas:1`: one arena. A sidecar's data path is one thread; the default, four arenas per
///   CPU, spreads the control-plane and admin threads' few allocations over arenas of their
///   own, each with its own partly used pages.
/// - `dirty_decay_ms:1000,muzzy_decay_ms:0`: pages freed for a second go back to the kernel
///   (the default keeps them ten seconds), so a burst does not stay resident.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&'static c_char> =
    Some(unsafe { &*c"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr() });

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    /// An `opt.*` value read back from the running allocator.
    fn opt<T: Default>(name: &CStr) -> T {
        let mut value = T::default();
        let mut len = size_of::<T>();
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(name.as_ptr(), (&raw mut value).cast(), &mut len, std::ptr::null_mut(), 0)
        };
        assert_eq!(rc, 0, "mallctl {name:?}");
        value
    }

    #[test]
    fn jemalloc_runs_with_the_compiled_in_options() {
        // Fails if jemalloc did not find the symbol (a changed prefix, say) and ran on defaults.
        assert_eq!(opt::<u32>(c"opt.narenas"), 1, "one arena, not the default four per CPU");
        assert_eq!(opt::<isize>(c"opt.dirty_decay_ms"), 1000);
        assert_eq!(opt::<isize>(c"opt.muzzy_decay_ms"), 0);
    }
}
