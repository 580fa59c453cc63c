//! Trace collection: the one owner of live tracking and of the ticker that
//! reads the trace buffer every [`COLLECT_EVERY`] while the agent waits
//! (for acks, for the next interval, to reconnect), so that the buffer
//! never overruns between points. Without live tracking it never ticks.

use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};

use crate::reporter::Reporter;
use crate::saturation::DiskLoad;
use crate::status::State;
use crate::trace::Tracking;
use crate::AgentError;

/// How often live tracking reads the trace buffer while the agent waits.
const COLLECT_EVERY: Duration = Duration::from_millis(100);

/// Live tracking (if any), its collection ticker and the load of the
/// tracked volumes' disks.
pub(crate) struct Collector {
    tracking: Option<Tracking>,
    ticker: Interval,
    load: DiskLoad,
}

impl Collector {
    pub(crate) fn new(tracking: Option<Tracking>) -> Self {
        let mut ticker = tokio::time::interval(COLLECT_EVERY);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let load = DiskLoad::new(
            &tracking
                .as_ref()
                .map(Tracking::own_devices)
                .unwrap_or_default(),
        );
        Self {
            tracking,
            ticker,
            load,
        }
    }

    /// The load of the tracked volumes' disks (no signal without live
    /// tracking).
    pub(crate) fn load_mut(&mut self) -> &mut DiskLoad {
        &mut self.load
    }

    /// Whether the tracked volumes' disks are saturated by their workload.
    pub(crate) fn saturated(&self) -> bool {
        self.load.saturated()
    }

    /// The tracking, for the final save of the dirty set.
    pub(crate) fn into_tracking(self) -> Option<Tracking> {
        self.tracking
    }

    pub(crate) fn get(&self) -> Option<&Tracking> {
        self.tracking.as_ref()
    }

    pub(crate) fn get_mut(&mut self) -> Option<&mut Tracking> {
        self.tracking.as_mut()
    }

    pub(crate) fn is_live(&self) -> bool {
        self.tracking.is_some()
    }

    /// Wait for the next collection; without live tracking, forever (a
    /// `select!` arm that never fires).
    pub(crate) async fn tick(&mut self) {
        if self.tracking.is_none() {
            std::future::pending::<()>().await;
        }
        self.ticker.tick().await;
    }

    /// Bring in the trace events recorded so far (nothing without live
    /// tracking). The pipe round trip runs in `block_in_place`.
    pub(crate) fn collect(&mut self) -> Result<(), AgentError> {
        match self.tracking.as_mut() {
            Some(t) => t.collect(),
            None => Ok(()),
        }
    }

    /// After a tick's collection: at most once a second, tracking's
    /// figures (and `state`, computed only then) into the status.
    pub(crate) fn report(
        &self,
        reporter: &mut Reporter,
        state: impl FnOnce(&Tracking) -> Option<State>,
    ) {
        let Some(t) = self.tracking.as_ref() else {
            return;
        };
        if !reporter.due() {
            return;
        }
        if let Some(s) = state(t) {
            reporter.set_state(s);
        }
        reporter.track(t);
        reporter.save();
    }
}
