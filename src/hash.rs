//! The hasher of the tables every request looks up (the gates, the conversation view, the
//! count memo, pruning's per-request maps).

/// foldhash, seeded per table: several times cheaper than the standard SipHash on the short
/// keys of the request path. Conversation ids come from clients; the random seed keeps them
/// from choosing collisions.
pub type Seeded = foldhash::fast::RandomState;
