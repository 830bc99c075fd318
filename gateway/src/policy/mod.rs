//! Policies compiled into an immutable snapshot, and the decision: snapshot + request -> verdict.
//! No I/O here. Domain matching is one hash lookup per label suffix and CIDR matching a
//! prefix-trie lookup, so the cost of a decision does not grow with the number of rules.

mod compile;
mod decide;

pub use compile::{CompiledPolicy, CompiledRule, PeerMatch, PolicyRate, Snapshot};
pub use decide::{Action, Decision, HttpFacts};
