//! Read-only memory maps of weight files, so that other crates can borrow tensor bytes without
//! copying and without `unsafe` of their own.

use std::fs::File;
use std::path::Path;

pub use memmap2::Mmap;

/// Map `path` read-only. The bytes stay valid while the returned map lives.
///
/// Assumption (the usual one for mapped model files): nothing truncates or rewrites the file
/// while it is mapped. Reading a page of a file truncated underneath raises SIGBUS; the contents
/// of a file rewritten in place may change under readers.
pub fn map_file(path: &Path) -> std::io::Result<Mmap> {
    let file = File::open(path)?;
    // SAFETY: the map is read-only and private to this process's view; memmap2 bounds every
    // access by the length it mapped. The remaining hazard, another process modifying or
    // truncating the file while mapped, is outside what Rust can guard and is documented above.
    unsafe { Mmap::map(&file) }
}
