//! The order of one channel's events, as this gateway passes them on: each offset
//! once, in order, no gaps. Pure: no I/O, no clock, no locks; the hub feeds it what
//! happens and does what it answers.
//!
//! What happens to a channel:
//!
//! - [`Sequencer::frame`]: a frame arrived from Redis. The next offset goes out; one
//!   already passed on is a duplicate and is dropped; one beyond the next means a
//!   publish was lost, so the frame waits and the range before it is to be filled
//!   from PostgreSQL.
//! - [`Sequencer::joined`], [`Sequencer::reading`], [`Sequencer::left`]: a subscriber
//!   registered, then read the channel's newest offset from PostgreSQL (it has
//!   everything up to its reading and needs everything after), or left. A channel
//!   starts at the lowest reading of the subscribers that joined before it started:
//!   frames wait until each of them has reported (or left). A reading beyond what was
//!   passed on means publishes were lost, to be filled.
//! - [`Sequencer::known`]: the hub read the newest offset itself (catching up after
//!   Pub/Sub came back); beyond what was passed on, to be filled.
//! - [`Sequencer::filled`] / [`Sequencer::fill_failed`]: how a fill ended. After a fill,
//!   what waited behind it goes out in order. A fill that cannot be done leaves the
//!   channel without continuity: the hub resets it, and its subscribers resubscribe
//!   with `since` (on any gateway).
//!
//! At most one fill runs per channel; frames arriving meanwhile wait, bounded by
//! [`MAX_WAITING`].

use std::{collections::BTreeMap, ops::RangeInclusive};

/// A subscriber, as the hub numbers them.
pub type SubscriberId = u64;

/// Frames held back per channel (behind a fill, or before the channel's start is
/// known) before the channel is reset instead.
pub const MAX_WAITING: usize = 10_000;

/// Why a range is read from PostgreSQL, for `websocket_gap_fills_total{case}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FillCase {
    /// A frame arrived past the next offset: a publish never reached Redis.
    LostPublish,
    /// A subscriber's read of the newest offset found more than was passed on.
    SubscriberAhead,
    /// Pub/Sub reconnected: what was published while it was down.
    Reconnect,
}

impl FillCase {
    pub const fn label(self) -> &'static str {
        match self {
            Self::LostPublish => "lost_publish",
            Self::SubscriberAhead => "subscriber_ahead",
            Self::Reconnect => "reconnect",
        }
    }
}

/// A range of offsets to read from PostgreSQL and hand back to [`Sequencer::filled`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fill {
    pub range: RangeInclusive<i64>,
    pub case: FillCase,
}

/// What the hub does after one step.
#[derive(Debug, PartialEq, Eq)]
pub struct Steps<T> {
    /// Pass these on, in this order.
    pub deliver: Vec<T>,
    /// Start this fill.
    pub fill: Option<Fill>,
    /// Frames dropped as duplicates.
    pub duplicates: usize,
    /// The channel lost continuity: close its subscribers so they recover with
    /// `since`, and start over.
    pub reset: bool,
}

impl<T> Default for Steps<T> {
    fn default() -> Self {
        Self {
            deliver: Vec::new(),
            fill: None,
            duplicates: 0,
            reset: false,
        }
    }
}

/// One channel's ordering state. `T` is the frame (the hub's shared delivery).
#[derive(Debug)]
pub struct Sequencer<T> {
    /// The newest offset passed on; `None` until the channel's start is known.
    last: Option<i64>,
    /// Until the start is known: the subscribers whose readings it waits for, and the
    /// lowest and highest reading so far.
    starting: Option<Starting>,
    /// The newest offset known to exist (from PostgreSQL): not yet passed on if above
    /// `last`.
    known: Option<i64>,
    /// The fill running, if one is.
    filling: Option<RangeInclusive<i64>>,
    /// Frames held back, by offset (a second frame of one offset replaces nothing).
    waiting: BTreeMap<i64, T>,
}

