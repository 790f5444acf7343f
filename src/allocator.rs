//! How the process's allocator is set up before any thread starts.
//!
//! glibc's malloc gives threads that meet on its lock arenas of their own (up to eight per
//! core), and memory freed in one arena serves only that arena. Measured in a cold start of
//! 1,000 connections (`make bench`, docs/performance.md): 20.3 MB of anonymous memory with
//! the default, 16.0 MB with two arenas, 13.8 MB with one, and no change in the time it took
//! (each thread's own cache of small blocks spares most allocations the lock). At 10,000:
//! 84.7 and 79.8 MB.

/// The arenas the operator allows itself when `MALLOC_ARENA_MAX` is not set.
pub const ARENAS: i32 = 1;

/// Limits glibc's malloc to [`ARENAS`] arenas, unless `MALLOC_ARENA_MAX` says otherwise (glibc
/// reads it itself). Call it first thing in `main`, before the runtime's threads exist.
pub fn limit_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator; called before other threads
    // exist, nothing races with it. Its result (0 when refused) changes nothing we rely on.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}
