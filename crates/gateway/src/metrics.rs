//! The gateway's metric families: the brief's names, plus what an operator needs to
//! see a fan-out problem (gap fills, Pub/Sub reconnects, subscribed channels).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::sequencer::FillCase;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CapLabel {
    pub cap: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FillLabel {
    /// `lost_publish`, `subscriber_ahead`, `reconnect` (`sequencer::FillCase`).
    pub case: &'static str,
    /// `filled`, `failed`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    pub connections_active: Gauge,
    pub messages_sent: Counter,
    /// From a frame's arrival from Redis to its being queued for every local recipient.
    pub fanout_duration: Histogram,
    pub disconnects: Family<ReasonLabel, Counter>,
    /// Upgrades refused over a cap, by `cap` (`process`, `user`, `address`).
    pub refused: Family<CapLabel, Counter>,
    /// Subscribes with `since`: `recovered`, `too_far_behind`, `over_budget`, `failed`.
    pub recoveries: Family<OutcomeLabel, Counter>,
    pub pubsub_messages: Counter,
    /// Ranges read from PostgreSQL by the hub, by why and how it went.
    pub gap_fills: Family<FillLabel, Counter>,
    /// Frames the hub dropped because it had passed their offset on already.
    pub duplicates_dropped: Counter,
    /// Channels whose missing range could not be read: their subscribers were closed
    /// with 1012 to recover with `since`.
    pub channel_resets: Counter,
    /// Redis channels this process is subscribed to (one per channel with local subscribers).
    pub pubsub_channels: Gauge,
    pub pubsub_reconnects: Counter,
}

impl GatewayMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            connections_active: Gauge::default(),
            messages_sent: Counter::default(),
            fanout_duration: Histogram::new([
                0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5,
            ]),
            disconnects: Family::default(),
            refused: Family::default(),
            recoveries: Family::default(),
            pubsub_messages: Counter::default(),
            gap_fills: Family::default(),
            duplicates_dropped: Counter::default(),
            channel_resets: Counter::default(),
            pubsub_channels: Gauge::default(),
            pubsub_reconnects: Counter::default(),
        };
        registry.register(
            "websocket_connections_active",
            "Open WebSocket connections",
            metrics.connections_active.clone(),
        );
        registry.register(
            "websocket_messages_sent",
            "Frames sent to clients",
            metrics.messages_sent.clone(),
        );
        registry.register_with_unit(
            "websocket_fanout_duration",
            "Time to queue one Redis frame for every local recipient",
            Unit::Seconds,
            metrics.fanout_duration.clone(),
        );
        registry.register(
            "websocket_disconnects",
            "Closed connections by reason",
            metrics.disconnects.clone(),
        );
        registry.register(
            "websocket_connections_refused",
            "Upgrades refused over a connection cap, by cap",
            metrics.refused.clone(),
        );
        registry.register(
            "websocket_recoveries",
            "Subscribes with `since` by outcome",
            metrics.recoveries.clone(),
        );
        registry.register(
            "redis_pubsub_messages",
            "Frames received over Redis Pub/Sub",
            metrics.pubsub_messages.clone(),
        );
        registry.register(
            "websocket_gap_fills",
            "Offset ranges the hub read from PostgreSQL, by case and outcome",
            metrics.gap_fills.clone(),
        );
        registry.register(
            "websocket_duplicates_dropped",
            "Frames dropped because their offset was passed on already",
            metrics.duplicates_dropped.clone(),
        );
        registry.register(
            "websocket_channel_resets",
            "Channels reset because a missing range could not be read",
            metrics.channel_resets.clone(),
        );
        registry.register(
            "redis_pubsub_channels",
            "Redis channels subscribed by this process",
            metrics.pubsub_channels.clone(),
        );
        registry.register(
            "redis_pubsub_reconnects",
            "Times the Pub/Sub connection was re-established",
            metrics.pubsub_reconnects.clone(),
        );
        metrics
    }

    pub fn gap_fill(&self, case: FillCase, outcome: &'static str) {
        self.gap_fills
            .get_or_create(&FillLabel {
                case: case.label(),
                outcome,
            })
            .inc();
    }

    pub fn refused(&self, cap: &'static str) {
        self.refused.get_or_create(&CapLabel { cap }).inc();
    }

    pub fn disconnect(&self, reason: &'static str) {
        self.disconnects
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}
