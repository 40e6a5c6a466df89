//! Per-thread scratch buffers that kernels keep between calls.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Runs `f` on this thread's value of `key` (buffers that keep their capacity between calls,
/// so a decode step or a prefill product allocates nothing once they have grown), or on a
/// fresh default where the value is already borrowed further up this thread's stack (a nested
/// call, e.g. from inside a rayon task that waits on another).
pub(crate) fn with_local<T: Default, R>(key: &'static LocalKey<RefCell<T>>, f: impl FnOnce(&mut T) -> R) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut value) => f(&mut value),
        Err(_) => f(&mut T::default()),
    })
}
