//! Path normalization (`guard::path`) at every level: it never panics, what it returns is a
//! fixed point (normalizing again changes nothing, so policy and app see the same path), and a
//! normalized path has no dot segment a backend could resolve differently.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::guard::path::{Normalization, normalize};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    for level in
        [Normalization::None, Normalization::Base, Normalization::MergeSlashes, Normalization::DecodeAndMergeSlashes]
    {
        let Ok(once) = normalize(path, level) else { continue };
        if level == Normalization::None {
            continue;
        }
        let twice = normalize(&once, level).expect("a normalized path normalizes again");
        assert_eq!(once, twice, "not a fixed point at {level:?}: {path:?}");
        let only_path: &str = &once;
        for segment in only_path.split('/') {
            assert!(segment != "." && segment != "..", "dot segment left at {level:?}: {path:?} -> {once:?}");
        }
        if matches!(level, Normalization::MergeSlashes | Normalization::DecodeAndMergeSlashes) {
            assert!(!only_path.contains("//"), "double slash left at {level:?}: {path:?} -> {once:?}");
        }
    }
});