#[derive(Debug, Default)]
struct Starting {
    awaiting: Vec<SubscriberId>,
    readings: Option<(i64, i64)>,
}

impl<T> Default for Sequencer<T> {
    fn default() -> Self {
        Self {
            last: None,
            starting: Some(Starting::default()),
            known: None,
            filling: None,
            waiting: BTreeMap::new(),
        }
    }
}

impl<T> Sequencer<T> {
    /// The newest offset passed on, once known.
    pub fn last(&self) -> Option<i64> {
        self.last
    }

    /// A frame with `offset` arrived from Redis. It waits its turn with the others;
    /// unless a fill runs or the start is unknown, its turn is now.
    pub fn frame(&mut self, offset: i64, frame: T) -> Steps<T> {
        let mut steps = Steps::default();
        if self.waiting.insert(offset, frame).is_some() {
            steps.duplicates = 1;
        }
        if self.waiting.len() > MAX_WAITING {
            return self.reset();
        }
        if self.last.is_some() && self.filling.is_none() {
            self.advance(&mut steps, FillCase::LostPublish);
        }
        steps
    }

    /// A subscriber registered; its reading follows. Until the channel has started,
    /// the start waits for it.
    pub fn joined(&mut self, subscriber: SubscriberId) {
        if let Some(starting) = &mut self.starting {
            starting.awaiting.push(subscriber);
        }
    }

    /// A subscriber left (its reading may never come).
    pub fn left(&mut self, subscriber: SubscriberId) -> Steps<T> {
        match &mut self.starting {
            Some(starting) => {
                starting.awaiting.retain(|s| *s != subscriber);
                self.try_start()
            }
            None => Steps::default(),
        }
    }

    /// A subscriber read the channel's newest offset after it joined: it has up to
    /// `offset` and needs what follows.
    pub fn reading(&mut self, subscriber: SubscriberId, offset: i64) -> Steps<T> {
        match &mut self.starting {
            Some(starting) => {
                starting.awaiting.retain(|s| *s != subscriber);
                starting.readings = Some(match starting.readings {
                    None => (offset, offset),
                    Some((low, high)) => (low.min(offset), high.max(offset)),
                });
                self.try_start()
            }
            None => self.known(offset, FillCase::SubscriberAhead),
        }
    }

    /// PostgreSQL says the channel's newest offset is at least `offset`. Before the
    /// channel has started, its subscribers' readings alone say where it starts.
    pub fn known(&mut self, offset: i64, case: FillCase) -> Steps<T> {
        let mut steps = Steps::default();
        if self.last.is_none() {
            return steps;
        }
        self.known = Some(self.known.map_or(offset, |known| known.max(offset)));
        if self.filling.is_none() {
            self.advance(&mut steps, case);
        }
        steps
    }

    /// Starts the channel once no reading is awaited: at the lowest, knowing the
    /// highest exists.
    fn try_start(&mut self) -> Steps<T> {
        let Some(Starting {
            awaiting,
            readings: Some((lowest, highest)),
        }) = &self.starting
        else {
            return Steps::default();
        };
        if !awaiting.is_empty() {
            return Steps::default();
        }
        let (lowest, highest) = (*lowest, *highest);
        self.starting = None;
        self.last = Some(lowest);
        self.known(highest, FillCase::SubscriberAhead)
    }

    /// A fill ended with `frames`: the offsets of its range that PostgreSQL has, in
    /// order.
    pub fn filled(&mut self, frames: impl IntoIterator<Item = (i64, T)>) -> Steps<T> {
        let mut steps = Steps::default();
        let Some(range) = self.filling.take() else {
            return steps;
        };
        for (offset, frame) in frames {
            if self.last.is_some_and(|last| offset == last + 1) && range.contains(&offset) {
                self.last = Some(offset);
                steps.deliver.push(frame);
            }
        }
        if self.last.is_some_and(|last| last < *range.end()) {
            // Offsets are committed before they are published, so PostgreSQL has every
            // offset below one that was seen. Without them, waiting would stall the
            // channel for good: move on past them (the hub says so in its log).
            self.last = Some(*range.end());
        }
        self.advance(&mut steps, FillCase::LostPublish);
        steps
    }

