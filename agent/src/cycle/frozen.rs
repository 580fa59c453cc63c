//! The frozen part of a cycle: the final delta read into memory, the
//! thaw, and what the freeze is noted as (see [`crate::freeze`]).

use pilotlight_protocol::frame::Consistency;

use super::Point;
use crate::consistency::Snapshot;
use crate::freeze::capture::{self, Captured};
use crate::freeze::Thawed;
use crate::session::Session;
use crate::trace::Plan;
use crate::AgentError;

impl Session<'_> {
    /// With a frozen filesystem: read the final delta into memory (if it
    /// fits the budget: see [`crate::freeze`]), thaw, and note the freeze.
    /// Without a capture (nothing frozen, or a delta over the budget, read
    /// live after the thaw and labelled `fuzzy`) the result is empty.
    pub(super) async fn read_frozen(
        &mut self,
        snapshot: &mut Snapshot,
        plans: Option<&[Plan]>,
        point: &mut Point,
        freeze_call: std::time::Duration,
    ) -> Result<Captured, AgentError> {
        let Some(frozen) = snapshot.take_freeze() else {
            return Ok(Captured::default());
        };
        let sources: Vec<capture::Source> = self
            .vols
            .iter()
            .map(|v| capture::Source {
                name: v.name.clone(),
                path: v.path.clone(),
                size: v.size,
                block_size: v.block_size,
                is_device: v.is_device,
            })
            .collect();
        let delta = capture::delta_bytes(&sources, plans);
        if let Some(plans) = plans {
            let (blocks, paged) = plans.iter().fold((0, 0), |(b, p), plan| match plan {
                Plan::Blocks(list, pages) => (b + list.len(), p + pages.len()),
                Plan::Full(_) => (b, p),
            });
            tracing::debug!(
                tag = point.tag,
                blocks,
                paged,
                delta,
                "frozen delta planned"
            );
        }
        let budget = self.agent.freezer.options().memory;
        let fits = crate::freeze::fits_in_memory(delta, budget);
        let plans = plans.map(<[Plan]>::to_vec);
        let (captured, thawed) = tokio::task::spawn_blocking(move || {
            let captured = if fits {
                capture::capture(&sources, plans.as_deref())
            } else {
                Ok(None)
            };
            if matches!(captured, Ok(Some(_))) {
                frozen.hold_for_tests();
            }
            (captured, frozen.thaw())
        })
        .await
        .map_err(|e| AgentError::task("frozen read", e))?;
        let captured = captured?;
        if fits && captured.is_none() {
            point.report.consistency = Consistency::Fuzzy;
        }
        let captured = captured.unwrap_or_default();
        if !fits {
            point.report.consistency = Consistency::Fuzzy;
            tracing::warn!(
                tag = point.tag,
                delta,
                budget,
                "the final delta exceeds the freeze's memory budget: thawed at once, read live, the point is fuzzy"
            );
        }
        if thawed.by_watchdog {
            point.report.consistency = Consistency::Fuzzy;
            tracing::warn!(
                tag = point.tag,
                "the freeze watchdog thawed the filesystem at its limit: the point is fuzzy"
            );
        }
        point.report.bytes_read += captured.bytes;
        self.note_thaw(thawed, freeze_call, point, captured.bytes)?;
        Ok(captured)
    }

    /// After a thaw: note how long the freeze lasted and what the thaw
    /// itself wrote.
    fn note_thaw(
        &mut self,
        thawed: Thawed,
        freeze_call: std::time::Duration,
        point: &Point,
        captured: u64,
    ) -> Result<(), AgentError> {
        let Some(t) = self.agent.collector.get_mut() else {
            return Ok(());
        };
        t.note_freeze(thawed.held);
        t.note_frozen_read(captured, thawed.by_watchdog);
        // The frozen delta is dirty blocks (a full scan is never frozen).
        t.note_read(captured, true, 0);
        t.note_thaw()?;
        self.agent.reporter.save();
        tracing::info!(
            tag = point.tag,
            frozen_ms = thawed.held.as_secs_f64() * 1000.0,
            fifreeze_ms = freeze_call.as_secs_f64() * 1000.0,
            barrier_ms = point.barrier.as_secs_f64() * 1000.0,
            precopied = point.precopied,
            captured,
            watchdog = thawed.by_watchdog,
            "filesystem thawed"
        );
        Ok(())
    }
}
