//! One data stream's bookkeeping of what it sent: the frames not yet
//! acknowledged (`Received`), each holding its share of the window, and the
//! partial blocks not yet answered (`PartialApplied`, which the receiver
//! sends in order, before the `Received` that covers the block). The
//! answers go to a table the link shares with the session, which takes them
//! at the point's `Durable`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use pilotlight_protocol::{BlockHash, Frame};
use tokio::sync::OwnedSemaphorePermit;

use super::Outgoing;
use crate::AgentError;

/// The receiver's answers to partial blocks, shared by the data streams:
/// by point tag, volume and block.
pub(super) type Learned = Arc<Mutex<HashMap<(u64, u16, u64), BlockHash>>>;

/// A partial block sent on a data stream and not answered yet: the seq
/// of its frame, and its tag, volume and block.
type Unanswered = (u64, (u64, u16, u64));

/// What one data stream waits for: the acks of the frames it sent, and
/// the answers to its partial blocks.
pub(super) struct Acks {
    in_flight: VecDeque<(u64, OwnedSemaphorePermit)>,
    unanswered: VecDeque<Unanswered>,
    learned: Learned,
}

impl Acks {
    pub(super) fn new(learned: Learned) -> Self {
        Self {
            in_flight: VecDeque::new(),
            unanswered: VecDeque::new(),
            learned,
        }
    }

    /// Frames sent and not acknowledged.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Frame `seq` went out.
    pub(super) fn sent(&mut self, seq: u64, o: Outgoing) {
        if let Frame::PartialBlock(p) = &o.frame {
            self.unanswered.push_back((seq, (p.tag, p.volume, p.index)));
        }
        self.in_flight.push_back((seq, o.permit));
    }

    /// A frame from the receiver on the stream: `Received`, or the answer
    /// to the oldest partial block not answered.
    pub(super) fn take(&mut self, frame: Frame) -> Result<(), AgentError> {
        match frame {
            Frame::Received { seq } => {
                if self.unanswered.front().is_some_and(|(s, _)| *s <= seq) {
                    return Err(AgentError::Protocol(
                        "a partial block was acknowledged without its new hash".into(),
                    ));
                }
                while self.in_flight.front().is_some_and(|(s, _)| *s <= seq) {
                    self.in_flight.pop_front();
                }
                Ok(())
            }
            Frame::PartialApplied(a) => {
                let key = (a.tag, a.volume, a.index);
                if self.unanswered.front().map(|u| u.1) != Some(key) {
                    return Err(AgentError::Protocol(format!(
                        "PartialApplied for block {} of volume {} (point {}), which is not the next partial block sent",
                        a.index, a.volume, a.tag
                    )));
                }
                self.unanswered.pop_front();
                if let Ok(mut m) = self.learned.lock() {
                    m.insert(key, a.hash);
                }
                Ok(())
            }
            other => Err(AgentError::Protocol(format!(
                "unexpected {:?} on a data stream",
                other.kind()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use pilotlight_protocol::frame::{ByteRange, PartialAppliedFrame};
    use pilotlight_protocol::PartialBlockFrame;
    use tokio::sync::Semaphore;

    fn partial(index: u64) -> Frame {
        Frame::PartialBlock(PartialBlockFrame {
            tag: 1,
            volume: 0,
            index,
            raw_len: 8192,
            base_hash: BlockHash([0; 32]),
            ranges: vec![ByteRange {
                offset: 0,
                len: 4096,
            }],
            data: Bytes::from(vec![1u8; 4096]),
        })
    }

    fn applied(index: u64) -> Frame {
        Frame::PartialApplied(PartialAppliedFrame {
            tag: 1,
            volume: 0,
            index,
            hash: BlockHash([index as u8; 32]),
        })
    }

    fn acks() -> Acks {
        let window = Arc::new(Semaphore::new(100));
        let mut a = Acks::new(Learned::default());
        for (seq, index) in [(0, 5), (1, 6)] {
            let permit = window.clone().try_acquire_owned().unwrap();
            a.sent(
                seq,
                Outgoing {
                    frame: partial(index),
                    permit,
                },
            );
        }
        a
    }

    #[test]
    fn answers_in_order_are_learned_and_acks_release_the_window() {
        let mut a = acks();
        a.take(applied(5)).unwrap();
        a.take(Frame::Received { seq: 0 }).unwrap();
        assert_eq!(a.in_flight(), 1);
        a.take(applied(6)).unwrap();
        a.take(Frame::Received { seq: 1 }).unwrap();
        assert_eq!(a.in_flight(), 0);
        let m = a.learned.lock().unwrap();
        assert_eq!(m.get(&(1, 0, 6)), Some(&BlockHash([6; 32])));
    }

    #[test]
    fn an_answer_out_of_order_or_an_ack_without_one_is_a_protocol_error() {
        let mut a = acks();
        assert!(matches!(a.take(applied(6)), Err(AgentError::Protocol(_))));
        let mut a = acks();
        assert!(matches!(
            a.take(Frame::Received { seq: 0 }),
            Err(AgentError::Protocol(_))
        ));
        let mut a = acks();
        assert!(matches!(
            a.take(Frame::Goodbye),
            Err(AgentError::Protocol(_))
        ));
    }
}