    /// The running fill could not be done.
    pub fn fill_failed(&mut self) -> Steps<T> {
        self.reset()
    }

    /// Passes on what waits in order, and starts the fill the next hole needs. What
    /// waits at or below the last offset passed on is a duplicate, and goes.
    fn advance(&mut self, steps: &mut Steps<T>, case: FillCase) {
        let Some(mut last) = self.last else {
            return;
        };
        let later = self.waiting.split_off(&(last + 1));
        steps.duplicates += std::mem::replace(&mut self.waiting, later).len();
        while let Some(frame) = self.waiting.remove(&(last + 1)) {
            last += 1;
            steps.deliver.push(frame);
        }
        self.last = Some(last);
        let hole_end = match (self.waiting.keys().next(), self.known) {
            (Some(&next), _) => Some(next - 1),
            (None, Some(known)) if known > last => Some(known),
            _ => None,
        };
        if let Some(end) = hole_end {
            let range = last + 1..=end;
            self.filling = Some(range.clone());
            steps.fill = Some(Fill { range, case });
        }
    }

    fn reset(&mut self) -> Steps<T> {
        *self = Self::default();
        Steps {
            reset: true,
            ..Steps::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    type Seq = Sequencer<i64>;

    /// Feeds live frames, returns what went out.
    fn frames(seq: &mut Seq, offsets: &[i64]) -> (Vec<i64>, Option<Fill>) {
        let mut out = Vec::new();
        let mut fill = None;
        for &offset in offsets {
            let steps = seq.frame(offset, offset);
            out.extend(steps.deliver);
            fill = fill.or(steps.fill);
        }
        (out, fill)
    }

    fn started_at(offset: i64) -> Seq {
        let mut seq = Seq::default();
        seq.joined(1);
        seq.reading(1, offset);
        seq
    }

    #[test]
    fn frames_wait_until_the_start_is_known() {
        let mut seq = Seq::default();
        seq.joined(1);
        assert_eq!(frames(&mut seq, &[3, 4]), (vec![], None));
        // The subscriber read up to 3 itself: 3 is behind, 4 goes out.
        let steps = seq.reading(1, 3);
        assert_eq!(steps.deliver, vec![4]);
        assert_eq!(steps.duplicates, 1);
        assert_eq!(seq.last(), Some(4));
    }

    #[test]
    fn a_new_channel_starts_at_the_lowest_reading_of_its_first_subscribers() {
        let mut seq = Seq::default();
        seq.joined(1);
        seq.joined(2);
        // 2 read later, and reports first: the start still waits for 1.
        assert_eq!(seq.reading(2, 5), Steps::default());
        assert_eq!(frames(&mut seq, &[6]), (vec![], None));
        // 1 read 3; its 4 and 5 were published before anyone listened.
        let steps = seq.reading(1, 3);
        let fill = steps.fill.unwrap();
        assert_eq!((fill.range, fill.case), (4..=5, FillCase::SubscriberAhead));
        assert_eq!(seq.filled([(4, 4), (5, 5)]).deliver, vec![4, 5, 6]);
    }

    #[test]
    fn a_subscriber_that_leaves_before_reading_is_not_waited_for() {
        let mut seq = Seq::default();
        seq.joined(1);
        seq.joined(2);
        seq.reading(2, 5);
        frames(&mut seq, &[6]);
        assert_eq!(seq.left(1).deliver, vec![6]);
        // Joining after the start changes nothing.
        seq.joined(3);
        assert_eq!(seq.reading(3, 6), Steps::default());
    }

    #[test]
    fn in_order_frames_pass_and_duplicates_do_not() {
        let mut seq = started_at(0);
        assert_eq!(frames(&mut seq, &[1, 2, 2, 1, 3]), (vec![1, 2, 3], None));
    }

    #[test]
    fn a_gap_is_filled_before_what_follows_it() {
        let mut seq = started_at(1);
        let (out, fill) = frames(&mut seq, &[2, 5, 6]);
        assert_eq!(out, vec![2]);
        let fill = fill.unwrap();
        assert_eq!((fill.range, fill.case), (3..=4, FillCase::LostPublish));
        // 7 arrives during the fill; a late 4 is kept until the fill says otherwise.
        assert_eq!(frames(&mut seq, &[7, 4]), (vec![], None));
        let steps = seq.filled([(3, 3), (4, 4)]);
        assert_eq!(steps.deliver, vec![3, 4, 5, 6, 7]);
        assert_eq!(steps.fill, None);
    }

    #[test]
    fn a_reading_ahead_of_the_hub_fills_the_difference() {
        let mut seq = started_at(2);
        let steps = seq.known(5, FillCase::Reconnect);
        let fill = steps.fill.unwrap();
        assert_eq!((fill.range, fill.case), (3..=5, FillCase::Reconnect));
        assert_eq!(seq.filled([(3, 3), (4, 4), (5, 5)]).deliver, vec![3, 4, 5]);
        // A reading behind what went out changes nothing.
        assert_eq!(seq.known(4, FillCase::SubscriberAhead), Steps::default());
    }

    #[test]
    fn offsets_postgresql_does_not_have_are_skipped_not_waited_for() {
        let mut seq = started_at(0);
        frames(&mut seq, &[3]);
        let steps = seq.filled([(1, 1)]);
        assert_eq!(steps.deliver, vec![1, 3]);
        assert_eq!(seq.last(), Some(3));
    }

    #[test]
    fn a_failed_fill_resets_the_channel() {
        let mut seq = started_at(0);
        frames(&mut seq, &[5]);
        assert!(seq.fill_failed().reset);
        assert_eq!(seq.last(), None);
        // It starts over with the next subscriber's reading.
        seq.joined(2);
        assert_eq!(frames(&mut seq, &[6]).0, Vec::<i64>::new());
        assert_eq!(seq.known(5, FillCase::Reconnect), Steps::default());
        assert_eq!(seq.reading(2, 5).deliver, vec![6]);
    }

    #[test]
    fn too_much_waiting_resets_the_channel() {
        let mut seq = Seq::default();
        let mut reset = false;
        for offset in 1..=(MAX_WAITING as i64 + 1) {
            reset |= seq.frame(offset, offset).reset;
        }
        assert!(reset);
    }

    /// What can happen to a channel, in any order.
    #[derive(Debug, Clone)]
    enum Event {
        /// A post commits the next offset.
        Commit,
        /// The frame of a committed offset arrives from Redis (perhaps again; a lost
        /// publish is one that never does).
        Publish(usize),
        /// Subscriber `n` registers with the hub.
        Join(usize),
        /// Subscriber `n`, registered, reads the newest offset from PostgreSQL.
        Read(usize),
        /// Subscriber `n` reports what it read.
        Report(usize),
        /// The running fill completes.
        Fill,
    }

    const SUBSCRIBERS: usize = 3;

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => Just(Event::Commit),
            6 => (0..64usize).prop_map(Event::Publish),
            1 => (0..SUBSCRIBERS).prop_map(Event::Join),
            1 => (0..SUBSCRIBERS).prop_map(Event::Read),
            1 => (0..SUBSCRIBERS).prop_map(Event::Report),
            2 => Just(Event::Fill),
        ]
    }

