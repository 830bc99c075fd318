//! Signed checkpoints of the hash chain (`audit.checkpoint`): after `every` events or
//! `interval`, whichever comes first, a `checkpoint` event signed with the gateway's Ed25519 key
//! covers every event before it. Both write modes use it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Timestamp, chain, write_value};

/// When checkpoints are due.
pub(super) struct Checkpoints {
    pub(super) signer: Arc<chain::Signer>,
    pub(super) every: u64,
    pub(super) interval: Duration,
    /// Events written since the last checkpoint.
    pub(super) since: u64,
    pub(super) last: Instant,
}

impl Checkpoints {
    pub(super) fn new(cfg: &Option<crate::config::CheckpointConfig>) -> anyhow::Result<Option<Checkpoints>> {
        let Some(c) = cfg else { return Ok(None) };
        let signer = chain::Signer::load(&c.key_file).map_err(|e| anyhow::anyhow!("audit.checkpoint.keyFile: {e}"))?;
        Ok(Some(Checkpoints {
            signer: Arc::new(signer),
            every: c.every,
            interval: c.interval,
            since: 0,
            last: Instant::now(),
        }))
    }

    /// Due after `pending` more events?
    pub(super) fn due(&self, pending: u64) -> bool {
        let n = self.since + pending;
        n >= self.every || (n > 0 && self.last.elapsed() >= self.interval)
    }

    /// Writes the checkpoint event `seq` (signed, chained on `prev`) and starts counting again.
    pub(super) fn write(&mut self, out: &mut Vec<u8>, seq: u64, instance: &str, prev: &mut String) {
        write_value(out, self.event(seq, instance, self.since), prev, Some(&self.signer));
        self.since = 0;
        self.last = Instant::now();
    }

    /// The checkpoint event (`seq`), covering every event up to `seq - 1`.
    pub(super) fn event(&self, seq: u64, instance: &str, events: u64) -> serde_json::Value {
        serde_json::json!({
            "schema": "egress.v1",
            "event": "checkpoint",
            "id": uuid::Uuid::now_v7().to_string(),
            "seq": seq,
            "time": Timestamp::now().to_string(),
            "instance": instance,
            "checkpoint": {"key_id": self.signer.key_id, "covers_to_seq": seq - 1, "events": events},
        })
    }
}
