//! The freeze watchdog: a plain thread (independent of the async runtime)
//! that thaws a freeze at its limit, whatever the agent is doing.
//!
//! States, under one mutex so that the thaw happens exactly once:
//! `Freezing` (armed, FIFREEZE in progress) → `Frozen` → `Thawed`. At the
//! deadline a `Frozen` filesystem is thawed by the watchdog; a freeze still
//! `Freezing` is marked fired, and [`Watchdog::frozen`] thaws it as soon as
//! FIFREEZE returns.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What thaws the filesystem.
pub(super) type ThawFn = Box<dyn Fn() + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Freezing,
    Frozen,
    Thawed,
}

struct State {
    phase: Phase,
    /// The deadline passed before the freeze ended.
    fired: bool,
    /// The freeze ended: the thread returns.
    done: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    thaw: ThawFn,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thaw closure that panicked leaves the state as it was; going on
        // is right (the worst case is a second FITHAW, which fails harmlessly).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An armed watchdog. [`Watchdog::finish`] disarms it (and thaws).
pub(super) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Arm: `thaw` runs at `limit` from now unless the freeze ended.
    pub(super) fn start(limit: Duration, thaw: ThawFn) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                phase: Phase::Freezing,
                fired: false,
                done: false,
            }),
            changed: Condvar::new(),
            thaw,
        });
        let deadline = Instant::now() + limit;
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("freeze-watchdog".into())
            .spawn(move || watch(&sh, deadline))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// FIFREEZE returned. If the deadline already passed, thaw now.
    pub(super) fn frozen(&self) {
        let mut st = self.shared.lock();
        if st.phase == Phase::Freezing {
            if st.fired {
                (self.shared.thaw)();
                st.phase = Phase::Thawed;
            } else {
                st.phase = Phase::Frozen;
            }
        }
    }

    /// Wait until the watchdog fires (the test knob that holds a freeze,
    /// compiled into debug builds only).
    #[cfg(any(debug_assertions, test))]
    pub(super) fn wait_fired(&self) {
        let mut st = self.shared.lock();
        while !st.fired && !st.done {
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// End the freeze: thaw unless the watchdog did, stop the thread.
    /// Returns whether the watchdog fired.
    pub(super) fn finish(mut self) -> bool {
        self.end()
    }

    fn end(&mut self) -> bool {
        let fired = {
            let mut st = self.shared.lock();
            if st.phase == Phase::Frozen {
                (self.shared.thaw)();
            }
            st.phase = Phase::Thawed;
            st.done = true;
            st.fired
        };
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.end();
        }
    }
}

/// The thread: wait for the end of the freeze or the deadline.
fn watch(sh: &Shared, deadline: Instant) {
    let mut st = sh.lock();
    loop {
        if st.done {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            if st.phase == Phase::Frozen {
                (sh.thaw)();
                st.phase = Phase::Thawed;
            }
            st.fired = true;
            drop(st);
            sh.changed.notify_all();
            return;
        }
        st = sh
            .changed
            .wait_timeout(st, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn counter() -> (Arc<AtomicU32>, ThawFn) {
        let n = Arc::new(AtomicU32::new(0));
        let m = Arc::clone(&n);
        (
            n,
            Box::new(move || {
                m.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }

    #[test]
    fn a_freeze_ended_in_time_is_thawed_once_by_its_owner() {
        let (n, thaw) = counter();
        let w = Watchdog::start(Duration::from_secs(60), thaw).unwrap();
        w.frozen();
        assert!(!w.finish());
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_watchdog_thaws_at_the_limit_and_only_once() {
        let (n, thaw) = counter();
        let w = Watchdog::start(Duration::from_millis(20), thaw).unwrap();
        w.frozen();
        w.wait_fired();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert!(w.finish());
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_freeze_call_that_outlasts_the_limit_is_thawed_when_it_returns() {
        let (n, thaw) = counter();
        let w = Watchdog::start(Duration::from_millis(1), thaw).unwrap();
        w.wait_fired();
        assert_eq!(n.load(Ordering::SeqCst), 0, "nothing was frozen yet");
        w.frozen();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert!(w.finish());
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn dropping_an_armed_watchdog_thaws() {
        let (n, thaw) = counter();
        let w = Watchdog::start(Duration::from_secs(60), thaw).unwrap();
        w.frozen();
        drop(w);
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