    /// A subscriber as the hub and its connection see it.
    #[derive(Debug, Default, Clone)]
    struct Subscriber {
        joined: bool,
        reading: Option<i64>,
        reported: bool,
        /// What the hub passed on to it since it joined.
        received: Vec<i64>,
    }

    struct World {
        seq: Seq,
        committed: i64,
        fill: Option<Fill>,
        subscribers: Vec<Subscriber>,
    }

    impl World {
        fn apply(&mut self, steps: Steps<i64>) -> Result<(), TestCaseError> {
            prop_assert!(!steps.reset, "nothing here is a reason to reset");
            for subscriber in self.subscribers.iter_mut().filter(|s| s.joined) {
                subscriber.received.extend(&steps.deliver);
            }
            if let Some(next) = steps.fill {
                prop_assert!(self.fill.is_none(), "one fill at a time");
                prop_assert!(*next.range.start() >= 1);
                self.fill = Some(next);
            }
            Ok(())
        }

        fn complete_fill(&mut self) -> Result<(), TestCaseError> {
            if let Some(running) = self.fill.take() {
                let committed = self.committed;
                let read = running
                    .range
                    .clone()
                    .filter(|o| *o <= committed)
                    .map(|o| (o, o));
                let steps = self.seq.filled(read);
                self.apply(steps)?;
            }
            Ok(())
        }

