//! The decode team: helper threads that run one parallel region of small tasks at a time, for
//! the memory-bound products of a decode step.
//!
//! A decode step is ~150 short regions (one per group of products), separated by a few
//! microseconds of serial work. A general pool puts its idle workers to sleep after a few
//! microseconds, so every region pays a futex wake — in a virtual machine an inter-processor
//! interrupt and tens of microseconds — and SmolLM2 lost a third of its decode time that way.
//! Here helpers spin on an epoch counter for a short while after each region (`SPIN`) before
//! they park, so back-to-back regions find them awake.
//!
//! Tasks are claimed one at a time from a shared counter by the leader (the caller) and the
//! helpers alike, so no thread owns a fixed share: a helper that has lost its core claims
//! nothing, and the leader runs the tasks itself. The only wait is for tasks already claimed
//! and running, which is why tasks are small. There is no barrier that every thread must reach.
//!
//! A region costs a few hundred nanoseconds of hand-off, not microseconds: the job lives on the
//! leader's stack and is published through an atomic pointer (no allocation, no lock on the
//! path of a spinning helper), the condition variable is signalled only when a helper is
//! parked (a futex wake is a system call even with no one waiting), and each thread reports the
//! units it ran once per region rather than once per claimed range (the counter's cache line
//! moves between cores on every update).

use std::ops::Range;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long an idle helper keeps spinning for the next region before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// Part boundaries a region may hold (a chunk never spans two parts).
pub const MAX_PARTS: usize = 8;

/// One region: units `0..n` handed to `f` as ranges claimed through `next` (guided: a claim
/// takes a share of what is left, never less than `min`, never across a part boundary), counted
/// through `done`.
struct Job<'a> {
    f: &'a (dyn Fn(Range<usize>) + Sync + 'a),
    n: usize,
    min: usize,
    /// Threads that may claim (the claim size divides what is left among them).
    threads: usize,
    /// Ascending part ends (the last is `n`).
    bounds: [usize; MAX_PARTS],
    parts: usize,
    next: AtomicUsize,
    /// Units run to completion, added by each thread once, when it finds nothing left to claim.
    done: AtomicUsize,
}

impl Job<'_> {
    /// Claims and runs ranges until none are left, then reports how many units it ran.
    fn work(&self) {
        let mut ran = 0;
        loop {
            let cur = self.next.load(Ordering::Acquire);
            if cur >= self.n {
                break;
            }
            let part_end = self.bounds[..self.parts].iter().copied().find(|&b| b > cur).unwrap_or(self.n);
            // Large claims while much is left (long contiguous streams), small ones at the end
            // (a short tail for whoever finishes last).
            let size = ((self.n - cur) / (2 * self.threads)).max(self.min);
            let end = (cur + size).min(part_end);
            if self.next.compare_exchange_weak(cur, end, Ordering::AcqRel, Ordering::Acquire).is_err() {
                continue;
            }
            (self.f)(cur..end);
            ran += end - cur;
        }
        if ran > 0 {
            self.done.fetch_add(ran, Ordering::Release);
        }
    }
}

/// The published region, its lifetime erased: see [`Team::run_ranges`] for why it is alive
/// whenever a helper dereferences it.
type JobPtr = *mut Job<'static>;

struct Shared {
    epoch: AtomicU64,
    /// The current region's job on the leader's stack, or null between regions.
    job: AtomicPtr<Job<'static>>,
    /// Helpers between announcing themselves and leaving a job: the leader does not return (its
    /// job would go out of scope) while any is.
    users: AtomicUsize,
    /// Helpers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

/// A team of `helpers` threads plus whichever thread calls [`Team::run`].
pub struct Team {
    shared: Arc<Shared>,
    helpers: usize,
    /// One region at a time.
    lead: Mutex<()>,
}

impl Team {
    /// The process's team: one helper fewer than the kernel threads (the caller is the last).
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team::new(crate::cpu::threads().saturating_sub(1)))
    }

    pub fn new(helpers: usize) -> Team {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            users: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        for i in 0..helpers {
            let s = Arc::clone(&shared);
            // A helper that cannot start only makes the team smaller: the leader runs its share.
            let _ = thread::Builder::new().name(format!("lacuna-team-{i}")).spawn(move || helper(&s));
        }
        Team { shared, helpers, lead: Mutex::new(()) }
    }

    /// Threads that take part in a region (helpers and the caller).
    pub fn size(&self) -> usize {
        self.helpers + 1
    }

    /// Runs `f(0) … f(n - 1)`, each exactly once, across the team and the calling thread;
    /// returns when all have finished.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.run_ranges(n, &[n], 1, &|r: Range<usize>| r.for_each(f));
    }

    /// Hands every unit of `0..n` to `f` exactly once, as ranges of at least `min` units (fewer
    /// only at a part end) that never cross an entry of `bounds` (ascending part ends, at most
    /// [`MAX_PARTS`], the last `n`); returns when all have finished. A thread that finishes its
    /// range claims the next, so a thread that has lost its core delays only the range it holds.
    pub fn run_ranges(&self, n: usize, bounds: &[usize], min: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        if n == 0 {
            return;
        }
        let parts = bounds.len().min(MAX_PARTS);
        let mut b = [n; MAX_PARTS];
        b[..parts].copy_from_slice(&bounds[..parts]);
        if self.helpers == 0 || n <= min.max(1) {
            let mut start = 0;
            for &end in b[..parts].iter().chain(std::iter::once(&n)) {
                let end = end.min(n);
                if end > start {
                    f(start..end);
                    start = end;
                }
            }
            return;
        }
        let _lead = self.lead.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job {
            f,
            n,
            min: min.max(1),
            threads: self.helpers + 1,
            bounds: b,
            parts,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        };
        let s = &*self.shared;
        // Only the lifetime is erased. A helper dereferences the pointer only between raising
        // `users` and lowering it again, after reading it non-null; this function clears it and
        // then waits for `users` to reach zero before `job` (and `f`'s borrows) go out of scope.
        // All of these accesses are SeqCst, so a helper that read the pointer before it was
        // cleared had raised `users` before the wait below reads it.
        let ptr = &job as *const Job<'_> as JobPtr;
        s.job.store(ptr, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            // A parked helper checks the epoch under this lock before it waits: no lost wake-up.
            let _g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job.work();
        // Only ranges another thread claimed and is still running are left.
        wait_until(|| job.done.load(Ordering::Acquire) >= n);
        s.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        // Helpers that picked up the job find nothing left to claim and leave at once.
        wait_until(|| s.users.load(Ordering::SeqCst) == 0);
    }
}