        fn report(&mut self, n: usize) -> Result<(), TestCaseError> {
            let subscriber = &mut self.subscribers[n];
            if let (Some(reading), false) = (subscriber.reading, subscriber.reported) {
                subscriber.reported = true;
                let steps = self.seq.reading(n as u64, reading);
                self.apply(steps)?;
            }
            Ok(())
        }
    }

    proptest! {
        /// Whatever order commits, publishes (lost, late, doubled), subscribers'
        /// registrations, readings and reports, and fills come in, every subscriber
        /// gets each offset after its reading once, in order, with no gap, up to the
        /// last committed, once the fills are done.
        #[test]
        fn each_subscriber_gets_each_offset_after_its_reading_once_in_order(
            events in proptest::collection::vec(event(), 0..160),
        ) {
            let mut world = World {
                seq: Seq::default(),
                committed: 0,
                fill: None,
                subscribers: vec![Subscriber::default(); SUBSCRIBERS],
            };
            for event in events {
                match event {
                    Event::Commit => world.committed += 1,
                    Event::Publish(n) => {
                        if world.committed > 0 {
                            let offset = (n as i64 % world.committed) + 1;
                            let steps = world.seq.frame(offset, offset);
                            world.apply(steps)?;
                        }
                    }
                    Event::Join(n) => {
                        if !world.subscribers[n].joined {
                            world.subscribers[n].joined = true;
                            world.seq.joined(n as u64);
                        }
                    }
                    Event::Read(n) => {
                        let committed = world.committed;
                        let subscriber = &mut world.subscribers[n];
                        if subscriber.joined && subscriber.reading.is_none() {
                            subscriber.reading = Some(committed);
                        }
                    }
                    Event::Report(n) => world.report(n)?,
                    Event::Fill => world.complete_fill()?,
                }
            }
            // Settle: everyone joined reads and reports, the hub catches up, fills end.
            for n in 0..SUBSCRIBERS {
                let committed = world.committed;
                let subscriber = &mut world.subscribers[n];
                if subscriber.joined && subscriber.reading.is_none() {
                    subscriber.reading = Some(committed);
                }
                world.report(n)?;
            }
            let committed = world.committed;
            let steps = world.seq.known(committed, FillCase::Reconnect);
            world.apply(steps)?;
            while world.fill.is_some() {
                world.complete_fill()?;
            }
            for subscriber in world.subscribers.iter().filter(|s| s.joined) {
                let reading = subscriber.reading.unwrap_or(0);
                // The connection drops what it read itself.
                let after: Vec<i64> = subscriber.received.iter().copied().filter(|o| *o > reading).collect();
                let expected: Vec<i64> = (reading + 1..=committed).collect();
                prop_assert_eq!(after, expected, "{:?}", subscriber);
            }
        }
    }
}