/// Spins until `done()`, yielding the core after a while (the thread it waits for may have lost
/// its own).
fn wait_until(done: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !done() {
        spins += 1;
        if spins < 1 << 12 {
            std::hint::spin_loop();
        } else {
            thread::yield_now();
        }
    }
}

/// A task over chunk `i` of two buffers.
pub type ChunkPairFn<'a> = dyn Fn(usize, &mut [f32], &mut [f32]) + Sync + 'a;

impl Team {
    /// Splits `a` into chunks of `ca` and `b` into chunks of `cb` and runs `f(i, a_i, b_i)` for
    /// every chunk index `i` below both counts, across the team.
    pub fn for_each_chunk_pair(&self, a: &mut [f32], ca: usize, b: &mut [f32], cb: usize, f: &ChunkPairFn<'_>) {
        if ca == 0 || cb == 0 {
            return;
        }
        let n = (a.len() / ca).min(b.len() / cb);
        let (pa, pb) = (OutPtr(a.as_mut_ptr()), OutPtr(b.as_mut_ptr()));
        self.run(n, &|i| {
            let (pa, pb) = (pa, pb);
            // SAFETY: i < n so chunk i lies within each slice; task i alone touches chunk i of
            // each; both slices are borrowed mutably for the whole of `run`.
            let (ai, bi) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pa.0.add(i * ca), ca),
                    std::slice::from_raw_parts_mut(pb.0.add(i * cb), cb),
                )
            };
            f(i, ai, bi);
        });
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint chunks through it (see `for_each_chunk_pair`).
unsafe impl Sync for OutPtr {}
// SAFETY: as above.
unsafe impl Send for OutPtr {}

fn helper(s: &Shared) {
    let mut seen = s.epoch.load(Ordering::Acquire);
    loop {
        // Spin for the next region, then park until one is published.
        let start = Instant::now();
        let mut polls = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            polls += 1;
            if polls.is_multiple_of(64) && start.elapsed() > SPIN {
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                let mut g = s.park.lock().unwrap_or_else(|e| e.into_inner());
                while s.epoch.load(Ordering::SeqCst) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                drop(g);
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                break;
            }
        }
        seen = s.epoch.load(Ordering::Acquire);
        s.users.fetch_add(1, Ordering::SeqCst);
        let job = s.job.load(Ordering::SeqCst);
        if !job.is_null() {
            // SAFETY: non-null while this helper is counted in `users`, the leader keeps the job
            // alive (see `Team::run_ranges`).
            unsafe { (*job).work() };
        }
        s.users.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_exactly_once_across_many_regions() {
        let team = Team::new(3);
        for n in [0usize, 1, 2, 7, 64, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                team.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
            }
        }
    }

    #[test]
    fn ranges_cover_every_unit_once_and_never_cross_a_part_boundary() {
        let team = Team::new(2);
        for (n, bounds, min) in
            [(1000usize, vec![100usize, 101, 640, 1000], 8usize), (7, vec![7], 1), (50, vec![10, 50], 100)]
        {
            for _ in 0..20 {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                team.run_ranges(n, &bounds, min, &|r: Range<usize>| {
                    let part = bounds.iter().position(|&b| b > r.start).unwrap();
                    assert!(r.end <= bounds[part], "{r:?} crosses {}", bounds[part]);
                    assert!(!r.is_empty());
                    for i in r {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
            }
        }
    }

    #[test]
    fn parked_helpers_wake_for_the_next_region() {
        let team = Team::new(2);
        let total = AtomicUsize::new(0);
        for round in 0..20 {
            // Past SPIN: the helpers park, and the next region must wake them (or run without
            // them); either way every unit runs once and the call returns.
            thread::sleep(SPIN * 3);
            team.run(64, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(total.load(Ordering::Relaxed), 64 * (round + 1));
            assert_eq!(team.shared.users.load(Ordering::SeqCst), 0, "a helper still holds a finished job");
        }
    }

    #[test]
    fn a_team_without_helpers_runs_everything_on_the_caller() {
        let team = Team::new(0);
        let sum = AtomicUsize::new(0);
        team.run(100, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }

    #[test]
    fn regions_from_several_threads_are_serialised_and_complete() {
        let team = Arc::new(Team::new(1));
        let total = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (team, total) = (Arc::clone(&team), Arc::clone(&total));
                thread::spawn(move || {
                    for _ in 0..100 {
                        team.run(10, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(total.load(Ordering::Relaxed), 4000);
    }
}
